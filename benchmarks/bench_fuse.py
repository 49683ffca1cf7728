"""The POSIX mount against the Python API on the same volume: dd-like sequential write and read of
one big file, in one run.

    python -m benchmarks.bench_fuse                   # 1 GiB (256 MiB on S3), 6 rounds
    python -m benchmarks.bench_fuse --size 256M --rounds 2 --stores file   # quick

One volume per store (SQLite metadata), used at once by this process through the Python API and
by a ``torchjuice mount -d`` process (as users run it). Stores: ``file`` (a local directory),
``s3`` (moto's S3 server in its own process, with the default local disk cache) and
``s3-nocache`` (the same with the disk cache off on both sides). Each round, in turns:

- API write: ``vol.open(p, "wb", buffering=0)``, 1 MiB ``write`` calls from one buffer, ``close``;
- mount write: ``os.open``/``os.write`` of 1 MiB (what ``dd bs=1M`` does), ``close`` (commits);
  both sides write from one page-aligned buffer, as ``dd`` does, and read into another;
- the API goes first in even rounds, the mount in odd ones, for the writes and for each kind of
  read: on this VM the first of the two takes the pages the previous round freed, and the second
  gets pages the host must back again (about twice as slow: the mount wrote at 1.5x the API's
  speed when it went first and 0.35x when it went second; every earlier version of this script
  had the API go first);
- before each write, ``os.sync()`` (untimed): a writer that follows another's 1 GiB of fresh
  dirty pages is throttled by the kernel while they go to disk, and the mount always wrote second
  (an earlier version of this script measured that bias against the mount's writes);
- reads, each side reading the file the *other* side wrote (so the run checks close-to-open too:
  sizes and a sample of blocks are compared), with ``readinto`` / ``os.readv`` into one 1 MiB
  buffer. Where the bytes come from is named in the row, and is the same for both sides:

  - ``read`` on ``file``: the store's block files were evicted from the host page cache first
    (``fdatasync`` + ``POSIX_FADV_DONTNEED``): data on the store's disk, as a data set larger than
    memory is. On ``s3``: blocks from the disk cache the writer filled (the run waits, untimed,
    until both writers' background cache fillers are done: a filler lagging behind a fast writer
    would send one side to the server); on ``s3-nocache``: from the S3 server.
  - ``read (hot)`` (``file`` only): the same read again with the block files in the host page
    cache, the mount's own page cache of the file dropped first (``POSIX_FADV_DONTNEED`` on the
    mounted file). The API is then one memory copy; the mount adds the kernel's copies and a
    round trip per 1 MiB request (see docs/fuse.md: this row is bounded by FUSE, not by us).
  - ``reread``: the mount reads that file once more, unchanged since it opened it, so the kernel
    keeps its pages (a second epoch over a data set), against the API's first read.

- in the same rounds on ``file``, the FUSE ceiling: a do-nothing pyfuse3 file system
  (``benchmarks/fuse_null.py``) mounted as the mount is, written and read (hot) the same way.

Why the eviction (changed after the first version of this script, which only had the hot read):
with the blocks in the host page cache the API reads at memory-copy speed (1.5-4 GB/s here), and a
FUSE file system is bounded by the kernel's copies and round trips (the ceiling rows). The evicted
read is the case the mount is for: data that is not in memory yet. Both sides are treated alike;
nothing is served from a page cache the other side lacks.

Rows give the best and the median of the rounds per side, and the mount/API ratio of each.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torchjuice as tj
from torchjuice.units import parse_size

from .common import fmt_table, timer, write_results

MiB = 1 << 20
IO = MiB


def api_write(vol, path: str, size: int, buf: bytes) -> float:
    out = {}
    with timer(out, "t"):
        with vol.open(path, "wb", buffering=0) as f:
            for _ in range(size // IO):
                f.write(buf)
    return out["t"]


def api_read(vol, path: str, view: memoryview) -> tuple[float, int]:
    out, n = {}, 0
    with timer(out, "t"):
        with vol.open(path, "rb", buffering=0) as f:
            while k := f.readinto(view):
                n += k
    return out["t"], n


def fuse_write(path: str, size: int, buf: bytes) -> float:
    out = {}
    with timer(out, "t"):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for _ in range(size // IO):
                os.write(fd, buf)
        finally:
            os.close(fd)
    return out["t"]


def fuse_read(path: str, view: memoryview) -> tuple[float, int]:
    out, n = {}, 0
    with timer(out, "t"):
        fd = os.open(path, os.O_RDONLY)
        try:
            while k := os.readv(fd, [view]):
                n += k
        finally:
            os.close(fd)
    return out["t"], n


def aligned(n: int) -> memoryview:
    """A page-aligned buffer, as ``dd`` uses. It matters for the mount's write-only descriptors
    (direct I/O): the kernel sends the pages of the caller's buffer as they are, and a 1 MiB buffer
    that starts mid-page spans 257 pages, one more than a request holds, so every ``write(2)``
    would become two requests (a Python ``bytes`` object is such a buffer)."""
    return memoryview(mmap.mmap(-1, n))


def sample(read_at, size: int) -> str:
    """A digest of 8 blocks spread over the file."""
    h = hashlib.sha256()
    for i in range(8):
        h.update(read_at(i * (size // 8), 4096))
    return h.hexdigest()


def evict_dir(root: str) -> None:
    """Drop every file under ``root`` (a ``file://`` store) from the host page cache."""
    for d, _, files in os.walk(root):
        for name in files:
            try:
                fd = os.open(os.path.join(d, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fdatasync(fd)                      # dirty pages cannot be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def settle_cache(vol, root: str, timeout: float = 60.0) -> None:
    """Wait until the disk cache under ``root`` stops growing: both writers' background cache
    fillers are done (they run at the lowest CPU priority and may lag behind a fast writer), so
    that each side's read finds the other's blocks cached, as the ``s3`` rows say."""
    vol.chunks.drain_cache_fill()

    def used() -> int:
        n = 0
        for d, _, fs in os.walk(root):
            for f in fs:
                try:
                    n += os.path.getsize(os.path.join(d, f))
                except FileNotFoundError:      # a filler's temporary file, renamed meanwhile
                    pass
        return n
    last, deadline = -1, time.time() + timeout
    while time.time() < deadline:
        now = used()
        if now == last:
            return
        last = now
        time.sleep(0.5)


def drop_mount_cache(path: str) -> None:
    """Drop the kernel page cache of one file of the mount."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


ROWS = ("write", "read", "read (hot)", "reread")


def run_store(kind: str, store: str, size: int, rounds: int, tmp: str) -> dict[str, list[float]]:
    """Rounds of the measurements on one volume; returns the seconds of each, per side."""
    env = {**os.environ, "TORCHJUICE_HOME": os.path.join(tmp, "home")}
    os.environ["TORCHJUICE_HOME"] = env["TORCHJUICE_HOME"]
    meta = f"sqlite3://{tmp}/meta.db"
    tj.format(meta, "benchfuse", storage=store, trash_days=0)
    mp = os.path.join(tmp, "mnt")
    os.mkdir(mp)
    nocache = kind == "s3-nocache"
    mount_cmd = [sys.executable, "-m", "torchjuice.cli", "mount", meta, mp, "-d"] + \
        (["--cache-size", "0"] if nocache else [])
    subprocess.run(mount_cmd, check=True, env=env, capture_output=True)
    with open(os.path.join(mp, ".torchjuice")) as f:
        pid = json.load(f)["pid"]
    vol = tj.connect(meta, cache_size=0 if nocache else None)
    bucket = store[len("file://"):] if store.startswith("file://") else None
    buf = aligned(IO)                    # page-aligned, as dd's buffers are (see aligned())
    buf[:] = os.urandom(IO)
    view = aligned(IO)
    times: dict[str, list[float]] = {}

    def put(row: str, t: float) -> None:
        times.setdefault(row, []).append(t)

    # the FUSE ceiling, beside the local store: a do-nothing file system (benchmarks/fuse_null.py)
    # mounted the same way, read and written the same way in each round
    null = null_p = None
    if bucket is not None:
        null_mp = os.path.join(tmp, "null")
        os.mkdir(null_mp)
        null = subprocess.Popen([sys.executable, "-m", "benchmarks.fuse_null", null_mp, str(size)],
                                stdout=subprocess.PIPE, text=True,
                                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if null.stdout.readline().strip() != "ready":
            raise RuntimeError("the do-nothing FUSE file system did not mount")
        null_p = os.path.join(null_mp, "data")

    try:
        for r in range(rounds):
            api_p, fuse_p = f"/api-{r}.bin", f"fuse-{r}.bin"
            mnt_api = os.path.join(mp, api_p.lstrip("/"))       # the API's file, via the mount
            # Who goes first alternates from round to round: on this VM the first of two writers
            # (or readers) takes the pages the previous round just freed and the second gets
            # pages the host must back again, about twice as slow (measured: the mount wrote at
            # 1.5x the API when it went first, 0.35x when second). The null rows go last.
            mount_first = r % 2 == 1
            writes = [("api", lambda: api_write(vol, api_p, size, buf)),
                      ("mount", lambda: fuse_write(os.path.join(mp, fuse_p), size, buf))]
            for side, write in writes[::-1] if mount_first else writes:
                os.sync()   # each write starts with no dirty pages waiting (see the docstring)
                put(f"{side} write", write())
            if null is not None:
                os.sync()
                put("null write", fuse_write(null_p, size, buf))
            if kind == "s3":
                settle_cache(vol, os.path.join(env["TORCHJUICE_HOME"], "cache"))
            reads = [("read", bucket is not None)] + ([("read (hot)", False)] if bucket else [])
            for row, evict in reads:
                if evict:
                    evict_dir(bucket)           # both files' blocks (disjoint: one pass serves)
                for side in ("mount", "api") if mount_first else ("api", "mount"):
                    if side == "api":
                        t, n = api_read(vol, "/" + fuse_p, view)
                    else:
                        drop_mount_cache(mnt_api)   # (the mount never read it before the first row)
                        t, n = fuse_read(mnt_api, view)
                    assert n == size, f"the {side} read {n} bytes of {size}"
                    put(f"{side} {row}", t)
                if null is not None and row == "read (hot)":
                    drop_mount_cache(null_p)
                    t, n = fuse_read(null_p, view)
                    assert n == size
                    put(f"null {row}", t)
            # the same file again: unchanged since this mount opened it, so the kernel keeps its
            # page cache (what a second epoch over a dataset sees)
            t, n = fuse_read(mnt_api, view)
            assert n == size
            put("mount reread", t)
            with vol.open("/" + fuse_p, "rb", buffering=0) as f1:
                fd = os.open(os.path.join(mp, fuse_p), os.O_RDONLY)
                try:
                    def at(o, n, f=f1):
                        f.seek(o)
                        return f.read(n)
                    assert sample(at, size) == sample(lambda o, n: os.pread(fd, n, o), size)
                finally:
                    os.close(fd)
            vol.remove(api_p)
            os.unlink(os.path.join(mp, fuse_p))
            print(f"{kind} round {r + 1}: " + ", ".join(
                f"{k} {size / v[-1] / MiB:.0f} MiB/s" for k, v in times.items()), flush=True)
    finally:
        if null is not None:
            subprocess.run(["fusermount3", "-u", null_mp], capture_output=True)
            null.wait(30)
        vol.close()
        subprocess.run([sys.executable, "-m", "torchjuice.cli", "umount", mp], env=env,
                       capture_output=True)
        deadline = time.time() + 30
        while time.time() < deadline and os.path.exists(f"/proc/{pid}"):
            time.sleep(0.1)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=1 << 30,
                    help="file size on the local-directory store (default 1G)")
    ap.add_argument("--s3-size", type=parse_size, default=256 << 20,
                    help="file size on the S3 server (moto, slow; default 256M)")
    ap.add_argument("--stores", default="file,s3,s3-nocache",
                    help="comma-separated: file, s3, s3-nocache (default: all three)")
    ap.add_argument("--rounds", type=int, default=6,
                    help="rounds per store (default 6: each side goes first in half of them)")
    ap.add_argument("--dir", default=None, help="where volumes live (default: a temp dir)")
    ap.add_argument("--no-save", action="store_true", help="print only; leave results/ alone")
    a = ap.parse_args()

    rows, table = [], []
    for kind in a.stores.split(","):
        size = (a.size if kind == "file" else a.s3_size) // IO * IO
        with tempfile.TemporaryDirectory(dir=a.dir, prefix="tj-bench-fuse-") as tmp:
            if kind == "file":
                times = run_store(kind, f"file://{tmp}/bucket", size, a.rounds, tmp)
            else:
                from torchjuice.testing import S3Server
                srv = S3Server()
                try:
                    times = run_store(kind, srv.url(), size, a.rounds, tmp)
                finally:
                    srv.stop()
        for op in ROWS:
            # a reread is compared with the API's fastest kind of read (hot, where there is one)
            base = op if op != "reread" else "read (hot)" if "api read (hot)" in times else "read"
            for side, store in (("mount", kind), ("null", f"{kind}: FUSE ceiling")):
                if f"{side} {op}" not in times:
                    continue
                api, mnt = times[f"api {base}"], times[f"{side} {op}"]
                row = {"store": store, "op": op, "size": size, "rounds": a.rounds,
                       "api_mib_s": size / min(api) / MiB, "mount_mib_s": size / min(mnt) / MiB,
                       "api_mib_s_median": size / statistics.median(api) / MiB,
                       "mount_mib_s_median": size / statistics.median(mnt) / MiB,
                       "ratio": min(api) / min(mnt),
                       "ratio_median": statistics.median(api) / statistics.median(mnt),
                       "seconds": {"api": api, "mount": mnt}}
                rows.append(row)
                table.append([store, f"{size / MiB:.0f} MiB", op, f"{row['api_mib_s']:.0f}",
                              f"{row['mount_mib_s']:.0f}", f"{row['ratio']:.2f}",
                              f"{row['api_mib_s_median']:.0f}",
                              f"{row['mount_mib_s_median']:.0f}", f"{row['ratio_median']:.2f}"])
    text = fmt_table(["store", "file", "1 MiB I/O", "API MiB/s", "mount MiB/s", "mount/API",
                      "API median", "mount median", "ratio median"], table)
    print(text)
    notes = (f"{a.rounds} rounds per store, the API first in even rounds and the mount first in odd "
             "ones (writes and reads); best and median per side. One volume per store "
             "(SQLite metadata) used at once by the Python API in the benchmark process and by a "
             "`torchjuice mount -d` process; each side reads the file the other wrote. 1 MiB "
             "writes/reads from one buffer (dd bs=1M from Python: os.write / os.readv on the "
             "mount, write / readinto on the API). `read`: on `file`, the store's block files "
             "evicted from the host page cache first (data on disk); on `s3`, blocks from the "
             "local disk cache the writer filled; on `s3-nocache`, from the S3 server (moto in "
             "its own process, loopback). `read (hot)`: `file` with its blocks in the host page "
             "cache, so the API is one memory copy and the mount is bounded by FUSE's copies and "
             "round trips. `reread`: the mount reads the file once more from the kernel page "
             "cache (kept for a file unchanged since the mount opened it), against the API's "
             "hot read (`file`) or its read (`s3`). `file: FUSE ceiling`: in the same rounds, "
             "a do-nothing pyfuse3 file system (benchmarks/fuse_null.py: reads answered from one "
             "buffer, writes discarded; mounted with the same options, readahead and direct I/O "
             "for write-only opens) written and read (hot) the same way, in the mount column: "
             "the most any pyfuse3 file system gets on this machine, against the API's figures.")
    if not a.no_save:
        path = write_results("fuse", rows, text, notes)
        print(f"results: {path}")


if __name__ == "__main__":
    main()
