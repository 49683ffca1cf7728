"""The PyTorch layer: JuiceDataset, JuiceIterableDataset, JuiceDataLoader, juice:// in webdataset."""
from __future__ import annotations

import io
import logging
import os
import pickle
import tarfile

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

import torchjuice as tj
from torchjuice.data import (JuiceDataLoader, JuiceDataset, JuiceIterableDataset, ShardError,
                             expand_braces, warn_and_continue)

VOL = "dv"


# -- helpers -------------------------------------------------------------------------------------------
@pytest.fixture
def vol(tmp_path):
    tj.format(f"sqlite3://{tmp_path}/meta.db", VOL, storage=f"file://{tmp_path}/data")
    v = tj.volume_for(VOL)
    yield v
    v.close()


def tar_bytes(members: list[tuple[str, bytes]], fmt=tarfile.USTAR_FORMAT) -> bytes:
    b = io.BytesIO()
    with tarfile.open(fileobj=b, mode="w", format=fmt) as t:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    return b.getvalue()


def payload(key: str, n: int = 300) -> bytes:
    return (key.encode() * (n // len(key) + 1))[:n]


def write_shards(vol, n_shards: int, per_shard: int, size: int = 300, d: str = "/shards") -> list[str]:
    """Shards ``d/{000..}.tar``, each sample ``{key}.bin`` + ``{key}.cls``; returns all keys."""
    vol.makedirs(d, exist_ok=True)
    keys = []
    for s in range(n_shards):
        members = []
        for j in range(per_shard):
            key = f"s{s:03d}-{j:04d}"
            keys.append(key)
            members += [(f"{key}.bin", payload(key, size + j)), (f"{key}.cls", str(j % 10).encode())]
        vol.write_bytes(f"{d}/{s:03d}.tar", tar_bytes(members))
    return keys


def keys_of(batch) -> list[str]:
    return list(batch["__key__"]) if isinstance(batch, dict) else [s["__key__"] for s in batch]


def collate_keys(samples):                 # module level: picklable for spawn
    return [s["__key__"] for s in samples]


# -- URL patterns -----------------------------------------------------------------------------------
def test_expand_braces():
    assert expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_braces("x{1..3}") == ["x1", "x2", "x3"]
    assert expand_braces("{0..10}")[-2:] == ["9", "10"] and expand_braces("{00..10}")[0] == "00"
    assert expand_braces("{3..1}") == ["3", "2", "1"]
    assert expand_braces("{a,b}/{0..1}") == ["a/0", "a/1", "b/0", "b/1"]
    assert expand_braces("{0..6..3}") == ["0", "3", "6"]
    assert expand_braces("{x}y") == ["{x}y"]
    assert expand_braces("plain") == ["plain"]
    with pytest.raises(ValueError):
        expand_braces("a{1..2")


# -- map-style --------------------------------------------------------------------------------------
def test_dataset_prefix_sorted_recursive_regular_files(vol):
    files = {"/train/b/2.bin": b"b2", "/train/a.bin": b"a", "/train/b/1.bin": b"b1",
             "/train/c/d/e.bin": b"e", "/other/x.bin": b"x"}
    for p, d in files.items():
        vol.makedirs(os.path.dirname(p), exist_ok=True)
        vol.write_bytes(p, d)
    vol.makedirs("/train/empty")
    vol.symlink("/other/x.bin", "/train/link.bin")          # not a regular file: not listed
    ds = JuiceDataset(f"juice://{VOL}/train/")
    assert list(ds.urls) == [f"juice://{VOL}/train/a.bin", f"juice://{VOL}/train/b/1.bin",
                             f"juice://{VOL}/train/b/2.bin", f"juice://{VOL}/train/c/d/e.bin"]
    assert [ds[i] for i in range(len(ds))] == [b"a", b"b1", b"b2", b"e"]
    assert ds[-1] == b"e"
    with pytest.raises(IndexError):
        ds[4]
    assert ds.urls.size(1) == 2 and ds.urls.total_size == 6
    up = JuiceDataset(f"juice://{VOL}/train", transform=bytes.upper)
    assert up[0] == b"A"
    wu = JuiceDataset(f"juice://{VOL}/train", transform=lambda r: (r[0].rsplit("/", 2)[-2], r[1]),
                      with_url=True)
    assert wu[1] == ("b", b"b1")


def test_dataset_explicit_list_pattern_and_bad_input(vol):
    vol.makedirs("/d")
    for i in range(3):
        vol.write_bytes(f"/d/{i}.txt", str(i).encode())
    ds = JuiceDataset([f"juice://{VOL}/d/2.txt", f"juice://{VOL}/d/0.txt"])
    assert [ds[0], ds[1]] == [b"2", b"0"]
    assert [x for x in JuiceDataset(f"juice://{VOL}/d/{{0..2}}.txt")] == [b"0", b"1", b"2"]
    vol.makedirs("/empty")
    with pytest.raises(ValueError, match="no files under"):
        JuiceDataset(f"juice://{VOL}/empty/")
    with pytest.raises(FileNotFoundError):
        JuiceDataset(f"juice://{VOL}/missing/")
    with pytest.raises(ValueError):
        JuiceDataset([])
    with pytest.raises(tj.InvalidURLError):
        JuiceDataset(["s3://bucket/x"])
    gone = JuiceDataset([f"juice://{VOL}/d/9.txt"])
    with pytest.raises(FileNotFoundError):
        gone[0]


def test_dataset_listing_is_one_metadata_call_per_directory(vol):
    for d in range(5):
        vol.makedirs(f"/big/d{d}/sub")
        for i in range(40):
            vol.open(f"/big/d{d}/f{i:03d}", "wb").close()
        vol.open(f"/big/d{d}/sub/last", "wb").close()
    calls = {"readdir_files": 0, "lookup": 0, "raw_attrs": 0, "other": 0}
    meta = vol.meta
    patched = {}
    for name in ("readdir_files", "lookup", "raw_attrs", "readdir", "getattr", "read_chunk"):
        real = getattr(meta, name)

        def counted(*a, _real=real, _name=name, **kw):
            calls[_name if _name in calls else "other"] += 1
            return _real(*a, **kw)
        patched[name] = counted
    try:
        for name, fn in patched.items():
            setattr(meta, name, fn)
        ds = JuiceDataset(f"juice://{VOL}/big")
    finally:
        for name in patched:
            delattr(meta, name)
    assert len(ds) == 5 * 41
    # /big, d0..d4, d0/sub..d4/sub; and the way down to /big: the root's attributes, one lookup
    assert calls == {"readdir_files": 1 + 5 + 5, "lookup": 1, "raw_attrs": 1, "other": 0}


def test_listed_dataset_reads_without_path_lookups_and_sees_changes(vol):
    """A dataset made from a directory reads its small files through the listing (no path
    lookup each), in the process and in spawned workers (the listing pickles along), and still
    returns a file changed after the listing as it is now."""
    vol.makedirs("/ls/x")
    files = {f"/ls/x/{i:03d}": bytes([i]) * (100 + i) for i in range(24)}
    vol.write_many(files.items())
    ds = JuiceDataset(f"juice://{VOL}/ls")
    m = ds._vols.get(VOL)
    before = m.metrics()["listed_direct"]
    assert ds.__getitems__(list(range(24))) == list(files.values())
    assert m.metrics()["listed_direct"] - before == 24
    vol.write_bytes("/ls/x/005", b"changed")
    expect = list(files.values())
    expect[5] = b"changed"
    assert ds.__getitems__(list(range(24))) == expect
    loader = DataLoader(ds, batch_size=8, num_workers=2, collate_fn=list,
                        multiprocessing_context="spawn")
    assert [x for b in loader for x in b] == expect
    # a batch with URLs or a transform; a file removed since the listing: read by its path
    wu = JuiceDataset(f"juice://{VOL}/ls", with_url=True)
    assert wu.__getitems__([0, 5]) == [(f"juice://{VOL}/ls/x/000", files["/ls/x/000"]),
                                      (f"juice://{VOL}/ls/x/005", b"changed")]
    assert JuiceDataset(f"juice://{VOL}/ls", transform=len).__getitems__([1, 5, 2]) == [101, 7, 102]
    vol.remove("/ls/x/007")
    with pytest.raises(FileNotFoundError, match="/ls/x/007"):
        ds.__getitems__([6, 7])


def test_manifest_roundtrip_local_and_juice(vol, tmp_path):
    vol.makedirs("/m/x")
    for i in range(5):
        vol.write_bytes(f"/m/x/{i}", bytes([i]) * (i + 1))
    ds = JuiceDataset(f"juice://{VOL}/m")
    ds.save_manifest(str(tmp_path / "man.json"))
    vol.makedirs("/manifests")
    ds.save_manifest(f"juice://{VOL}/manifests/m.json")
    for src in (str(tmp_path / "man.json"), f"juice://{VOL}/manifests/m.json"):
        back = JuiceDataset.from_manifest(src, transform=len)
        assert list(back.urls) == list(ds.urls)
        assert [back.urls.size(i) for i in range(5)] == [1, 2, 3, 4, 5]
        assert [back[i] for i in range(5)] == [1, 2, 3, 4, 5]
    assert sorted(vol.listdir("/manifests")) == ["m.json"]          # no temporary left behind
    (tmp_path / "bad.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a torchjuice manifest"):
        JuiceDataset.from_manifest(str(tmp_path / "bad.json"))


def test_dataset_distributed_sampler_and_workers(vol):
    vol.makedirs("/f")
    for i in range(23):
        vol.write_bytes(f"/f/{i:02d}", str(i).encode())
    ds = JuiceDataset(f"juice://{VOL}/f", transform=int)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
        sampler.set_epoch(1)
        loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=2)
        seen += [int(x) for b in loader for x in b]
    # DistributedSampler pads to an even split: one item is seen twice, none is missing
    assert sorted(set(seen)) == list(range(23)) and len(seen) == 24
    assert pickle.loads(pickle.dumps(ds))[5] == 5
    assert ds.__getitems__([3, 1, 2]) == [3, 1, 2]


def test_batch_reads_inline_while_fast_on_threads_while_slow(vol, monkeypatch):
    """__getitems__ reads local files inline (no thread hand-off), switches to threads once a read
    is slow (remote), and back once reads are fast again; items keep their order either way."""
    import torchjuice.data as data_mod
    vol.makedirs("/f")
    for i in range(40):
        vol.write_bytes(f"/f/{i:02d}", str(i).encode())
    ds = JuiceDataset(f"juice://{VOL}/f", transform=int)
    batch = list(range(39, -1, -3))
    monkeypatch.setattr(data_mod, "SLOW_READ", 60.0)           # every read is fast (a busy machine)
    txns = []
    meta = ds._vols.locate(ds.urls[0])[0].meta
    real_txn = meta.txn
    meta.txn = lambda fn, **kw: txns.append(kw) or real_txn(fn, **kw)
    try:
        assert ds.__getitems__(batch) == batch and ds._pool is None and not ds._threaded
    finally:
        del meta.txn
    # inline: a probe of INLINE_GROUP files in one metadata transaction, then INLINE_MAX per one
    rest = len(batch) - data_mod.INLINE_GROUP
    assert len(txns) == 1 + -(-rest // data_mod.INLINE_MAX)
    # read epoch after epoch: a cold pass waits for the cache fill rather than skip blocks
    assert ds._vols.get(VOL).cache_fill == "wait"
    monkeypatch.setattr(data_mod, "SLOW_READ", -1.0)           # every read is "slow" now
    # ... but a file:// store is local: nothing fetched from afar, no latency to overlap
    assert ds.__getitems__(batch) == batch and ds._pool is None and not ds._threaded
    fetched = iter(range(10 ** 6))                           # as if every read went to S3
    monkeypatch.setattr(data_mod._Volumes, "remote_gets", lambda self: next(fetched))
    assert ds.__getitems__(batch) == batch and ds._pool is not None and ds._threaded
    assert ds.__getitems__(batch) == batch and ds._threaded
    monkeypatch.setattr(data_mod, "SLOW_READ", 60.0)
    assert ds.__getitems__(batch) == batch and not ds._threaded
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._pool is None and not clone._threaded and clone.__getitems__([5, 4]) == [5, 4]
    with pytest.raises(FileNotFoundError):
        JuiceDataset([f"juice://{VOL}/f/01", f"juice://{VOL}/f/nope"]).__getitems__([0, 1])


_REFAULTS = """
import os, resource, sys
from torchjuice.data import tune_malloc
if sys.argv[1] == "tune":
    assert tune_malloc()
def second_batch():
    fresh = [bytes(os.urandom(16)) * (100 << 10 >> 4) for _ in range(32)]
    del fresh
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fresh = [bytes(os.urandom(16)) * (100 << 10 >> 4) for _ in range(32)]
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(min(second_batch() for _ in range(3)))
"""


def _tuned_here(batch):              # a collate function: runs in the DataLoader worker
    import torchjuice.data as data_mod
    return data_mod._malloc_tuned_pid == os.getpid()


@pytest.mark.skipif(os.uname().sysname != "Linux", reason="glibc's mallopt")
def test_workers_keep_their_heap_between_batches(vol, monkeypatch):
    """A batch of 32 x 100 KiB freed and allocated again: a fresh process's glibc gives the freed
    heap top back to the kernel and faults in new pages (hundreds of faults); with the thresholds
    tune_malloc pins, the same pages are reused. A DataLoader worker reading through torchjuice
    pins them; TORCHJUICE_MALLOC_TUNE=0 leaves malloc alone."""
    import subprocess
    import sys

    def refaults(mode):
        out = subprocess.run([sys.executable, "-c", _REFAULTS, mode], capture_output=True,
                             text=True, check=True)
        return int(out.stdout)
    assert refaults("plain") > 200
    assert refaults("tune") < 50
    vol.makedirs("/f")
    vol.write_bytes("/f/a", b"x")
    ds = JuiceDataset(f"juice://{VOL}/f")

    def tuned():
        loader = DataLoader(ds, batch_size=1, num_workers=1, collate_fn=_tuned_here,
                            multiprocessing_context="fork")
        return next(iter(loader))
    assert tuned()
    monkeypatch.setenv("TORCHJUICE_MALLOC_TUNE", "0")
    assert not tuned()


def test_cache_fill_follows_the_data_set_size(vol, monkeypatch):
    """"auto": for a data set that fits in half the memory, "wait" (fill through the page cache)
    for small files, "adaptive" for files of BIG_FILE bytes and more on average; "direct" for a
    larger data set; in the dataset and in its pickled copies (workers); a mode can be given; a
    wrong one is an error."""
    import torchjuice.data as data_mod
    vol.makedirs("/f")
    for i in range(4):
        vol.write_bytes(f"/f/{i}", bytes(1000))
    write_shards(vol, 2, 3)
    assert JuiceDataset(f"juice://{VOL}/f")._vols.cache_fill == "wait"
    assert JuiceIterableDataset(f"juice://{VOL}/shards")._vols.cache_fill == "wait"
    monkeypatch.setattr(data_mod, "BIG_FILE", 1000)                  # files of 1000 B are big
    ds = JuiceDataset(f"juice://{VOL}/f")
    assert ds._vols.cache_fill == "adaptive"
    assert pickle.loads(pickle.dumps(ds))._vols.get(VOL).cache_fill == "adaptive"
    it = JuiceIterableDataset(f"juice://{VOL}/shards")
    # the volume the shards were sized through in this process (iterated without workers) too
    assert it._vols.cache_fill == "adaptive" and it._vols.get(VOL).cache_fill == "adaptive"
    vol.write_bytes("/f/small", b"x")                   # the average falls under 1000 bytes
    assert JuiceDataset(f"juice://{VOL}/f")._vols.cache_fill == "wait"
    vol.remove("/f/small")
    monkeypatch.setattr(data_mod, "_memory_bytes", lambda: 7000)     # a 3.5 KB page cache
    ds = JuiceDataset(f"juice://{VOL}/f")
    assert ds._vols.cache_fill == "direct"
    clone = pickle.loads(pickle.dumps(ds))
    assert clone[2] == bytes(1000) and clone._vols.get(VOL).cache_fill == "direct"
    it = JuiceIterableDataset(f"juice://{VOL}/shards")
    assert it._vols.cache_fill == "direct"
    assert JuiceDataset([f"juice://{VOL}/f/0"])._vols.cache_fill == "wait"     # sizes unknown
    assert JuiceDataset(f"juice://{VOL}/f", cache_fill="wait")._vols.cache_fill == "wait"
    assert JuiceIterableDataset(f"juice://{VOL}/shards",
                                cache_fill="skip")._vols.cache_fill == "skip"
    with pytest.raises(ValueError, match="cache_fill"):
        JuiceDataset(f"juice://{VOL}/f", cache_fill="sometimes")
    with pytest.raises(ValueError, match="cache_fill"):
        JuiceIterableDataset(f"juice://{VOL}/shards", cache_fill="always")


def test_prefetcher_reads_fast_files_inline_and_keeps_order(vol, monkeypatch):
    """Whole files are read in the consumer's thread, a probe group first; a shard window, or
    a slow group that went to a remote store, goes to the pool, and fast reads there come back;
    order and errors are kept."""
    import torchjuice.data as data_mod
    from torchjuice.data import Prefetcher, _Unit, _Volumes
    vol.makedirs("/p")
    for i in range(160):
        vol.write_bytes(f"/p/{i:03d}", str(i).encode())
    vol.write_bytes("/p/big", bytes(range(256)) * 40)
    units = [_Unit(i, f"juice://{VOL}/p/{i:03d}", 0, -1, True) for i in range(160)]
    units[70] = _Unit(70, f"juice://{VOL}/p/missing", 0, -1, True)
    units[80:81] = [_Unit(80, f"juice://{VOL}/p/big", 0, 4096, False),
                    _Unit(80, f"juice://{VOL}/p/big", 4096, -1, True)]
    monkeypatch.setattr(data_mod, "SLOW_READ", 60.0)
    from torchjuice.volume import Volume
    groups, real_many = [], Volume.read_many
    monkeypatch.setattr(Volume, "read_many",
                        lambda self, paths: groups.append(len(paths)) or real_many(self, paths))
    r = Prefetcher(_Volumes(), units, threads=4, max_units=8)
    modes, out = [], []
    for u, data in r:
        modes.append(r._inline)
        out.append(data)
    r.close()
    assert isinstance(out[70], FileNotFoundError)
    assert bytes(out[80]) + bytes(out[81]) == bytes(range(256)) * 40
    assert [int(d) for i, d in enumerate(out) if i not in (70, 80, 81)] == \
        [i for i in range(160) if i not in (70, 80)]
    assert all(modes[:60]) and not all(modes)                  # inline, pool around the window
    assert modes[-1]                                            # ... and back once fast
    assert groups[0] == data_mod.INLINE_GROUP                   # the probe
    assert max(groups) == data_mod.INLINE_MAX                   # then a transaction per group
    monkeypatch.setattr(data_mod, "SLOW_READ", -1.0)            # every read slow...
    r = Prefetcher(_Volumes(), units[:60], threads=4, max_units=8)
    assert [int(d) for _, d in r] == list(range(60)) and r._inline   # ... but local: inline
    r.close()
    gets = iter(range(1000))                                    # ... and remote: the pool
    monkeypatch.setattr(_Volumes, "remote_gets", lambda self: next(gets))
    del groups[:]
    r = Prefetcher(_Volumes(), units[:60], threads=4, max_units=8)
    assert [int(d) for _, d in r] == list(range(60)) and not r._inline
    assert groups == [data_mod.INLINE_GROUP]
    r.close()


# -- iterable: order, splitting, determinism -------------------------------------------------------
def run_rank(ds, workers: int, **kw) -> list[str]:
    loader = JuiceDataLoader(ds, batch_size=5, num_workers=workers, collate_fn=collate_keys, **kw)
    return [k for b in loader for k in b]


@pytest.mark.parametrize("shuffle", [False, True])
def test_each_sample_once_over_2_ranks_x_2_workers(vol, shuffle):
    keys = write_shards(vol, 7, 6)
    got = []
    for rank in range(2):
        ds = JuiceIterableDataset(f"juice://{VOL}/shards/{{000..006}}.tar", shuffle=shuffle,
                                  seed=1, rank=rank, world_size=2, buffer_size=4)
        ds.set_epoch(2)
        got += run_rank(ds, 2)
    assert sorted(got) == sorted(keys) and len(got) == len(keys)


def test_order_is_a_function_of_seed_and_epoch(vol):
    write_shards(vol, 6, 8)
    url = f"juice://{VOL}/shards/"

    def order(seed, epoch):
        ds = JuiceIterableDataset(url, shuffle=True, seed=seed, buffer_size=10)
        ds.set_epoch(epoch)
        return [s["__key__"] for s in ds]
    a = order(0, 0)
    assert order(0, 0) == a
    assert order(0, 1) != a and sorted(order(0, 1)) == sorted(a)
    assert order(1, 0) != a
    plain = [s["__key__"] for s in JuiceIterableDataset(url)]
    assert plain == sorted(plain)                       # no shuffle: shard order, member order


def test_sample_fields_and_whole_files(vol):
    vol.makedirs("/s")
    vol.write_bytes("/s/a.tar", tar_bytes([("dir/k1.jpg", b"J1"), ("dir/k1.CLS", b"1"),
                                           ("dir/k1.meta.json", b"{}"), ("k2.jpg", b"J2")]))
    samples = list(JuiceIterableDataset(f"juice://{VOL}/s/a.tar"))
    assert samples == [{"__key__": "dir/k1", "__url__": f"juice://{VOL}/s/a.tar", "jpg": b"J1",
                        "cls": b"1", "meta.json": b"{}"},
                       {"__key__": "k2", "__url__": f"juice://{VOL}/s/a.tar", "jpg": b"J2"}]
    vol.makedirs("/w/sub")
    vol.write_bytes("/w/x.png", b"P")
    vol.write_bytes("/w/sub/noext", b"N")
    ds = JuiceIterableDataset(f"juice://{VOL}/w", transform=lambda s: (s["__key__"], sorted(s)))
    assert list(ds) == [("/w/sub/noext", ["__key__", "__url__", "data"]),
                        ("/w/x", ["__key__", "__url__", "png"])]


def test_iterable_whole_files_of_a_directory_read_through_its_listing(vol):
    """JuiceIterableDataset over a directory of small files keeps the directory's listing: a
    group of its files read inline goes through it (no path lookups), a file changed after the
    listing is still read as it is now, and a group reaching past the directory goes by path."""
    from torchjuice.data import Prefetcher, plan_units
    vol.makedirs("/it/x")
    files = {f"/it/x/{i:03d}.bin": bytes([i]) * (100 + i) for i in range(40)}
    vol.write_many(files.items())
    vol.write_bytes("/lone.bin", b"lone")
    ds = JuiceIterableDataset([f"juice://{VOL}/lone.bin", f"juice://{VOL}/it"])
    assert [u for u, _ in ds.shards][:2] == [f"juice://{VOL}/lone.bin", f"juice://{VOL}/it/x/000.bin"]
    assert [(lo, hi) for lo, hi, *_ in ds._listed] == [(1, 41)]
    units = list(plan_units(ds.shards, range(len(ds.shards)), ds.read_size))
    reader = Prefetcher(ds._vols, [], listed=ds._listed)
    m = ds._vols.get(VOL).metrics

    def group(us):
        before = m()
        got = [d for _, d in reader._read_group(us)]
        after = m()
        return got, (after["listed_direct"] - before["listed_direct"],
                     after["listed_by_path"] - before["listed_by_path"])
    expect = list(files.values())
    assert group(units[1:33]) == (expect[:32], (32, 0))
    vol.write_bytes("/it/x/005.bin", b"changed")          # after the listing
    expect[5] = b"changed"
    assert group(units[1:33]) == (expect[:32], (31, 1))
    assert group(units[0:3]) == ([b"lone"] + expect[:2], (0, 0))    # not all listed: by path
    reader.close()
    assert [s["bin"] for s in ds] == [b"lone"] + expect


def test_long_names_pax_and_gnu(vol):
    long = "d" * 120 + "/" + "k" * 110
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        vol.write_bytes("/long.tar", tar_bytes([(f"{long}.txt", b"x" * 700), ("é.txt", b"e")], fmt))
        s = list(JuiceIterableDataset(f"juice://{VOL}/long.tar"))
        assert [(x["__key__"], x["txt"]) for x in s] == [(long, b"x" * 700), ("é", b"e")]


def test_shards_read_in_many_windows(vol):
    """Members straddle the read windows (64 KiB) and the next shard is read ahead."""
    vol.makedirs("/big")
    expect = {}
    for s in range(3):
        members = []
        for j in range(20):
            data = os.urandom(10_000 + 997 * j)
            members.append((f"k{s}-{j}.bin", data))
            expect[f"k{s}-{j}"] = data
        vol.write_bytes(f"/big/{s}.tar", tar_bytes(members))
    ds = JuiceIterableDataset(f"juice://{VOL}/big/{{0..2}}.tar", read_size=64 << 10,
                              prefetch_bytes=200 << 10, io_threads=3)
    got = {s["__key__"]: s["bin"] for s in ds}
    assert got == expect


# -- resume ------------------------------------------------------------------------------------------
def test_resume_direct_iteration_yields_exactly_the_rest(vol):
    write_shards(vol, 5, 7)
    url = f"juice://{VOL}/shards/"
    ds = JuiceIterableDataset(url, shuffle=True, seed=4, buffer_size=6)
    ds.set_epoch(3)
    full = [s["__key__"] for s in ds]
    it = iter(ds)
    head = [next(it)["__key__"] for _ in range(13)]
    state = ds.state_dict()
    assert state["epoch"] == 3 and state["positions"] == [13]
    it.close()
    fresh = JuiceIterableDataset(url, shuffle=True, seed=4, buffer_size=6)   # a new process
    fresh.load_state_dict(pickle.loads(pickle.dumps(state)))
    rest = [s["__key__"] for s in fresh]
    assert head + rest == full
    assert [s["__key__"] for s in fresh] == full          # the resume applies to one pass only
    fresh.set_epoch(4)
    assert fresh.state_dict()["positions"] == [0]
    other = JuiceIterableDataset(url, shuffle=True, seed=5, buffer_size=6)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


@pytest.mark.parametrize("persistent", [False, True])
def test_resume_with_workers_through_juice_dataloader(vol, persistent):
    keys = write_shards(vol, 6, 9)
    url = f"juice://{VOL}/shards/"

    def make():
        ds = JuiceIterableDataset(url, shuffle=True, seed=7, buffer_size=5)
        ds.set_epoch(1)
        return ds, JuiceDataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_keys,
                                   persistent_workers=persistent)
    ds, loader = make()
    full = [k for b in loader for k in b]
    assert sorted(full) == sorted(keys)
    it = iter(loader)
    head = [k for _ in range(5) for k in next(it)]
    state = ds.state_dict()
    assert state["num_workers"] == 2 and sum(state["positions"]) == len(head) == 20
    del it
    ds2, loader2 = make()
    ds2.load_state_dict(state)
    rest = [k for b in loader2 for k in b]
    assert sorted(head + rest) == sorted(keys) and len(head + rest) == len(keys)
    assert head + rest == full                 # same order as the uninterrupted epoch
    again = [k for b in loader2 for k in b]    # next pass: the whole epoch again
    assert again == full
    ds2.set_epoch(2)
    other = [k for b in loader2 for k in b]
    assert sorted(other) == sorted(keys) and other != full
    three = JuiceDataLoader(ds2, batch_size=4, num_workers=3, collate_fn=collate_keys)
    ds2.load_state_dict(state)
    with pytest.raises(ValueError, match="2 DataLoader workers"):
        list(three)


def test_state_dict_with_plain_dataloader_workers_is_refused(vol):
    write_shards(vol, 2, 3)
    ds = JuiceIterableDataset(f"juice://{VOL}/shards/")
    list(DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_keys))
    with pytest.raises(RuntimeError, match="JuiceDataLoader"):
        ds.state_dict()


# -- workers: fork, spawn, persistent; pickling -----------------------------------------------------
def test_spawn_workers_and_pickling(vol):
    keys = write_shards(vol, 4, 5)
    ds = JuiceIterableDataset(f"juice://{VOL}/shards/{{000..003}}.tar", shuffle=True)
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000 and b"torchjuice.volume" not in blob and b"ChunkStore" not in blob
    loader = JuiceDataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_keys,
                             multiprocessing_context="spawn")
    got = [k for b in loader for k in b]
    assert sorted(got) == sorted(keys)


def test_persistent_workers_follow_set_epoch(vol):
    keys = write_shards(vol, 4, 6)
    ds = JuiceIterableDataset(f"juice://{VOL}/shards/", shuffle=True, buffer_size=8)
    loader = JuiceDataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_keys,
                             persistent_workers=True, multiprocessing_context="fork")
    epochs = []
    for e in range(3):
        ds.set_epoch(e)
        epochs.append([k for b in loader for k in b])
    assert all(sorted(x) == sorted(keys) for x in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    ds.set_epoch(1)
    assert [k for b in loader for k in b] == epochs[1]


def test_s3_store_with_forked_workers(tmp_path, s3_server):
    meta = f"sqlite3://{tmp_path}/s3meta.db"
    tj.format(meta, "s3v", storage=s3_server.url())
    vol = tj.volume_for("s3v")
    try:
        keys = write_shards(vol, 3, 4)
        ds = JuiceIterableDataset("juice://s3v/shards/{000..002}.tar")
        got = [k for b in JuiceDataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_keys)
               for k in b]
        assert sorted(got) == sorted(keys)
    finally:
        vol.close()


def test_s3_batches_go_to_threads_only_while_they_fetch(tmp_path, s3_server, monkeypatch):
    """On an S3 volume, a slow batch that fetched from the server switches to threads (their
    latencies overlap); once the blocks are in the local disk cache, slow batches (a busy
    machine, big files) stay inline, since threads would only add hand-offs."""
    import torchjuice.data as data_mod
    meta = f"sqlite3://{tmp_path}/s3meta.db"
    tj.format(meta, "s3t", storage=s3_server.url())
    with tj.connect(meta, cache_size=0) as writer:               # another client: nothing cached
        writer.makedirs("/f")
        for i in range(20):
            writer.write_bytes(f"/f/{i:02d}", bytes(1000 + i))
    monkeypatch.setenv("TORCHJUICE_CACHE_DIR", str(tmp_path / "cache"))
    ds = JuiceDataset("juice://s3t/f", transform=len)
    try:
        monkeypatch.setattr(data_mod, "SLOW_READ", -1.0)       # every read counts as slow
        batch = list(range(20))
        assert ds.__getitems__(batch) == [1000 + i for i in batch]
        assert ds._threaded                                    # cold: fetched from the server
        ds._vols.get("s3t").chunks.drain_cache_fill()          # the blocks are in the disk cache
        assert ds.__getitems__(batch) == [1000 + i for i in batch]
        assert not ds._threaded                                # warm: from the disk cache
        assert ds.__getitems__(batch) == [1000 + i for i in batch] and not ds._threaded
        assert ds._vols.get("s3t").metrics()["cache_hits"] >= 40
    finally:
        ds._vols.get("s3t").close()


def test_sequential_cold_reads_fetch_the_next_files_blocks_ahead(tmp_path, s3_server, monkeypatch):
    """JuiceDataset's readahead: read in order from an S3 volume, the blocks of the next files
    are fetched in the background (each block still once); a shuffled order and a warm pass
    (nothing fetched from the server) start no readahead."""
    import random
    meta = f"sqlite3://{tmp_path}/s3meta.db"
    tj.format(meta, "s3ra", storage=s3_server.url("ra"), block_size=1 << 20)
    files = {f"/f/{i:04d}": random.Random(i).randbytes(20_000 + i) for i in range(400)}
    with tj.connect(meta, cache_size=0) as writer:
        writer.makedirs("/f")
        writer.write_many(files.items())                  # packed: ~50 files per object
        objects = len(list(writer.store.list("")))
    assert objects >= 6
    monkeypatch.setenv("TORCHJUICE_CACHE_DIR", str(tmp_path / "cache"))
    ds = JuiceDataset("juice://s3ra/f")
    vol = ds._vols.get("s3ra")
    try:
        assert [ds[i] for i in range(len(ds))] == list(files.values())
        ds._ahead.busy.result()
        m = vol.metrics()
        assert m["prefetch_count"] >= objects - 2          # all but the first block(s), ahead
        assert m["get_count"] <= objects                    # and each block fetched once
        vol.chunks.drain_cache_fill()
        before = vol.metrics()["prefetch_count"]
        assert [ds[i] for i in range(len(ds))] == list(files.values())     # warm: from the cache
        assert vol.metrics()["prefetch_count"] == before
    finally:
        vol.close()
    monkeypatch.setenv("TORCHJUICE_CACHE_DIR", str(tmp_path / "cache2"))
    shuffled = JuiceDataset("juice://s3ra/f")
    order = random.Random(0).sample(range(len(shuffled)), len(shuffled))
    vol = shuffled._vols.get("s3ra")
    try:
        assert [shuffled[i] for i in order] == [list(files.values())[i] for i in order]
        assert vol.metrics()["prefetch_count"] == 0
    finally:
        vol.close()
    # files one to an object: nothing to share, so no readahead (each read returns its own GET)
    with tj.connect(meta, cache_size=0) as writer:
        writer.makedirs("/big")
        for i in range(12):
            writer.write_bytes(f"/big/{i:02d}", bytes([i]) * 300_000)
    monkeypatch.setenv("TORCHJUICE_CACHE_DIR", str(tmp_path / "cache3"))
    alone = JuiceDataset("juice://s3ra/big")
    vol = alone._vols.get("s3ra")
    try:
        assert [alone[i] for i in range(12)] == [bytes([i]) * 300_000 for i in range(12)]
        assert vol.metrics()["prefetch_count"] == 0 and alone._ahead.off
    finally:
        vol.close()


# -- bad input ---------------------------------------------------------------------------------------
def test_missing_shard_and_empty_prefix(vol, caplog):
    write_shards(vol, 2, 3)
    with pytest.raises(FileNotFoundError, match="1 of 3 shards not found: .*002.tar"):
        JuiceIterableDataset(f"juice://{VOL}/shards/{{000..002}}.tar")
    with caplog.at_level(logging.WARNING, logger="torchjuice.data"):
        ds = JuiceIterableDataset(f"juice://{VOL}/shards/{{000..002}}.tar", handler=warn_and_continue)
    assert "002.tar" in caplog.text and len(list(ds)) == 6
    vol.makedirs("/void")
    with pytest.raises(ValueError, match="no files under"):
        JuiceIterableDataset(f"juice://{VOL}/void/")
    with pytest.raises(ValueError, match="rank"):
        JuiceIterableDataset(f"juice://{VOL}/shards/", rank=2, world_size=2)
    too_many = JuiceIterableDataset(f"juice://{VOL}/shards/", rank=0, world_size=3)
    with pytest.raises(ValueError, match="2 shards cannot be split over 3 ranks"):
        iter(too_many)


def test_more_workers_than_shards_is_logged_and_loses_nothing(vol, caplog):
    keys = write_shards(vol, 2, 4)
    ds = JuiceIterableDataset(f"juice://{VOL}/shards/")
    with caplog.at_level(logging.WARNING, logger="torchjuice.data"):
        got = run_rank(ds, 3, multiprocessing_context="fork")
    assert sorted(got) == sorted(keys)
    # the worker's warning is logged in the worker process: check the decision itself
    assert ds.worker_shards(0, 0, 1, 2, 3) == []


def corrupt_cases(vol) -> dict[str, bytes]:
    good = tar_bytes([(f"k{i}.bin", os.urandom(2000)) for i in range(4)])
    bad_header = bytearray(good)
    bad_header[2560 + 10] ^= 0xFF          # the second member's header (checksum no longer matches)
    return {"truncated-member": good[:2560 + 512 + 1000],
            "truncated-header": good[:2560 + 300],
            "corrupt-header": bytes(bad_header)}


@pytest.mark.parametrize("case", ["truncated-member", "truncated-header", "corrupt-header"])
def test_corrupt_or_truncated_tar_is_a_clear_error(vol, case):
    vol.makedirs("/bad")
    vol.write_bytes("/bad/x.tar", corrupt_cases(vol)[case])
    url = f"juice://{VOL}/bad/x.tar"
    with pytest.raises(ShardError) as e:
        list(JuiceIterableDataset(url))
    msg = str(e.value)
    assert url in msg and ("truncated" in msg or "corrupt" in msg)
    if case == "truncated-member":        # the sample before the cut member is whole: delivered
        assert "1 samples of this shard were read before the error" in msg


def test_warn_and_continue_skips_the_bad_shard_with_a_log(vol, caplog):
    keys = write_shards(vol, 2, 3)
    vol.write_bytes("/shards/002.tar", corrupt_cases(vol)["truncated-member"])
    ds = JuiceIterableDataset(f"juice://{VOL}/shards/", handler=warn_and_continue)
    with caplog.at_level(logging.WARNING, logger="torchjuice.data"):
        got = [s["__key__"] for s in ds]
    assert got == keys + ["k0"]
    assert "002.tar" in caplog.text and "truncated" in caplog.text


def test_transform_errors_follow_the_handler(vol, caplog):
    write_shards(vol, 1, 4)

    def picky(s):
        if s["__key__"].endswith("2"):
            raise ValueError("bad sample")
        return s["__key__"]
    url = f"juice://{VOL}/shards/"
    with pytest.raises(ValueError, match="bad sample"):
        list(JuiceIterableDataset(url, transform=picky))
    with caplog.at_level(logging.WARNING, logger="torchjuice.data"):
        got = list(JuiceIterableDataset(url, transform=picky, handler=warn_and_continue))
    assert got == ["s000-0000", "s000-0001", "s000-0003"] and "bad sample" in caplog.text


# -- webdataset --------------------------------------------------------------------------------------
def test_webdataset_juice_urls(vol):
    import webdataset as wds

    import torchjuice.webdataset  # noqa: F401
    keys = write_shards(vol, 3, 4, size=5000)
    ds = wds.WebDataset(f"juice://{VOL}/shards/{{000..002}}.tar", shardshuffle=False)
    samples = list(ds)
    assert [s["__key__"] for s in samples] == keys
    assert samples[1]["bin"] == payload(keys[1], 5001)
    with wds.TarWriter(f"juice://{VOL}/out.tar") as w:          # writes go through gopen too
        w.write({"__key__": "a", "txt": "hello"})
    assert [s["txt"] for s in wds.WebDataset(f"juice://{VOL}/out.tar", shardshuffle=False)] == [b"hello"]


def test_webdataset_shards_fill_the_cache_as_the_datasets_do(vol, monkeypatch):
    """A juice:// shard read by webdataset sets the fill the datasets' "auto" picks for it:
    "wait" under BIG_FILE, "adaptive" from it on."""
    import torchjuice.data as data_mod
    from torchjuice.webdataset import ShardReader
    write_shards(vol, 1, 4, size=5000)
    url = f"juice://{VOL}/shards/000.tar"
    with ShardReader(url) as r:
        assert r.read(512) and tj.volume_for(VOL).cache_fill == "wait"
    monkeypatch.setattr(data_mod, "BIG_FILE", 1000)
    with ShardReader(url) as r:
        assert r.read(512) and tj.volume_for(VOL).cache_fill == "adaptive"


def test_fork_while_the_cache_lock_is_held(tmp_path):
    """A DataLoader forks its workers while the parent's threads use the volume: a child must not
    inherit the disk cache's lock (it would keep every process out of the cache for good)."""
    import threading
    import time

    from torchjuice.chunk.disk import DiskCache
    cache = DiskCache(str(tmp_path / "cache"), "uuid-1", 1 << 20, 0.0)
    inside = threading.Event()

    def hold():
        with cache._locked():
            inside.set()
            time.sleep(0.3)
    t = threading.Thread(target=hold)
    t.start()
    inside.wait()
    pid = os.fork()                 # waits until the lock is released
    if pid == 0:
        import signal
        signal.alarm(10)
        with cache._locked():
            pass
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    t.join()
    assert os.waitstatus_to_exitcode(status) == 0
