"""The data path and the Volume API, on every metadata engine and every object store."""
from __future__ import annotations

import errno
import hashlib
import io
import os
import subprocess
import sys
import textwrap

import pytest

import torchjuice as tj
from conftest import META_ENGINES, STORES, make_meta_url, make_store_url
from torchjuice.meta import CHUNK_SIZE

MiB = 1 << 20


def _new_volume(request, tmp_path, engine, store, name="testvol", **fmt):
    meta = make_meta_url(engine, request, tmp_path)
    storage = make_store_url(store, request, tmp_path)
    tj.format(meta, name, storage=storage, **fmt)
    vol = tj.connect(meta)
    request.addfinalizer(vol.close)
    return vol


@pytest.fixture
def vol(request, tmp_path):
    """SQLite + local directory: the embedded default."""
    return _new_volume(request, tmp_path, "sqlite", "file", block_size=1 * MiB)


@pytest.fixture(params=[(e, s) for e in META_ENGINES for s in STORES],
                ids=lambda p: f"{p[0]}-{p[1]}")
def any_vol(request, tmp_path):
    engine, store = request.param
    return _new_volume(request, tmp_path, engine, store, block_size=1 * MiB)


def pattern(n: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating-per-block bytes."""
    base = hashlib.sha256(str(seed).encode()).digest()
    reps = n // len(base) + 1
    raw = bytearray(base * reps)[:n]
    for i in range(0, n, 4096):               # vary each page so misplaced pages show
        raw[i: i + 8] = i.to_bytes(8, "little")
    return bytes(raw[:n])


# -- data path on every engine x store -------------------------------------------------------------
def test_roundtrip_every_engine_and_store(any_vol):
    data = pattern(3 * MiB + 12345)
    any_vol.makedirs("/dir")
    with any_vol.open("/dir/a.bin", "wb") as f:
        f.write(data)
    assert any_vol.read_bytes("/dir/a.bin") == data
    assert any_vol.stat("/dir/a.bin").st_size == len(data)
    with any_vol.open("/dir/a.bin", "r+b") as f:     # overwrite across a block boundary
        f.seek(MiB - 10)
        f.write(b"X" * 20)
    expect = data[: MiB - 10] + b"X" * 20 + data[MiB + 10:]
    assert any_vol.read_bytes("/dir/a.bin") == expect
    any_vol.rename("/dir/a.bin", "/b.bin")
    assert not any_vol.exists("/dir/a.bin")
    assert any_vol.read_bytes("/b.bin") == expect
    any_vol.remove("/b.bin")
    assert any_vol.listdir("/") == ["dir"]


BIG_SCRIPT = textwrap.dedent("""
    import hashlib, sys, torchjuice as tj
    vol = tj.connect(sys.argv[1])
    with vol.open(sys.argv[2], "rb") as f:
        h = hashlib.sha256()
        while True:
            b = f.read(8 << 20)
            if not b:
                break
            h.update(b)
    print(vol.stat(sys.argv[2]).st_size, h.hexdigest())
""")


@pytest.mark.parametrize("engine", META_ENGINES)
@pytest.mark.parametrize("store", ["file", "s3"])
def test_64mib_file_edited_then_read_in_another_process(request, tmp_path, engine, store):
    """The issue's acceptance test: write 64 MiB, overwrite the middle, append, truncate, rename;
    another process reads it back byte-identical."""
    meta = make_meta_url(engine, request, tmp_path)
    tj.format(meta, "bigvol", storage=make_store_url(store, request, tmp_path))
    vol = tj.connect(meta)
    request.addfinalizer(vol.close)
    data = bytearray(pattern(64 * MiB, 1))
    with vol.open("/big.bin", "wb") as f:
        for i in range(0, len(data), 3 * MiB + 7):   # odd write sizes
            f.write(data[i: i + 3 * MiB + 7])
    with vol.open("/big.bin", "r+b") as f:
        f.seek(30 * MiB + 5)
        f.write(b"\xab" * (2 * MiB))
    data[30 * MiB + 5: 32 * MiB + 5] = b"\xab" * (2 * MiB)
    with vol.open("/big.bin", "ab") as f:            # crosses into chunk 1
        f.write(pattern(5 * MiB, 2))
    data += pattern(5 * MiB, 2)
    vol.truncate("/big.bin", 66 * MiB + 3)
    del data[66 * MiB + 3:]
    vol.rename("/big.bin", "/final.bin")
    out = subprocess.run([sys.executable, "-c", BIG_SCRIPT, meta, "/final.bin"], check=True,
                         capture_output=True, text=True, env=dict(os.environ)).stdout.split()
    assert out == [str(len(data)), hashlib.sha256(data).hexdigest()]


# -- file semantics ------------------------------------------------------------------------------------
def test_sparse_file_reads_zeros_in_holes(vol):
    with vol.open("/sparse", "wb") as f:
        f.seek(5 * MiB)
        f.write(b"end")
    assert vol.stat("/sparse").st_size == 5 * MiB + 3
    with vol.open("/sparse", "rb") as f:
        assert f.read(5 * MiB) == bytes(5 * MiB)
        assert f.read() == b"end"


def test_write_across_chunk_boundary(vol):
    off = CHUNK_SIZE - 100
    with vol.open("/x", "wb") as f:
        f.seek(off)
        f.write(b"a" * 300)
    with vol.open("/x", "rb") as f:
        f.seek(off - 2)
        assert f.read() == b"\0\0" + b"a" * 300
    info = vol.info("/x")
    assert [c["index"] for c in info["chunks"]] == [0, 1]


def test_truncate_shrink_then_grow_reads_zeros(vol):
    vol.write_bytes("/t", b"abcdefghij" * 1000)
    vol.truncate("/t", 5)
    assert vol.read_bytes("/t") == b"abcde"
    vol.truncate("/t", 20)
    assert vol.read_bytes("/t") == b"abcde" + bytes(15)
    with vol.open("/t", "r+b") as f:
        f.truncate(2)
        f.seek(0, io.SEEK_END)
        assert f.tell() == 2


def test_modes(vol):
    vol.write_bytes("/m", b"hello")
    with vol.open("/m", "ab") as f:
        f.write(b" world")
    assert vol.read_bytes("/m") == b"hello world"
    with pytest.raises(FileExistsError):
        vol.open("/m", "xb")
    with vol.open("/new", "xb") as f:
        f.write(b"1")
    with vol.open("/m", "wb") as f:                  # truncates
        f.write(b"z")
    assert vol.read_bytes("/m") == b"z"
    with vol.open("/m", "r+b") as f:
        assert f.read() == b"z"
        f.write(b"yy")
        f.seek(0)
        assert f.read() == b"zyy"
    with pytest.raises(FileNotFoundError):
        vol.open("/nope", "rb")
    with pytest.raises(FileNotFoundError):
        vol.open("/nope", "r+b")
    with pytest.raises(ValueError):
        vol.open("/m", "rw")
    with vol.open("/m", "rb") as f, pytest.raises(io.UnsupportedOperation):
        f.write(b"no")


def test_text_mode_readline_and_iteration(vol):
    with vol.open("/t.txt", "w") as f:
        f.write("one\ntwo\nthree ünïcode\n")
    with vol.open("/t.txt") as f:
        assert f.readline() == "one\n"
        assert list(f) == ["two\n", "three ünïcode\n"]
    with vol.open("/t.txt", "rb") as f:
        assert f.readline() == b"one\n"
        assert f.tell() == 4


def test_readinto_and_seek(vol):
    data = pattern(2 * MiB + 3)
    vol.write_bytes("/r", data)
    buf = bytearray(MiB)
    with vol.open("/r", "rb", buffering=0) as f:
        f.seek(MiB + 1)
        assert f.readinto(buf) == MiB
        assert bytes(buf) == data[MiB + 1: 2 * MiB + 1]
        assert f.readinto(buf) == 2
        assert f.readinto(buf) == 0
        f.seek(-3, io.SEEK_END)
        assert f.read() == data[-3:]
        with pytest.raises(OSError):
            f.seek(-1)


def test_read_own_unflushed_writes(vol):
    with vol.open("/rw", "w+b") as f:
        f.write(b"abc")
        f.seek(0)
        assert f.read() == b"abc"


def test_read_bytes_every_engine_and_store(any_vol):
    """read_bytes (one metadata transaction, whole blocks as bytes) gives what open+read gives,
    for every layout: empty, one block, block edges, several slices, holes, a truncated slice."""
    v, bs = any_vol, 1 * MiB
    cases = {"/empty": b"", "/one": b"x", "/small": pattern(100_000, 1), "/block": pattern(bs, 2),
             "/block1": pattern(bs + 1, 3), "/big": pattern(3 * bs + 7, 4)}
    for path, data in cases.items():
        v.write_bytes(path, data)
    with v.open("/edited", "wb") as f:                # two slices in one block
        f.write(pattern(200_000, 5))
    with v.open("/edited", "r+b") as f:
        f.seek(50_000)
        f.write(b"E" * 1000)
    cases["/edited"] = pattern(200_000, 5)[:50_000] + b"E" * 1000 + pattern(200_000, 5)[51_000:]
    with v.open("/sparse", "wb") as f:                # a hole, then data past it
        f.seek(CHUNK_SIZE + 10)
        f.write(b"tail")
    cases["/sparse"] = bytes(CHUNK_SIZE + 10) + b"tail"
    v.write_bytes("/cut", pattern(300_000, 6))       # its slice is longer than the file now
    v.truncate("/cut", 1000)
    cases["/cut"] = pattern(300_000, 6)[:1000]
    v.symlink("/small", "/link")
    cases["/link"] = cases["/small"]
    for path, data in cases.items():
        got = v.read_bytes(path)
        assert type(got) is bytes and got == data, path
        with v.open(path, "rb") as f:
            assert f.read() == data
    v.makedirs("/dir")
    with pytest.raises(IsADirectoryError):
        v.read_bytes("/dir")
    with pytest.raises(FileNotFoundError) as ei:
        v.read_bytes("missing/x")
    assert ei.value.filename == "missing/x"
    with pytest.raises(NotADirectoryError):
        v.read_bytes("/small/x")


def test_norm_every_spelling(vol):
    """norm's fast path (a path already normal) and its slow path agree with a reference on
    random spellings; '..' above the root is refused."""
    import random
    from torchjuice.errors import PathEscapeError

    def reference(path):
        parts = []
        for p in path.split("/"):
            if p in ("", "."):
                continue
            if p == "..":
                if not parts:
                    return None
                parts.pop()
            else:
                parts.append(p)
        return "/" + "/".join(parts)
    rng = random.Random(7)
    names = ["a", "b.c", ".h", "...", "..", ".", "", "x.", "é"]
    for _ in range(3000):
        path = rng.choice(["", "/"]) + "/".join(rng.choice(names) for _ in range(rng.randint(0, 5)))
        want = reference(path)
        if want is None:
            with pytest.raises(PathEscapeError):
                vol.norm(path)
        else:
            assert vol.norm(path) == want, path
    with pytest.raises(OSError):
        vol.norm("/a\0b")


def test_read_many(any_vol):
    """read_many == read_bytes of each path, one metadata transaction; the first bad path
    raises the error read_bytes raises for it."""
    v = any_vol
    v.makedirs("/a/b")
    data = {f"/a/b/f{i}": pattern(1000 * i + 1, i) for i in range(6)}
    data["/a/big"] = pattern(3 * MiB + 5, 9)
    data["/a/empty"] = b""
    for p, d in data.items():
        v.write_bytes(p, d)
    v.symlink("/a/b/f2", "/a/link")
    data["/a/link"] = data["/a/b/f2"]
    paths = list(data)
    calls = []
    real = v.meta.txn
    v.meta.txn = lambda fn, **kw: calls.append(kw) or real(fn, **kw)
    try:
        got = v.read_many(paths)
    finally:
        del v.meta.txn
    assert got == [data[p] for p in paths] and all(type(g) is bytes for g in got)
    assert calls == [{"readonly": True}]
    with pytest.raises(FileNotFoundError) as ei:
        v.read_many(["/a/b/f1", "a/missing", "/a/b/f2"])
    assert ei.value.filename == "a/missing"
    with pytest.raises(IsADirectoryError):
        v.read_many(["/a/b"])
    assert v.read_many([]) == []


def test_read_listed_reads_each_file_as_it_is_now(any_vol):
    """list_tree + read_listed: files unchanged since the listing are read from the block it
    recorded, after one metadata read for the batch; any change to a file, or to a directory
    on its path, sends that file by path -- the result is always the file as it is now."""
    v = any_vol
    v.makedirs("/t/a")
    v.makedirs("/t/b/c")
    v.makedirs("/elsewhere")
    data = {f"/t/a/f{i}": pattern(500 + i, i) for i in range(6)}
    data["/t/b/c/deep"] = pattern(700, 20)
    data["/t/b/big"] = pattern(MiB + 5, 21)           # more than a block: by path
    data["/t/empty"] = b""                              # no block: by path
    v.write_many(list(data.items()))                    # packed, as cp does
    v.write_bytes("/elsewhere/x", pattern(900, 30))
    v.write_bytes("/t/b/c/deep", data["/t/b/c/deep"])   # one file alone in its block
    files, listing = v.list_tree("t/")
    paths = [p for p, _ in files]
    assert paths == sorted(data) and [n for _, n in files] == [len(data[p]) for p in paths]
    assert len(listing) == len(paths)
    index = {p: k for k, p in enumerate(paths)}
    some = [index[p] for p in ("/t/a/f0", "/t/a/f1", "/t/a/f2", "/t/b/c/deep", "/t/b/big")]

    def read(ks):
        m = v.metrics()
        got = v.read_listed(listing, ks, [paths[k] for k in ks])
        after = v.metrics()
        return got, (after["listed_direct"] - m["listed_direct"],
                     after["listed_by_path"] - m["listed_by_path"])

    def now(ks):
        return [v.read_bytes(paths[k]) for k in ks]

    looked = []                                         # per-file attribute reads
    real = v.meta.raw_attrs

    def raw_attrs(inodes, since=None):
        got = real(inodes, since)
        if got is not None:
            looked.append(inodes)
        return got
    v.meta.raw_attrs = raw_attrs
    got, counts = read(list(range(len(paths))))
    assert got == [data[p] for p in paths] and counts == (len(paths) - 2, 2)
    assert looked == []             # nothing changed in the volume: its change count told so
    v.write_bytes("/elsewhere/y", b"elsewhere")         # a change outside the listed tree
    got, counts = read(some)
    assert got == now(some) and counts == (4, 1) and len(looked) == 1
    v.write_bytes("/t/a/f0", pattern(500, 99))          # same length, new bytes
    got, counts = read(some)
    assert got == now(some) and got[0] == pattern(500, 99) and counts == (3, 2)
    v.truncate("/t/a/f1", 100)
    got, counts = read(some)
    assert got == now(some) and len(got[1]) == 100 and counts == (2, 3)
    v.rename("/elsewhere/x", "/t/a/f2")                 # replaced: /t/a changed, all of it by path
    got, counts = read(some)
    assert got == now(some) and got[2] == pattern(900, 30) and counts == (1, 4)
    with v.open("/t/b/c/deep", "ab") as f:              # appended to
        f.write(b"more")
    got, counts = read(some)
    assert got == now(some) and got[3].endswith(b"more") and counts == (0, 5)
    v.remove("/t/a/f3")
    with pytest.raises(FileNotFoundError):
        v.read_listed(listing, [index["/t/a/f3"]], ["/t/a/f3"])
    v.rename("/t", "/old")                              # the top replaced by another tree
    v.makedirs("/t/a")
    v.write_bytes("/t/a/f4", b"another tree")
    assert read([index["/t/a/f4"]]) == ([b"another tree"], (0, 1))
    with pytest.raises(FileNotFoundError):
        v.list_tree("/missing")
    with pytest.raises(NotADirectoryError):
        v.list_tree("/t/a/f4")


def test_read_bytes_is_one_metadata_transaction(vol):
    vol.makedirs("/a/b")
    vol.write_bytes("/a/b/f", pattern(100_000))
    calls = []
    real_txn, real_open = vol.meta.txn, vol.meta.open_file
    vol.meta.txn = lambda fn, **kw: calls.append(kw) or real_txn(fn, **kw)
    vol.meta.open_file = lambda ino: calls.append("open_file") or real_open(ino)
    try:
        assert vol.read_bytes("/a/b/f") == pattern(100_000)
    finally:
        del vol.meta.txn, vol.meta.open_file
    assert calls == [{"readonly": True}]


def test_read_bytes_looks_again_when_a_block_vanishes(request, tmp_path):
    """A read that resolved the file just before it was rewritten (its old blocks deleted) reads
    the new version; a block that is really missing is an error, not a loop."""
    vol = _new_volume(request, tmp_path, "sqlite", "file", block_size=1 * MiB, trash_days=0)
    for path in ("/small", "/big"):
        vol.write_bytes(path, pattern(1000 if path == "/small" else 3 * MiB, 1))
        stale = vol.meta.resolve_slices(path)
        vol.write_bytes(path, pattern(2000 if path == "/small" else 3 * MiB, 2))   # old blocks freed
        real = vol.meta.resolve_slices
        answers = [stale]
        vol.meta.resolve_slices = lambda p, *a: answers.pop() if answers else real(p, *a)
        try:
            assert vol.read_bytes(path) == pattern(2000 if path == "/small" else 3 * MiB, 2)
        finally:
            del vol.meta.resolve_slices
        assert answers == []
        for obj in list(vol.store.list(f"{vol.name}/chunks/")):
            vol.store.delete(obj.key)
        with pytest.raises(FileNotFoundError):
            vol.read_bytes(path)


def test_close_to_open_between_two_clients(request, tmp_path):
    meta = make_meta_url("sqlite", request, tmp_path)
    tj.format(meta, "c2o", storage=make_store_url("file", request, tmp_path))
    a, b = tj.connect(meta), tj.connect(meta)
    request.addfinalizer(a.close)
    request.addfinalizer(b.close)
    f = a.open("/f", "wb")
    f.write(b"v1")
    f.close()
    assert b.read_bytes("/f") == b"v1"
    with a.open("/f", "ab") as f:
        f.write(b"+more")
    assert b.read_bytes("/f") == b"v1+more"


def test_removed_file_data_is_deleted_from_store(vol):
    vol.write_bytes("/gone", pattern(3 * MiB))
    assert len(list(vol.store.list(f"{vol.name}/chunks/"))) == 3
    vol.remove("/gone")                       # trash_days=1: kept in /.trash (test_ops)
    assert len(list(vol.store.list(f"{vol.name}/chunks/"))) == 3
    vol.trash_empty()
    assert list(vol.store.list(f"{vol.name}/chunks/")) == []


def test_open_then_unlinked_file_stays_readable_until_closed(request, tmp_path):
    vol = _new_volume(request, tmp_path, "sqlite", "file", block_size=1 * MiB, trash_days=0)
    vol.write_bytes("/o", b"still here")
    f = vol.open("/o", "rb")
    vol.remove("/o")
    assert not vol.exists("/o")
    assert f.read() == b"still here"
    f.close()
    assert list(vol.store.list(f"{vol.name}/chunks/")) == []


@pytest.mark.parametrize("compression", ["lz4", "zstd"])
def test_compressed_blocks(request, tmp_path, compression):
    vol = _new_volume(request, tmp_path, "sqlite", "file", block_size=256 << 10,
                      compression=compression)
    data = b"compressible " * 100_000 + pattern(300_000)
    vol.write_bytes("/c", data)
    assert vol.read_bytes("/c") == data
    with vol.open("/c", "rb") as f:
        f.seek(700_001)
        assert f.read(1000) == data[700_001: 701_001]
    stored = sum(o.size for o in vol.store.list(f"{vol.name}/chunks/"))
    assert stored < len(data) * 0.6


def _mixed_writes(vol, path: str) -> tuple[bytes, int]:
    """Write a file with large ``bytes`` writes (kept by reference, not copied), a small one in
    the middle of a block (the kept ones are then copied in), a ``bytearray`` and a partial last
    block; returns the expected content and how many block buffers were taken."""
    taken = []
    alloc = vol.chunks.alloc_block

    def counting():
        taken.append(1)
        return alloc()
    vol.chunks.alloc_block = counting
    parts = [pattern(256 << 10, i) for i in range(4)]           # one whole 1 MiB block
    parts += [pattern(300 << 10, 10), pattern(100, 11)]         # kept, then a small write
    parts += [bytearray(pattern(700 << 10, 12))]                 # a mutable buffer: copied
    parts += [pattern(MiB + (256 << 10), 13)]                    # a whole block by reference
    parts += [pattern(200 << 10, 14)]                            # a partial last block, kept
    try:
        with vol.open(path, "wb", buffering=0) as f:     # unbuffered, as the mount writes
            for p in parts:
                f.write(p)
                if isinstance(p, bytearray):
                    p[:] = bytes(len(p))            # the caller reuses its buffer at once
    finally:
        vol.chunks.alloc_block = alloc
    return b"".join(bytes(p) if not isinstance(p, bytearray) else b"" for p in parts[:6]) \
        + pattern(700 << 10, 12) + b"".join(parts[7:]), len(taken)


def test_large_bytes_writes_are_kept_not_copied(vol):
    want, taken = _mixed_writes(vol, "/m")
    assert vol.read_bytes("/m") == want
    # one buffer: the block of the small write, which the bytearray's bytes and the head of the
    # next large write then fill; the other blocks went to the store as the caller's bytes
    assert taken == 1
    sizes = sorted(o.size for o in vol.store.list(f"{vol.name}/chunks/"))
    assert sum(sizes) == len(want)


def test_kept_writes_every_engine_and_store(any_vol):
    want, _ = _mixed_writes(any_vol, "/m")
    assert any_vol.read_bytes("/m") == want


@pytest.mark.parametrize("mode", ["lz4", "writeback", "cache"])
def test_kept_writes_compressed_cached_or_written_back(request, tmp_path, mode):
    """Kept pieces are joined where a whole buffer is needed: compression, a cache copy, the
    write-back staging file."""
    opts = {"compression": "lz4"} if mode == "lz4" else {}
    vol = _new_volume(request, tmp_path, "sqlite", "file", block_size=1 * MiB, **opts)
    if mode != "lz4":
        vol.close()
        vol = tj.connect(vol.meta.url, cache_dir=str(tmp_path / "cache"),
                         writeback=mode == "writeback")
        request.addfinalizer(vol.close)
    want, _ = _mixed_writes(vol, "/m")
    if mode == "writeback":
        assert vol.chunks.wait_writeback(timeout=30)
    assert vol.read_bytes("/m") == want
    if mode == "cache":              # the cache's copies (written in the background) are whole
        import time
        objs = list(vol.store.list(f"{vol.name}/chunks/"))
        deadline = time.time() + 30
        while not all(vol.chunks.cache.contains(o.key) for o in objs) and time.time() < deadline:
            time.sleep(0.05)
        for o in objs:
            assert vol.chunks.cache.read_bytes(o.key, o.size) == vol.store.get(o.key)


def test_corrupt_block_is_an_error_not_wrong_data(vol):
    vol.write_bytes("/c", pattern(2 * MiB))
    key = next(iter(vol.store.list(f"{vol.name}/chunks/"))).key
    vol.store.put(key, b"short")
    with pytest.raises(tj.CorruptBlockError):
        vol.read_bytes("/c")


# -- names ---------------------------------------------------------------------------------------------
def test_namespace_operations(vol):
    vol.makedirs("/a/b/c", exist_ok=True)
    vol.makedirs("/a/b", exist_ok=True)
    with pytest.raises(FileExistsError):
        vol.makedirs("/a/b")
    vol.write_bytes("/a/b/f", b"1")
    assert vol.listdir("/a/b") == ["c", "f"]
    assert sorted(vol.walk("/a")) == [("/a", ["b"], []), ("/a/b", ["c"], ["f"]), ("/a/b/c", [], [])]
    with pytest.raises(OSError) as e:
        vol.rmdir("/a/b")
    assert e.value.errno == errno.ENOTEMPTY
    with pytest.raises(NotADirectoryError):
        vol.listdir("/a/b/f")
    with pytest.raises(IsADirectoryError):
        vol.open("/a/b", "rb")
    with pytest.raises(IsADirectoryError):
        vol.remove("/a/b")
    vol.symlink("b/f", "/a/link")
    assert vol.readlink("/a/link") == "b/f"
    assert vol.read_bytes("/a/link") == b"1"
    vol.link("/a/b/f", "/a/hard")
    assert vol.stat("/a/hard").st_nlink == 2
    vol.setxattr("/a/b/f", "user.k", b"v")
    assert vol.getxattr("/a/b/f", "user.k") == b"v"
    vol.chmod("/a/b/f", 0o600)
    assert vol.stat("/a/b/f").st_mode & 0o777 == 0o600
    vol.utime("/a/b/f", (1000.0, 2000.0))
    assert vol.stat("/a/b/f").st_mtime == 2000.0
    vol.rmtree("/a")
    assert vol.listdir("/") == []


def test_dotdot_cannot_escape_the_root(vol):
    vol.makedirs("/a")
    vol.write_bytes("/a/../top", b"ok")            # .. inside the volume is fine
    assert vol.read_bytes("/top") == b"ok"
    for bad in ("/../etc/passwd", "../x", "/a/../../x"):
        with pytest.raises(PermissionError) as e:
            vol.open(bad, "rb")
        assert isinstance(e.value, tj.PathEscapeError) and "climbs above" in str(e.value)


def test_closed_volume_refuses_operations(vol):
    f = vol.open("/pending", "wb")
    f.write(b"flushed at close")
    vol.close()
    with pytest.raises(tj.ClosedVolumeError):
        vol.listdir("/")
    assert isinstance(tj.ClosedVolumeError("x"), OSError)


def test_files_are_flushed_when_the_volume_closes(request, tmp_path):
    meta = make_meta_url("sqlite", request, tmp_path)
    tj.format(meta, "flushvol", storage=make_store_url("file", request, tmp_path))
    vol = tj.connect(meta)
    f = vol.open("/pending", "wb")
    f.write(b"flushed at close")
    vol.close()
    with tj.connect(meta) as again:
        assert again.read_bytes("/pending") == b"flushed at close"


# -- formatting, URLs and bad input ------------------------------------------------------------------------
def test_format_twice_needs_force(tmp_path):
    meta = f"sqlite3://{tmp_path}/m.db"
    fmt = tj.format(meta, "v1", storage=f"file://{tmp_path}/d")
    with pytest.raises(tj.AlreadyFormattedError) as e:
        tj.format(meta, "v1", storage=f"file://{tmp_path}/d")
    assert isinstance(e.value, FileExistsError) and "force" in str(e.value)
    again = tj.format(meta, "v1", storage=f"file://{tmp_path}/d", trash_days=3, force=True)
    assert again.uuid == fmt.uuid and again.trash_days == 3
    with pytest.raises(tj.AlreadyFormattedError):
        tj.format(meta, "other", storage=f"file://{tmp_path}/d", force=True)


def test_embedded_default_and_registry(tmp_path):
    tj.format(None, "embedded")
    with tj.connect("embedded") as vol:
        vol.write_bytes("/x", b"1")
    with tj.open_url("juice://embedded/x") as f:
        assert f.read() == b"1"


def test_unformatted_and_unknown(tmp_path):
    with pytest.raises(tj.NotFormattedError) as e:
        tj.connect(f"sqlite3://{tmp_path}/empty.db")
    assert "format" in str(e.value)
    with pytest.raises(tj.NotFormattedError):
        tj.connect("never-formatted")
    with pytest.raises(tj.InvalidURLError) as e:
        tj.connect("mysqlx://nowhere/1")
    assert isinstance(e.value, ValueError) and isinstance(e.value, OSError)
    with pytest.raises(tj.InvalidURLError):
        tj.format(f"sqlite3://{tmp_path}/m.db", "v", storage="ftp://host/x")
    with pytest.raises(tj.InvalidURLError):
        tj.format(f"sqlite3://{tmp_path}/m.db", "bad/name")
    with pytest.raises(tj.InvalidURLError):
        tj.open_url("s3://bucket/x")


def test_url_volume_name_must_match(tmp_path, monkeypatch):
    meta = f"sqlite3://{tmp_path}/m.db"
    tj.format(meta, "real", storage=f"file://{tmp_path}/d")
    monkeypatch.setenv("TORCHJUICE_META", meta)
    with pytest.raises(tj.VolumeMismatchError) as e:
        tj.open_url("juice://other/x", "wb")
    assert "other" in str(e.value) and "real" in str(e.value)


def test_dead_s3_endpoint_is_a_clear_error(tmp_path):
    from servers import free_port
    port = free_port()
    with pytest.raises(ConnectionError) as e:
        tj.format(f"sqlite3://{tmp_path}/m.db", "v",
                  storage=f"s3://b?endpoint=http://127.0.0.1:{port}&region=us-east-1")
    assert str(port) in str(e.value)


# -- faults ------------------------------------------------------------------------------------------
def _faulty_volume(request, tmp_path):
    from torchjuice.meta import new_meta
    from torchjuice.object import create_store
    from torchjuice.object.fault import FaultyStore
    meta_url = f"sqlite3://{tmp_path}/f.db"
    tj.format(meta_url, "faulty", storage=f"file://{tmp_path}/fb", block_size=1 * MiB)
    meta = new_meta(meta_url)
    fmt = meta.load()
    store = FaultyStore(create_store(fmt.storage))
    vol = tj.Volume(meta, fmt, store)
    request.addfinalizer(vol.close)
    return vol, store


def test_failed_upload_commits_nothing_and_loses_nothing(request, tmp_path):
    vol, store = _faulty_volume(request, tmp_path)
    v1 = pattern(3 * MiB, 5)
    vol.write_bytes("/f", v1)
    store.fail_always(True, ops=["put"])
    f = vol.open("/f", "ab")
    f.write(pattern(2 * MiB, 6))
    with pytest.raises(OSError):
        f.close()
    store.fail_always(False)
    assert vol.read_bytes("/f") == v1                 # the committed bytes are intact
    assert vol.stat("/f").st_size == len(v1)
    with vol.open("/f", "ab") as f:                   # and the volume keeps working
        f.write(b"more")
    assert vol.read_bytes("/f") == v1 + b"more"


def test_failed_download_raises_instead_of_returning_wrong_bytes(request, tmp_path):
    vol, store = _faulty_volume(request, tmp_path)
    vol.write_bytes("/g", pattern(2 * MiB, 7))
    store.fail_always(True, ops=["get"])              # a transient failure is retried (test_ops)
    with pytest.raises(OSError):
        vol.read_bytes("/g")
    store.fail_always(False)
    assert vol.read_bytes("/g") == pattern(2 * MiB, 7)
