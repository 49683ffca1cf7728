"""Small files packed into shared slices (``Volume.write_many``): what they read back, what the
cache does with them, and the slice reference counts on every metadata engine -- a shared object
goes with the last file that refers to it, through every path that drops data."""
from __future__ import annotations

import os
import random

import pytest

import torchjuice as tj
from conftest import META_ENGINES, STORES, make_meta_url, make_store_url
from torchjuice.errors import PathEscapeError
from torchjuice.meta import new_meta
from torchjuice.object import create_store
from torchjuice.ops.fsck import fsck
from torchjuice.ops.gc import gc

KiB = 1 << 10


def _format(request, tmp_path, engine="sqlite", store="file", **fmt):
    meta = make_meta_url(engine, request, tmp_path)
    fmt.setdefault("block_size", 64 * KiB)
    tj.format(meta, "packvol", storage=make_store_url(store, request, tmp_path), **fmt)
    return meta


def _connect(request, meta, **kw):
    vol = tj.connect(meta, **kw)
    request.addfinalizer(vol.close)
    return vol


def _objects(vol) -> set[str]:
    return {o.key for o in vol.store.list(vol.chunks.prefix)}


def _refs(vol) -> dict[str, int]:
    def fn(tx):
        keys = tx.scan_keys("k")
        return dict(zip(keys, (int(v) for v in tx.gets(keys)))) if keys else {}
    return vol.meta.txn(fn, readonly=True)


def _files(seed: int, n: int, lo: int = 1, hi: int = 12 * KiB) -> dict[str, bytes]:
    rnd = random.Random(seed)
    return {f"/d/f{i:03d}": rnd.randbytes(rnd.randint(lo, hi)) for i in range(n)}


@pytest.mark.parametrize("engine,store", [(e, s) for e in META_ENGINES for s in STORES],
                         ids=lambda p: str(p))
def test_write_many_reads_back_on_every_engine_and_store(request, tmp_path, engine, store):
    vol = _connect(request, _format(request, tmp_path, engine, store), cache_dir=None)
    vol.makedirs("/d")
    items = _files(1, 60)
    items["/d/empty"] = b""
    items["/d/big"] = random.Random(2).randbytes(150 * KiB)     # over pack_max: written alone
    puts = vol.metrics()["put_count"]
    assert vol.write_many(items.items()) == sum(map(len, items.values()))
    small = sum(1 for d in items.values() if 0 < len(d) <= 16 * KiB)
    packs = vol.metrics()["put_count"] - puts - 3                # the big file's 3 blocks
    assert 0 < packs <= small // 4                               # several files per object
    for p, d in items.items():
        assert vol.read_bytes(p) == d, p
        assert vol.stat(p).st_size == len(d)
    assert vol.read_many(list(items)) == list(items.values())
    rnd = random.Random(3)
    for p in rnd.sample(sorted(items), 20):                      # ranges through open()
        d = items[p]
        a = rnd.randint(0, len(d))
        b = rnd.randint(a, len(d) + 10)
        with vol.open(p, "rb") as f:
            f.seek(a)
            assert f.read(b - a) == d[a:b]
    assert sorted(vol.listdir("/d")) == sorted(p.rsplit("/", 1)[1] for p in items)
    assert vol.meta.check() == []


@pytest.mark.parametrize("engine", META_ENGINES)
def test_shared_object_goes_with_its_last_file(request, tmp_path, engine):
    vol = _connect(request, _format(request, tmp_path, engine, trash_days=0))
    vol.makedirs("/d")
    items = _files(4, 10, 2 * KiB, 4 * KiB)                     # 10 files, one 64 KiB object
    vol.write_many(items)
    shared = _objects(vol)
    assert len(shared) == 1 and list(_refs(vol).values()) == [9]
    live = dict(items)

    def still_there():
        assert shared <= _objects(vol)
        for p, d in live.items():
            assert vol.read_bytes(p) == d, p
        assert vol.meta.check() == []

    names = sorted(items)
    vol.remove(names[0])                                         # unlink
    del live[names[0]]
    still_there()
    vol.rename(names[1], names[2])                               # rename over: frees the target
    live[names[2]] = live.pop(names[1])
    still_there()
    vol.truncate(names[3], 0)                                    # truncate drops the chunk
    live[names[3]] = b""
    vol.truncate(names[4], 100)                                  # a partial chunk keeps it
    live[names[4]] = live[names[4]][:100]
    still_there()
    vol.write_bytes(names[5], b"new content")                    # rewritten in place
    live[names[5]] = b"new content"
    vol.link(names[6], "/d/hardlink")                            # one inode, two names
    vol.remove(names[6])
    live["/d/hardlink"] = live.pop(names[6])
    still_there()
    with vol.open(names[7], "ab") as f:                          # appended, then compacted
        f.write(b"tail")
    live[names[7]] += b"tail"
    vol.compact("/")
    vol.meta.cleanup_delayed_slices(older_than=0)
    still_there()
    sid = int(next(iter(shared)).rsplit("/", 1)[1].split("_")[0])
    holders = [p for p in live
               if any(s.id == sid for ch in vol.meta.resolve_slices(p)[1] for s in ch)]
    # compaction rewrote names[4] (a hole over its range) and names[7] into slices of their own
    assert sorted(holders) == sorted([names[2], names[8], names[9], "/d/hardlink"])
    assert _refs(vol) == {f"k{sid}": 3}
    for p in list(live):
        vol.remove(p)
    assert _objects(vol) - shared == set() and not (_objects(vol) & shared)
    assert _refs(vol) == {}
    r = gc(vol, min_age=0)
    assert r.leaked == [] and r.missing == 0
    assert fsck(vol).ok


def test_trash_cleanup_and_stale_counts(request, tmp_path):
    vol = _connect(request, _format(request, tmp_path))             # trash on (1 day)
    vol.makedirs("/d")
    items = _files(5, 8, 1 * KiB, 6 * KiB)
    vol.write_many(items)
    shared = _objects(vol)
    names = sorted(items)
    for p in names[:4]:
        vol.remove(p)                                            # into the trash: still held
    assert _objects(vol) == shared and list(_refs(vol).values()) == [7]
    assert vol.meta.cleanup_trash(now=9e9, days=0) == 4
    assert _objects(vol) == shared and list(_refs(vol).values()) == [3]
    for p in names[4:]:
        assert vol.read_bytes(p) == items[p]
    # fsck sees a count that does not match the chunks holding the slice, and repairs it
    (key, _n), = _refs(vol).items()
    vol.meta.txn(lambda tx: tx.set(key, b"1"))
    problems = vol.meta.check()
    assert any("2 references, 4 chunk(s)" in p for p in problems), problems
    assert not fsck(vol).ok and fsck(vol, repair=True).ok
    assert _refs(vol) == {key: 3}
    vol.meta.cleanup_trash(now=9e9, days=0)
    for p in names[4:]:
        vol.remove(p)
    vol.meta.cleanup_trash(now=9e9, days=0)
    assert not (_objects(vol) & shared) and _refs(vol) == {}


def test_dump_and_load_keep_the_counts(request, tmp_path):
    src = _connect(request, _format(request, tmp_path, trash_days=0))
    src.makedirs("/d")
    items = _files(6, 12, 1 * KiB, 5 * KiB)
    src.write_many(items)
    dump = src.meta.dump()
    url = make_meta_url("redis", request, tmp_path)
    new_meta(url).load_dump(dump)
    dst = _connect(request, url)
    assert dst.meta.check() == []
    assert _refs(dst) == _refs(src) and _refs(dst)
    names = sorted(items)
    for p in names[:-1]:
        dst.remove(p)
    assert dst.read_bytes(names[-1]) == items[names[-1]]     # the shared objects are still there
    assert gc(dst, min_age=0).missing == 0


def test_packed_files_read_through_the_cache(request, tmp_path):
    meta = _format(request, tmp_path, block_size=256 * KiB)
    writer = _connect(request, meta, cache_dir=None)
    writer.makedirs("/d")
    items = _files(7, 30, 6 * KiB, 10 * KiB)                    # ~240 KiB: 1-2 objects
    writer.write_many(items)
    names = sorted(items)

    def client(cache):
        m = new_meta(meta)
        fmt = m.load()
        vol = tj.Volume(m, fmt, create_store(fmt.storage), cache_dir=cache)
        request.addfinalizer(vol.close)
        return vol

    bare = client(None)                                          # no cache: a ranged GET each
    assert bare.read_bytes(names[3]) == items[names[3]]
    m = bare.metrics()
    assert m["get_count"] == 1 and m["get_bytes"] == len(items[names[3]])

    vol = client(str(tmp_path / "cache"))                        # cache: the block, once
    for p in names:
        assert vol.read_bytes(p) == items[p]
    vol.chunks.drain_cache_fill()
    blocks = len(_objects(vol))
    assert vol.metrics()["get_count"] == blocks
    again = client(str(tmp_path / "cache"))                      # a new client: all from disk
    assert again.read_many(names) == [items[p] for p in names]
    m = again.metrics()
    assert m["get_count"] == 0 and m["cache_hits"] == len(names)

    cached = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "cache") for f in fs
              if "_" in f]
    victim = max(cached, key=os.path.getsize)
    with open(victim, "r+b") as f:                               # flip a byte inside a file
        f.seek(100_000)
        b = f.read(1)
        f.seek(100_000)
        f.write(bytes([b[0] ^ 0xFF]))
    third = client(str(tmp_path / "cache"))
    assert third.read_many(names) == [items[p] for p in names]     # refetched, never wrong
    assert third.metrics()["cache_corrupt"] == 1


def test_write_many_errors_name_the_path_and_keep_what_was_written(request, tmp_path):
    vol = _connect(request, _format(request, tmp_path))
    vol.makedirs("/d/sub")
    good = _files(8, 5)
    with pytest.raises(FileNotFoundError) as e:
        vol.write_many(list(good.items()) + [("/nodir/x", b"abc")])
    assert e.value.filename == "/nodir/x"
    for p, d in good.items():                                    # committed before raising
        assert vol.read_bytes(p) == d
    with pytest.raises(IsADirectoryError):
        vol.write_many([("/d/sub", b"abc")])
    some = sorted(good)[0]
    with pytest.raises(NotADirectoryError) as e:                # under a file
        vol.write_many([(some + "/x", b"abc")])
    assert e.value.filename == some + "/x"
    with pytest.raises(PathEscapeError, match="above the root"):
        vol.write_many([("/d/../../x", b"abc")])
    assert vol.meta.check() == []


def test_cp_packs_a_directory_of_small_files(request, tmp_path):
    from torchjuice.cli.cp import copy
    meta = _format(request, tmp_path)
    src = tmp_path / "src"
    items = _files(9, 40, 100, 8 * KiB)
    for p, d in items.items():
        (src / p.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (src / p.lstrip("/")).write_bytes(d)
    (src / "d" / "large.bin").write_bytes(b"L" * (100 * KiB))        # over a quarter block
    vol = _connect(request, meta)
    files, nbytes, _s = copy(str(src), "juice://packvol/in", recursive=True, progress=False)
    assert files == 41 and nbytes == sum(map(len, items.values())) + 100 * KiB
    for p, d in items.items():
        assert vol.read_bytes("/in" + p) == d
    assert vol.read_bytes("/in/d/large.bin") == b"L" * (100 * KiB)
    assert len(_objects(vol)) < 15                  # 40 small files in a few shared objects


@pytest.mark.parametrize("store", ["file", "s3"])
def test_packed_safetensors_load_and_slice(request, tmp_path, store):
    import torch
    from safetensors.torch import save
    meta = _format(request, tmp_path, store=store, block_size=256 * KiB)
    vol = _connect(request, meta, cache_dir=str(tmp_path / "cache"))
    rnd = torch.Generator().manual_seed(0)
    models = {f"/m/{i}.safetensors": {"w": torch.randn(40, 50, generator=rnd),
                                      "b": torch.arange(i + 3, dtype=torch.int64)}
              for i in range(6)}
    vol.makedirs("/m")
    vol.write_many((p, save(t)) for p, t in models.items())         # ~8 KiB each, packed
    assert len(_objects(vol)) == 1
    for p, tensors in models.items():
        got = tj.load_safetensors(p, volume=vol)
        assert got.keys() == tensors.keys()
        assert all(torch.equal(got[k], tensors[k]) for k in tensors)
        with tj.safe_open(p, framework="pt", volume=vol) as f:
            assert torch.equal(f.get_slice("w")[3:7], tensors["w"][3:7])


def test_write_many_in_write_back_mode(request, tmp_path):
    meta = _format(request, tmp_path, store="s3")
    m = new_meta(meta)
    fmt = m.load()
    vol = tj.Volume(m, fmt, create_store(fmt.storage), cache_dir=str(tmp_path / "wb"),
                    writeback=True)
    request.addfinalizer(vol.close)
    vol.makedirs("/d")
    items = _files(10, 30)
    vol.write_many(items)                       # committed once staged on local disk
    assert all(vol.read_bytes(p) == d for p, d in items.items())
    assert vol.chunks.wait_writeback(30)
    fresh = _connect(request, meta, cache_dir=None)                 # from the store alone
    assert fresh.read_many(sorted(items)) == [items[p] for p in sorted(items)]
    assert fsck(fresh).ok


@pytest.mark.parametrize("engine", ["sqlite", "redis"])
def test_concurrent_packing_and_removal_keep_the_counts(request, tmp_path, engine):
    """Writers packing files while others remove and rewrite them, from two clients: every count
    still matches the chunks that hold the slice, nothing leaks, nothing referenced is gone."""
    import threading
    meta = _format(request, tmp_path, engine, trash_days=0)
    vols = [_connect(request, meta), _connect(request, meta)]
    vols[0].makedirs("/d")
    errors: list = []

    def writer(k):
        rnd = random.Random(k)
        try:
            for round_ in range(6):
                vols[k % 2].write_many({f"/d/w{k}-{i}": rnd.randbytes(rnd.randint(1, 6 * KiB))
                                        for i in range(rnd.randint(5, 25))})
        except Exception as e:          # noqa: BLE001 -- surfaced below
            errors.append(e)

    def remover(k):
        rnd = random.Random(100 + k)
        vol = vols[k % 2]
        try:
            for _ in range(60):
                names = vol.listdir("/d")
                if not names:
                    continue
                p = "/d/" + rnd.choice(names)
                try:
                    r = rnd.random()
                    if r < 0.4:
                        vol.remove(p)
                    elif r < 0.7:
                        vol.rename(p, "/d/" + rnd.choice(names))     # over another one
                    else:
                        vol.write_bytes(p, b"rewritten")
                except FileNotFoundError:
                    pass
        except Exception as e:          # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)] + \
              [threading.Thread(target=remover, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    v = vols[0]
    for name in v.listdir("/d"):                        # every file reads (its blocks exist)
        v.read_bytes("/d/" + name)
    assert v.meta.check() == []                         # the slice counts among the rest
    r = gc(v, min_age=0)
    assert r.leaked == [] and r.missing == 0
    for name in v.listdir("/d"):
        v.remove("/d/" + name)
    assert _refs(v) == {} and _objects(v) == set()


def test_a_write_whose_file_another_client_freed_leaves_no_object(request, tmp_path):
    meta = _format(request, tmp_path, trash_days=0)
    a, b = _connect(request, meta), _connect(request, meta)
    f = a.open("/x", "wb")
    f.write(b"y" * (200 * KiB))                     # blocks uploaded before the commit
    b.remove("/x")                                  # freed by the other client at once
    with pytest.raises(FileNotFoundError):
        f.close()                                   # the commit finds no file
    r = gc(a, min_age=0)
    assert r.leaked == [] and _objects(a) == set()


@pytest.mark.parametrize("engine", ["sqlite", "redis"])
def test_write_shared_with_a_file_listed_twice(request, tmp_path, engine):
    """A file given two ranges of one pack: the later wins, its space and the slice's holders
    are counted once."""
    vol = _connect(request, _format(request, tmp_path, engine, trash_days=0))
    a, b = vol.meta.create(1, "a"), vol.meta.create(1, "b")
    data = random.Random(11).randbytes(12000)
    sid = vol.meta.new_slice_id()
    vol.chunks.put_block(sid, 0, data).result()
    vol.meta.write_shared(sid, len(data), [(a.inode, 0, 5000), (b.inode, 5000, 1000),
                                           (a.inode, 6000, 6000)])
    assert vol.read_bytes("/a") == data[6000:] and vol.read_bytes("/b") == data[5000:6000]
    assert vol.meta.check() == [] and _refs(vol) == {f"k{sid}": 1}
    vol.remove("/a")
    vol.remove("/b")
    assert _objects(vol) == set() and vol.meta.check() == []
