"""Block cache, readahead, single-flight, write-back, warmup and stats."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import torchjuice as tj
from torchjuice.chunk.disk import DiskCache, trailer_size
from torchjuice.meta import new_meta
from torchjuice.object import create_store
from torchjuice.object.fault import FaultyStore

MiB = 1 << 20


@pytest.fixture
def setup(tmp_path):
    """A formatted volume on a file store, and a function connecting clients with a disk cache."""
    meta = f"sqlite3://{tmp_path}/meta.db"
    tj.format(meta, "cachevol", storage=f"file://{tmp_path}/store", block_size=1 * MiB)
    clients = []

    def client(cache="c1", store_wrapper=None, **kw):
        m = new_meta(meta)
        fmt = m.load()
        store = create_store(fmt.storage)
        if store_wrapper is not None:
            store = store_wrapper(store)
        kw.setdefault("cache_dir", str(tmp_path / cache) if cache else None)
        vol = tj.Volume(m, fmt, store, **kw)
        clients.append(vol)
        return vol
    yield meta, client, tmp_path
    for v in clients:
        v.close()


def data_of(n, seed=0):
    import random
    return random.Random(seed).randbytes(n)


def cache_files(vol):
    out = []
    for root, _, files in os.walk(os.path.join(vol.cache_dir, "raw")):
        out += [os.path.join(root, f) for f in files]
    return out


def test_reads_fill_the_cache_and_later_reads_hit_it(setup):
    _, client, _ = setup
    writer = client(cache=None)
    data = data_of(3 * MiB + 100)
    writer.write_bytes("/f", data)
    vol = client()
    assert vol.read_bytes("/f") == data
    vol.chunks.drain_cache_fill()                          # blocks are cached in the background
    m = vol.metrics()
    assert m["get_count"] == 4 and len(cache_files(vol)) == 4
    assert vol.read_bytes("/f") == data
    m2 = vol.metrics()
    assert m2["get_count"] == 4                           # nothing more from the store
    assert m2["cache_hits"] >= 4 and m2["cache_hit_bytes"] >= len(data)


def test_a_cache_directory_removed_while_in_use_is_made_again(setup, caplog):
    """Clearing the cache (rm -rf) under a running client: later reads cache their blocks in
    the directory made again, with one warning, instead of failing to cache each block."""
    import shutil
    _, client, _ = setup
    writer = client(cache=None)
    a, b = data_of(2 * MiB, 1), data_of(2 * MiB, 2)
    writer.write_bytes("/a", a)
    writer.write_bytes("/b", b)
    vol = client()
    assert vol.read_bytes("/a") == a
    vol.chunks.drain_cache_fill()
    assert len(cache_files(vol)) == 2
    shutil.rmtree(vol.cache_dir)
    with caplog.at_level("WARNING", logger="torchjuice"):
        assert vol.read_bytes("/b") == b
        vol.chunks.drain_cache_fill()
    assert len(cache_files(vol)) == 2 and vol.metrics()["cache_skipped"] == 0
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"disk cache {vol.cache_dir} was removed while in use: made again, empty"]
    gets = vol.metrics()["get_count"]
    assert vol.read_bytes("/b") == b and vol.metrics()["get_count"] == gets     # hits
    assert vol.read_bytes("/a") == a            # its blocks are gone from the disk: fetched again
    vol.chunks.drain_cache_fill()
    assert len(cache_files(vol)) == 4


def test_cache_survives_a_restart(setup):
    _, client, _ = setup
    client(cache=None).write_bytes("/f", data_of(2 * MiB, 1))
    first = client()
    first.read_bytes("/f")
    first.close()                                          # finishes the queued cache writes
    second = client()
    assert second.read_bytes("/f") == data_of(2 * MiB, 1)
    assert second.metrics()["get_count"] == 0


def test_corrupt_cache_block_is_detected_dropped_and_refetched(setup):
    _, client, _ = setup
    data = data_of(2 * MiB, 2)
    client(cache=None).write_bytes("/f", data)
    vol = client()
    vol.read_bytes("/f")
    vol.chunks.drain_cache_fill()
    victim = sorted(cache_files(vol))[0]
    with open(victim, "r+b") as f:                        # flip one byte in the data
        f.seek(12345)
        b = f.read(1)
        f.seek(12345)
        f.write(bytes([b[0] ^ 0xFF]))
    with vol.open("/f", "rb", buffering=0) as f:          # a small read inside the bad segment
        f.seek(12000)
        assert f.read(1000) == data[12000:13000]
    m = vol.metrics()
    assert m["cache_corrupt"] == 1
    assert vol.read_bytes("/f") == data
    vol.chunks.drain_cache_fill()
    with open(victim, "rb") as f:                         # refetched and cached again, intact
        assert f.read(MiB) in (data[:MiB], data[MiB:])


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_whole_block_is_a_miss_not_wrong_data(setup, damage):
    """read_bytes of a one-block file reads the cached block whole (its own fd, one hash): a
    flipped byte or a cut file is caught, the file dropped, the block fetched again."""
    _, client, _ = setup
    data = data_of(MiB, 5)
    client(cache=None).write_bytes("/f", data)
    vol = client()
    vol.read_bytes("/f")
    vol.chunks.drain_cache_fill()
    (victim,) = cache_files(vol)
    if damage == "truncate":
        os.truncate(victim, 1000)
    else:
        with open(victim, "r+b") as f:
            f.seek(777)
            b = f.read(1)
            f.seek(777)
            f.write(bytes([b[0] ^ 1]))
    assert vol.read_bytes("/f") == data
    assert vol.metrics()["cache_corrupt"] == 1
    vol.chunks.drain_cache_fill()
    assert vol.read_bytes("/f") == data and vol.metrics()["cache_corrupt"] == 1


def on_disk(vol) -> int:
    return sum(os.path.getsize(p) for p in cache_files(vol))


def test_cache_never_exceeds_its_cap(setup):
    _, client, _ = setup
    writer = client(cache=None)
    for i in range(6):
        writer.write_bytes(f"/f{i}", data_of(2 * MiB, 10 + i))
    cap = 3 * (MiB + trailer_size(MiB)) + 1000
    vol = client(cache_size=cap)
    for rnd in range(2):
        for i in range(6):
            assert vol.read_bytes(f"/f{i}") == data_of(2 * MiB, 10 + i)
            vol.chunks.drain_cache_fill()
            assert on_disk(vol) <= cap
            assert vol.chunks.cache.usage() <= cap
    assert vol.metrics()["cache_evictions"] > 0


def test_block_bigger_than_the_cache_is_served_uncached(setup):
    _, client, _ = setup
    client(cache=None).write_bytes("/f", data_of(MiB, 4))
    vol = client(cache_size=1000)
    assert vol.read_bytes("/f") == data_of(MiB, 4)
    vol.chunks.drain_cache_fill()
    assert cache_files(vol) == [] and vol.metrics()["cache_skipped"] >= 1


@pytest.mark.parametrize("mode", ["skip", "wait", "adaptive", "direct"])
def test_cache_fill_behind_skips_or_waits(setup, monkeypatch, mode):
    """A slow disk under the cache: in "skip" mode (the default) blocks the filler is too far
    behind for are not cached; in the "wait", "adaptive" and "direct" modes the reads wait and
    every block is cached ("direct": with O_DIRECT, and read back with O_DIRECT; "adaptive":
    with O_DIRECT while the filler is behind; "wait": through the page cache); either way the
    data is right."""
    import torchjuice.chunk.disk as disk
    _, client, _ = setup
    data = data_of(12 * MiB, 6)
    client(cache=None).write_bytes("/f", data)
    vol = client()
    vol.chunks.cache_fill_buffer = 2 * MiB                # two blocks behind at most
    vol.chunks.cache_fill_direct = MiB                    # O_DIRECT when more than one behind
    assert vol.cache_fill == "skip"
    vol.cache_fill = mode
    real_put = disk.DiskCache.put

    def slow_put(self, *a, **kw):
        time.sleep(0.05)
        return real_put(self, *a, **kw)
    monkeypatch.setattr(disk.DiskCache, "put", slow_put)
    assert vol.read_bytes("/f") == data
    vol.chunks.drain_cache_fill()
    skipped = vol.metrics()["cache_skipped"]
    if mode == "skip":
        assert skipped > 0 and len(cache_files(vol)) == 12 - skipped
    else:
        assert skipped == 0 and len(cache_files(vol)) == 12
        # read again: every block is a verified cache hit
        gets, corrupt = vol.metrics()["get_count"], vol.metrics()["cache_corrupt"]
        assert vol.read_bytes("/f") == data
        assert vol.metrics()["get_count"] == gets and vol.metrics()["cache_corrupt"] == corrupt
        # "direct" wrote every block with O_DIRECT, so they are read back so; "adaptive" those
        # it was behind for (the first block found the filler idle: page cache); "wait" none
        direct = vol.metrics()["cache_direct_reads"]
        assert {"direct": direct == 12, "adaptive": 0 < direct < 12, "wait": direct == 0}[mode]
    with pytest.raises(ValueError):
        vol.cache_fill = "sometimes"


def test_cache_fill_adaptive_keeping_up_fills_the_page_cache(setup):
    """"adaptive" with a filler that keeps up writes through the page cache: a second read
    comes from memory, none of it with O_DIRECT."""
    _, client, _ = setup
    data = data_of(8 * MiB, 8)
    client(cache=None).write_bytes("/f", data)
    vol = client()
    vol.cache_fill = "adaptive"
    assert vol.chunks.cache_fill_direct > len(data)      # so the filler is never behind
    assert vol.read_bytes("/f") == data
    vol.chunks.drain_cache_fill()
    gets = vol.metrics()["get_count"]
    assert vol.read_bytes("/f") == data
    m = vol.metrics()
    assert m["get_count"] == gets and m["cache_direct_reads"] == 0 and m["cache_skipped"] == 0


@pytest.mark.parametrize("mode", ["wait", "adaptive", "direct"])
def test_a_waiting_read_writes_queued_blocks_itself(setup, monkeypatch, mode):
    """The filler runs at a low priority; on a busy machine it gets no CPU. A read waiting for
    room in the fill queue does not inherit that: it writes the queued blocks itself, so the
    pass goes on at the reader's speed and every block is still cached."""
    import torchjuice.chunk.disk as disk
    _, client, _ = setup
    data = data_of(12 * MiB, 7)
    client(cache=None).write_bytes("/f", data)
    vol = client()
    vol.chunks.cache_fill_buffer = 2 * MiB
    vol.cache_fill = mode
    starved = threading.Event()                   # the filler thread gets no CPU until set
    real_put = disk.DiskCache.put

    def put(self, *a, **kw):
        if threading.current_thread().name == "tj-cache-fill":
            starved.wait(30)
        return real_put(self, *a, **kw)
    monkeypatch.setattr(disk.DiskCache, "put", put)
    t = time.monotonic()
    assert vol.read_bytes("/f") == data
    took = time.monotonic() - t
    starved.set()
    vol.chunks.drain_cache_fill()
    m = vol.metrics()
    # without help each read past the buffer waits FILL_WAIT_MAX (5 s), then skips its block
    assert took < 3 and m["fill_helped"] >= 8 and m["cache_skipped"] == 0
    assert len(cache_files(vol)) == 12
    gets = vol.metrics()["get_count"]
    assert vol.read_bytes("/f") == data and vol.metrics()["get_count"] == gets


def test_full_disk_while_caching_still_serves_the_data(setup, monkeypatch):
    import errno
    _, client, _ = setup
    client(cache=None).write_bytes("/f", data_of(2 * MiB, 5))
    vol = client()
    import torchjuice.chunk.disk as disk

    real_pwrite = os.pwrite

    def enospc(fd, data, *off):
        if len(data) <= 64 and off:        # the usage number, rewritten in place: no new space
            return real_pwrite(fd, data, *off)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(disk.os, "write", enospc)
    monkeypatch.setattr(disk.os, "pwrite", enospc)
    assert vol.read_bytes("/f") == data_of(2 * MiB, 5)
    vol.chunks.drain_cache_fill()
    monkeypatch.undo()
    assert cache_files(vol) == [] and vol.metrics()["cache_skipped"] >= 2


SHARED_READER = textwrap.dedent("""
    import hashlib, json, sys, torchjuice as tj
    from torchjuice.meta import new_meta
    from torchjuice.object import create_store
    meta, cache, cap, names = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    m = new_meta(meta); fmt = m.load()
    vol = tj.Volume(m, fmt, create_store(fmt.storage), cache_dir=cache, cache_size=cap)
    out = {}
    for rnd in range(3):
        for n in names:
            out[n] = hashlib.sha256(vol.read_bytes(n)).hexdigest()
    print(json.dumps({"digests": out, "corrupt": vol.metrics()["cache_corrupt"]}))
    vol.close()
""")


def test_two_processes_share_one_cache_without_corrupting_it(setup):
    import hashlib
    meta, client, tmp = setup
    writer = client(cache=None)
    names = [f"/s{i}" for i in range(6)]
    for i, n in enumerate(names):
        writer.write_bytes(n, data_of(2 * MiB + i, 20 + i))
    expect = {n: hashlib.sha256(data_of(2 * MiB + i, 20 + i)).hexdigest()
              for i, n in enumerate(names)}
    cache = str(tmp / "shared")
    cap = 8 * (MiB + trailer_size(MiB))                    # forces evictions under both
    procs = [subprocess.Popen([sys.executable, "-c", SHARED_READER, meta, cache, str(cap)] +
                              (names if k == 0 else names[::-1]), stdout=subprocess.PIPE, text=True)
             for k in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        res = json.loads(out)
        assert res["digests"] == expect and res["corrupt"] == 0
    vol = client(cache="shared", cache_size=cap)
    assert on_disk(vol) <= cap
    for path in cache_files(vol):                          # every block left verifies
        key = os.path.relpath(path, os.path.join(vol.cache_dir, "raw"))
        bsize = int(key.rsplit("_", 1)[1])
        buf = memoryview(bytearray(bsize))
        vol.chunks.cache.read_into(key, bsize, 0, buf)


def read_in_pieces(vol, path: str, piece: int = 256 << 10) -> bytes:
    """The whole file, read sequentially in ``piece``-sized reads (what triggers readahead)."""
    got = bytearray()
    with vol.open(path, "rb", buffering=0) as f:
        while chunk := f.read(piece):
            got += chunk
    return bytes(got)


def test_sequential_reader_prefetches_and_random_reader_does_not(setup):
    _, client, _ = setup
    data = data_of(12 * MiB, 6)
    client(cache=None).write_bytes("/f", data)
    # a store that is not files on this machine (FaultyStore does not pass `advise` on): the
    # readahead fetches blocks into the memory buffer
    remote = lambda s: FaultyStore(s)     # noqa: E731
    vol = client(cache=None, max_readahead=8 * MiB, store_wrapper=remote)
    assert read_in_pieces(vol, "/f") == data
    m = vol.metrics()
    assert m["prefetch_count"] >= 8 and m["buffer_hits"] + m["singleflight_waits"] >= 8
    rnd = client(cache=None, max_readahead=8 * MiB, store_wrapper=remote)
    with rnd.open("/f", "rb", buffering=0) as f:
        for off in (9 * MiB, 1 * MiB, 5 * MiB, 0):
            f.seek(off)
            assert f.read(4096) == data[off: off + 4096]
    assert rnd.metrics()["prefetch_count"] == 0


class _Advised:
    """A file store that records the keys advised to the kernel."""

    def __init__(self, inner):
        self.inner, self.advised = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def advise(self, key):
        ok = self.inner.advise(key)
        self.advised.append((key, ok))
        return ok


def test_readahead_on_a_file_store_is_advised_to_the_kernel(setup, tmp_path):
    """Blocks stored as files here are not copied into the memory buffer ahead of the reader
    (one copy more than reading them from the page cache): the kernel is asked to read them in,
    and the reader reads each block file straight into its buffer."""
    _, client, _ = setup
    data = data_of(12 * MiB, 7)
    client(cache=None).write_bytes("/f", data)
    stores = []
    vol = client(cache=None, max_readahead=8 * MiB,
                 store_wrapper=lambda s: stores.append(_Advised(s)) or stores[-1])
    assert read_in_pieces(vol, "/f") == data
    m = vol.metrics()
    advised = stores[0].advised
    assert len(advised) >= 8 and all(ok for _, ok in advised)
    assert m["prefetch_count"] == len(advised)
    assert m["buffer_hits"] == m["singleflight_waits"] == 0      # nothing went through memory
    assert client(cache=None).max_readahead > 0          # on by default on file stores too
    # a missing block is not advised (the reader reports it); a compressed volume's blocks are
    # read ahead into memory (they are decompressed there)
    assert stores[0].advise("chunks/0/0/999_0_4096") is False
    meta = f"sqlite3://{tmp_path}/z.db"
    tj.format(meta, "zvol", storage=f"file://{tmp_path}/zstore", block_size=1 * MiB,
              compression="zstd")
    with tj.connect(meta, cache_size=0) as w:
        w.write_bytes("/f", data)
    with tj.connect(meta, cache_size=0, max_readahead=8 * MiB) as z:
        assert read_in_pieces(z, "/f") == data
        assert z.metrics()["buffer_hits"] + z.metrics()["singleflight_waits"] >= 8


def test_reads_within_one_block_of_a_file_store_are_views_of_its_mapped_file(setup, tmp_path):
    """What the mount replies from (no copy of its own): a read that lies in one block of a
    file:// store is a read-only view of the block file, mapped; anything else is None, and is
    read the usual way."""
    _, client, _ = setup                                 # a file store, 1 MiB blocks
    data = data_of(3 * MiB + 100, 8)
    vol = client(cache=None)
    vol.write_bytes("/f", data)
    with vol.open("/f", "r+b", buffering=0) as f:
        assert f.read_mapped(0, 10) is None              # the slice list is not loaded yet
        f.read(1)
        v = f.read_mapped(MiB + 10, 4096)
        assert v.readonly and bytes(v) == data[MiB + 10: MiB + 10 + 4096]
        assert f.read_mapped(MiB - 10, 100) is None      # across two blocks
        assert bytes(f.read_mapped(3 * MiB, 4096)) == data[3 * MiB:]    # clamped at the end
        assert f.read_mapped(len(data), 10) is None
        f.truncate(8 * MiB)                              # a hole past the data
        f.flush()
        f.read(1)
        assert f.read_mapped(6 * MiB, 10) is None
        key, bsize = f.blocks(2 * MiB, 10)[0]
    # the mapping stays valid once the block file is gone (objects are never rewritten in place)
    mv = vol.chunks.map_block(key, bsize)
    os.unlink(vol.chunks.store.local_path(key))
    assert bytes(mv[:64]) == data[2 * MiB: 2 * MiB + 64]
    assert vol.chunks.map_block(key, bsize) is mv               # kept mapped for the next read
    assert vol.chunks.map_block("chunks/0/0/999_0_4096", 4096) is None        # no such file
    meta = f"sqlite3://{tmp_path}/z.db"
    tj.format(meta, "zvol", storage=f"file://{tmp_path}/zstore", block_size=1 * MiB,
              compression="zstd")
    with tj.connect(meta, cache_size=0) as z:
        z.write_bytes("/f", data)
        with z.open("/f", "rb", buffering=0) as f:
            f.read(1)
            assert f.read_mapped(10, 10) is None         # compressed blocks are not the bytes


def test_cached_blocks_are_mapped_once_checked(setup):
    """A store whose objects are not local files: blocks in the disk cache are mapped, and the
    mapping is used only once the whole block matched its digest; a corrupt cache file is
    dropped (and counted), and the read goes the usual way."""
    _, client, _ = setup
    data = data_of(2 * MiB, 9)
    client(cache=None).write_bytes("/f", data)
    vol = client(store_wrapper=FaultyStore)              # FaultyStore has no local_path
    with vol.open("/f", "rb", buffering=0) as f:
        assert f.read() == data
        vol.chunks.drain_cache_fill()
        (k0, b0), (k1, b1) = f.blocks(0, len(data))
        v = f.read_mapped(MiB + 5, 100)
        assert v.readonly and bytes(v) == data[MiB + 5: MiB + 105]
    victim = [p for p in cache_files(vol) if os.path.basename(p).startswith(k0.rsplit("/", 1)[1])]
    with open(victim[0], "r+b") as fh:                   # flip one byte of block 0's data
        fh.seek(MiB - 3)
        b = fh.read(1)
        fh.seek(MiB - 3)
        fh.write(bytes([b[0] ^ 0xFF]))
    fresh = client(store_wrapper=FaultyStore)
    assert fresh.chunks.map_block(k0, b0) is None
    assert fresh.metrics()["cache_corrupt"] == 1
    assert bytes(fresh.chunks.map_block(k1, b1)[:16]) == data[MiB: MiB + 16]
    assert fresh.read_bytes("/f") == data


def test_single_flight_one_download_per_block(setup):
    _, client, _ = setup
    client(cache=None).write_bytes("/f", data_of(MiB, 7))
    vol = client(store_wrapper=lambda s: FaultyStore(s, delay=0.3, fail_ops=("get",)))
    key, bsize = vol._blocks_of("/f")[0]
    results = []
    threads = [threading.Thread(target=lambda: results.append(bytes(vol.chunks.fetch(key, bsize))))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [data_of(MiB, 7)] * 8
    assert vol.metrics()["get_count"] == 1


WRITEBACK_CLIENT = textwrap.dedent("""
    import sys, time, torchjuice as tj
    from torchjuice.meta import new_meta
    from torchjuice.object import create_store
    from torchjuice.object.fault import FaultyStore
    meta, cache = sys.argv[1], sys.argv[2]
    m = new_meta(meta); fmt = m.load()
    store = FaultyStore(create_store(fmt.storage))
    store.fail_always(True, ops=["put"])                  # uploads cannot land
    vol = tj.Volume(m, fmt, store, cache_dir=cache, writeback=True)
    with vol.open("/wb.bin", "wb") as f:
        f.write(bytes(range(256)) * 12289)
    print("committed", flush=True)
    time.sleep(60)
""")


def test_writeback_data_survives_a_killed_client(setup):
    meta, client, tmp = setup
    cache = str(tmp / "wbcache")
    p = subprocess.Popen([sys.executable, "-c", WRITEBACK_CLIENT, meta, cache],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "committed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    data = bytes(range(256)) * 12289
    other = client(cache=None)
    assert other.stat("/wb.bin").st_size == len(data)      # committed first ...
    with pytest.raises(FileNotFoundError):                 # ... but not uploaded yet
        other.read_bytes("/wb.bin")
    restarted = client(cache="wbcache", writeback=True)    # uploads what was staged
    assert restarted.chunks.wait_writeback(timeout=30)
    fresh = client(cache=None)
    assert fresh.read_bytes("/wb.bin") == data
    assert restarted.chunks.cache.staged_keys() == []


def test_writeback_reads_own_staged_blocks(setup):
    _, client, _ = setup
    vol = client(writeback=True)
    vol.write_bytes("/x", data_of(3 * MiB, 8))
    assert vol.read_bytes("/x") == data_of(3 * MiB, 8)
    assert vol.chunks.wait_writeback(timeout=30)


def test_writeback_requires_a_cache(setup):
    _, client, _ = setup
    with pytest.raises(ValueError, match="cache"):
        client(cache=None, writeback=True, cache_size=0)


def test_warmup_fills_the_cache(setup):
    _, client, _ = setup
    w = client(cache=None)
    w.makedirs("/d/e")
    w.write_bytes("/d/a", data_of(2 * MiB, 9))
    w.write_bytes("/d/e/b", data_of(MiB + 5, 10))
    vol = client()
    s = vol.warmup(["/d"])
    assert s["blocks"] == 4 and s["downloaded_blocks"] == 4 and s["bytes"] == 3 * MiB + 5
    assert vol.warmup("/d")["downloaded_blocks"] == 0      # already there
    before = vol.metrics()["get_count"]
    assert vol.read_bytes("/d/e/b") == data_of(MiB + 5, 10)
    assert vol.metrics()["get_count"] == before


def resident_share(path: str) -> float:
    """The share of a file's pages in the page cache (mincore over a mapping of it)."""
    import ctypes
    import mmap
    n = os.path.getsize(path)
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), n, access=mmap.ACCESS_COPY)
    lib = ctypes.CDLL(None, use_errno=True)
    pages = (n + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    addr = ctypes.c_char.from_buffer(m)
    try:
        assert lib.mincore(ctypes.c_void_p(ctypes.addressof(addr)), ctypes.c_size_t(n), vec) == 0
    finally:
        del addr
        m.close()
    return sum(v & 1 for v in vec) / pages


def evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fdatasync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page cache control is Linux's")
def test_warmup_of_a_file_store_pages_its_blocks_in(tmp_path):
    """No disk cache: a file:// store's own objects are the local blocks; warmup brings them into
    the page cache (for a model server's mapped load) instead of refusing."""
    import glob
    tj.format(f"sqlite3://{tmp_path}/m.db", "fwarm", storage=f"file://{tmp_path}/data")
    with tj.connect("fwarm", cache_size=0) as vol:
        vol.write_bytes("/w.bin", data_of(9 * MiB, 12))
        blocks = glob.glob(f"{tmp_path}/data/**/chunks/**/*_*_*", recursive=True)
        assert len(blocks) == 3
        for b in blocks:
            evict(b)
        if max(resident_share(b) for b in blocks) > 0.5:
            pytest.skip("this file system keeps evicted pages (tmpfs?)")
        s = vol.warmup("/w.bin")
        assert s["blocks"] == 3 and s["downloaded_blocks"] == 0
        assert all(resident_share(b) == 1.0 for b in blocks)
        assert vol.read_bytes("/w.bin") == data_of(9 * MiB, 12)
    from torchjuice._pages import page_in
    assert not page_in(f"{tmp_path}/gone", 4096)
    assert not page_in(blocks[0], os.path.getsize(blocks[0]) + 1)      # never past the end


def test_warmup_without_anything_local_is_an_error(tmp_path):
    tj.format(f"sqlite3://{tmp_path}/m.db", "mwarm", storage=f"mem://{os.urandom(4).hex()}")
    with tj.connect("mwarm", cache_size=0) as vol:
        vol.write_bytes("/w.bin", b"x" * 100)
        with pytest.raises(ValueError, match="disk cache"):
            vol.warmup("/w.bin")


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "torchjuice.cli", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def test_warmup_and_stats_commands(tmp_path, s3_server):
    meta = f"sqlite3://{tmp_path}/m.db"
    tj.format(meta, "warmvol", storage=s3_server.url())
    with tj.connect("warmvol", cache_size=0) as vol:
        vol.makedirs("/model")
        vol.write_bytes("/model/w.bin", data_of(9 * MiB, 11))
    env = {"TORCHJUICE_CACHE_DIR": str(tmp_path / "cli-cache")}
    p = run_cli("warmup", "juice://warmvol/model", env=env)
    assert p.returncode == 0, p.stderr
    assert "3 blocks (9.0 MiB), downloaded 3" in p.stderr
    with tj.connect("warmvol", cache_dir=str(tmp_path / "cli-cache"), stats_interval=0.2) as vol:
        assert vol.read_bytes("/model/w.bin") == data_of(9 * MiB, 11)
        assert vol.metrics()["get_count"] == 0
        time.sleep(0.6)                                    # a heartbeat publishes the counters
        p = run_cli("stats", "warmvol", "--count", "1", "--json")
        assert p.returncode == 0, p.stderr
        sessions = json.loads(p.stdout)
        mine = [s for s in sessions if s["pid"] == os.getpid()]
        assert mine and mine[0]["stats"]["cache_hits"] >= 3
        table = run_cli("stats", "warmvol", "--count", "1").stdout
        assert "cache hits" in table and "total" in table
        piped = run_cli("stats", "warmvol")          # output to a pipe: one table, then exit
        assert piped.returncode == 0 and piped.stdout.count("client(s); counters") == 1


def test_s3_volume_caches_by_default(tmp_path, s3_server):
    tj.format(f"sqlite3://{tmp_path}/m.db", "s3vol", storage=s3_server.url())
    with tj.connect("s3vol") as vol:
        vol.write_bytes("/a", data_of(5 * MiB, 12))
        vol.chunks.drain_cache_fill()
        assert vol.cache_dir and vol.cache_dir.startswith(os.environ["TORCHJUICE_HOME"])
        assert vol.read_bytes("/a") == data_of(5 * MiB, 12)
        assert vol.metrics()["get_count"] == 0              # written blocks were cached


def test_diskcache_unit_partial_reads_verify(tmp_path):
    c = DiskCache(str(tmp_path), "u", 100 * MiB)
    data = data_of(MiB + 77, 13)
    assert c.put("k/1", data)
    for off, n in ((0, 10), (65530, 20), (MiB, 77), (3, MiB)):
        out = memoryview(bytearray(n))
        c.read_into("k/1", len(data), off, out)
        assert bytes(out) == data[off: off + n]


def _cached_with_a_flipped_byte(c, key: str, data: bytes, at: int) -> str:
    """Cache ``data`` as ``key``, then flip one bit of byte ``at`` of its file; the file's path."""
    assert c.put(key, data)
    path = c.path(key)
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 1]))
    return path


# read_ranges_bytes reads a run of small pieces with one pread, bigger ones piece by piece: each
# test below runs with one way forced, then the other
ONE_READ = pytest.mark.parametrize("one_read", [0, 1 << 30], ids=["pieces", "one-read"])


@ONE_READ
def test_diskcache_range_bytes_verify_the_segments_around_the_range(tmp_path, monkeypatch,
                                                                      one_read):
    import random
    from torchjuice.chunk import disk
    from torchjuice.chunk.disk import SEGMENT, CacheMiss
    monkeypatch.setattr(disk, "_ONE_READ_PER_PIECE", one_read)
    c = DiskCache(str(tmp_path), "u", 100 * MiB)
    data = data_of(MiB + 77, 14)
    rnd = random.Random(5)
    assert c.put("k/1", data)
    cases = [(0, len(data)), (0, 1), (SEGMENT - 1, 2), (SEGMENT, SEGMENT), (len(data) - 5, 5),
             (5, SEGMENT * 3)] + [(o, rnd.randint(1, len(data) - o))
                                   for o in (rnd.randrange(len(data)) for _ in range(40))]
    for off, n in cases:
        assert c.read_range_bytes("k/1", len(data), off, n) == data[off: off + n], (off, n)
    # a flipped byte outside the range but inside a segment it touches: a miss, never the bytes
    off, n = 3 * SEGMENT + 100, 2 * SEGMENT
    for bad in (3 * SEGMENT + 7, off + n + 9):            # in the head part, in the tail part
        path = _cached_with_a_flipped_byte(c, "k/2", data, bad)
        with pytest.raises(CacheMiss):
            c.read_range_bytes("k/2", len(data), off, n)
        assert not os.path.exists(path)                  # dropped
    assert c.corrupt == 2


@ONE_READ
def test_diskcache_ranges_of_packed_files_read_together(tmp_path, monkeypatch, one_read):
    """Files packed side by side, read by one call (a sequential batch): each range's bytes in
    the order asked, adjacent ranges checked as one run, gaps and repeats each on their own; a
    flipped byte anywhere a run's segments cover -- in a file, between two of them, around them
    -- is a miss, never bytes."""
    import random
    from torchjuice.chunk import disk
    from torchjuice.chunk.disk import SEGMENT, CacheMiss
    monkeypatch.setattr(disk, "_ONE_READ_PER_PIECE", one_read)
    c = DiskCache(str(tmp_path), "u", 100 * MiB)
    data = data_of(MiB + 77, 15)
    assert c.put("k/1", data)
    rnd = random.Random(7)
    cuts = sorted(rnd.sample(range(1, len(data)), 60))
    files = list(zip([0] + cuts, [b - a for a, b in zip([0] + cuts, cuts + [len(data)])]))
    for ranges in (files, files[::-1], files[3:9] + files[20:25] + files[5:6],
                   [(SEGMENT - 3, 3), (SEGMENT, 5)], [files[0]]):
        reads = c.hits
        assert c.read_ranges_bytes("k/1", len(data), ranges) == [data[o: o + n] for o, n in ranges]
        assert c.hits - reads == len(ranges)
    run = [(3 * SEGMENT + 100, 700), (3 * SEGMENT + 800, 2 * SEGMENT), (5 * SEGMENT + 800, 50)]
    for bad in (3 * SEGMENT + 7, 3 * SEGMENT + 799, 4 * SEGMENT + 5, 5 * SEGMENT + 851):
        path = _cached_with_a_flipped_byte(c, "k/2", data, bad)
        with pytest.raises(CacheMiss):
            c.read_ranges_bytes("k/2", len(data), run)
        assert not os.path.exists(path)                  # dropped
    assert c.corrupt == 4


def test_a_block_cached_by_an_older_version_is_a_quiet_miss(tmp_path, caplog):
    import struct
    import xxhash
    from torchjuice.chunk.disk import CacheMiss
    c = DiskCache(str(tmp_path), "u", 100 * MiB)
    data = data_of(200_000, 15)
    assert c.put("k/1", data)
    old_seg = 64 << 10                      # the TJC1 layout: 64 KiB segments
    sums = [xxhash.xxh3_64_digest(data[i: i + old_seg]) for i in range(0, len(data), old_seg)]
    with open(c.path("k/1"), "wb") as f:
        f.write(data + b"".join(sums) + xxhash.xxh3_64_digest(data)
                + struct.pack("<4sI", b"TJC1", len(sums)))
    with caplog.at_level("WARNING", logger="torchjuice.cache"):
        with pytest.raises(CacheMiss):
            c.read_bytes("k/1", len(data))
    assert not os.path.exists(c.path("k/1")) and c.corrupt == 0 and not caplog.records


def test_copy_into_big_small_and_read_only_sources():
    from torchjuice.chunk.store import COPY_NOGIL_MIN, copy_into
    src = bytearray(os.urandom(COPY_NOGIL_MIN * 3))
    for n, off in ((COPY_NOGIL_MIN * 2, 17), (100, 5), (COPY_NOGIL_MIN, 0)):
        for source in (src, bytes(src), memoryview(src)):
            out = bytearray(n + 8)
            copy_into(memoryview(out)[4: 4 + n], source, off)
            assert out[4: 4 + n] == src[off: off + n]
            assert out[:4] == b"\0" * 4 and out[4 + n:] == b"\0" * 4     # nothing outside


def test_torn_usage_file_is_rebuilt_from_a_scan(tmp_path):
    cache = DiskCache(str(tmp_path), "vol", capacity=1 << 30)
    for i in range(3):
        assert cache.put(f"k/{i}", os.urandom(1000 + i))
    used = cache.usage()
    assert used == sum(1000 + i + trailer_size(1000 + i) for i in range(3))
    with open(os.path.join(cache.dir, "usage"), "wb") as f:
        f.write(b"12\x00garbage")                        # a crash mid-write
    assert cache.usage() == used
    other = DiskCache(str(tmp_path), "vol", capacity=1 << 30)     # another client of the cache
    assert other.usage() == used
    other.put("k/x", b"y" * 10)
    assert cache.usage() == used + 10 + trailer_size(10)
    cache.close()
    other.close()


def test_blocks_not_in_the_page_cache_are_read_with_o_direct(tmp_path):
    """A whole block written with O_DIRECT (not in the page cache) is read back with O_DIRECT,
    checked; one written through the page cache is read from it; a corrupt byte on disk is still
    a miss, and the block is dropped."""
    from torchjuice.chunk.disk import CacheMiss
    cache = DiskCache(str(tmp_path), "vol", capacity=1 << 30)
    a, b = os.urandom(4 << 20), os.urandom((2 << 20) + 4096 + 77)
    assert cache.put("a", a, direct=True) and cache.put("b", b, direct=True)
    assert cache.put("m", a, direct=False)
    out = bytearray(len(a))
    cache.read_into("a", len(a), 0, memoryview(out))
    assert out == a and cache.direct_reads == 1
    assert cache.read_bytes("b", len(b)) == b and cache.direct_reads == 2
    cache.read_into("m", len(a), 0, memoryview(out))          # in the page cache: read from it
    assert out == a and cache.direct_reads == 2
    part = bytearray(1000)                                      # a partial read: the page cache
    cache.read_into("a", len(a), 5000, memoryview(part))
    assert part == a[5000:6000] and cache.direct_reads == 2
    fd = os.open(cache.path("a"), os.O_WRONLY)                  # one byte flipped on "disk"
    os.pwrite(fd, bytes([a[100] ^ 1]), 100)
    os.close(fd)
    os.posix_fadvise(os.open(cache.path("a"), os.O_RDONLY), 0, 0, os.POSIX_FADV_DONTNEED)
    with pytest.raises(CacheMiss):
        cache.read_into("a", len(a), 0, memoryview(out))
    assert not os.path.exists(cache.path("a")) and cache.corrupt == 1
    cache.close()


@pytest.mark.parametrize("direct", [None, False])
def test_big_blocks_cached_with_or_without_o_direct_read_back_verified(tmp_path, direct):
    from torchjuice.chunk.disk import CacheMiss
    cache = DiskCache(str(tmp_path), "vol", capacity=1 << 30)
    cache._direct = direct                       # None: try O_DIRECT; False: as on tmpfs
    blocks = {"a": os.urandom(4 << 20), "b": bytearray(os.urandom((3 << 20) + 123)),
              "c": memoryview(os.urandom(5000))}
    for key, data in blocks.items():
        assert cache.put(key, data)
    for key, data in blocks.items():
        out = bytearray(len(data))
        cache.read_into(key, len(data), 0, memoryview(out))
        assert out == bytes(data)
        assert os.path.getsize(cache.path(key)) == len(data) + trailer_size(len(data))
    if direct is False:
        assert cache._direct is False
    with open(cache.path("b"), "r+b") as f:               # corruption is still caught
        f.seek(2 << 20)
        f.write(b"\xff" * 8)
    with pytest.raises(CacheMiss):
        cache.read_into("b", len(blocks["b"]), 0, memoryview(bytearray(len(blocks["b"]))))
    cache.close()


def test_readahead_skips_a_block_on_its_way_to_the_disk_cache(tmp_path):
    """A block read to its end leaves the memory buffer while it waits for the cache filler; a
    readahead that lags behind the reader and asks for it then must not download it again."""
    from torchjuice.chunk.store import ChunkStore
    from torchjuice.object.mem import MemStore
    cache = DiskCache(str(tmp_path / "cache"), "uuid-ra", 64 * MiB)
    chunks = ChunkStore(MemStore(), "v", MiB, cache=cache)
    try:
        data = data_of(MiB, 7)
        key = chunks.key(1, 0, MiB)
        chunks.store.put(key, data)
        gate, entered = threading.Event(), threading.Event()
        put = cache.put

        def slow_put(*args, **kw):            # the filler holds the block until the gate opens
            entered.set()
            gate.wait(30)
            return put(*args, **kw)
        cache.put = slow_put
        assert chunks.read_range_bytes(key, MiB, MiB - 10, 10) == data[-10:]   # to its end
        assert entered.wait(30)
        assert not chunks._in_memory(key) and not cache.contains(key)
        gets = chunks.metrics.get_count
        assert chunks.prefetch([(key, MiB)]) == 0
        gate.set()
        chunks.drain_cache_fill()
        assert chunks.metrics.get_count == gets == 1
        assert cache.contains(key)
        assert chunks.prefetch([(key, MiB)]) == 0           # now from the disk cache
        assert chunks._fill_keys == {}
    finally:
        chunks.close()
