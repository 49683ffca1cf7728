"""Block cache and readahead benchmark: one 1 GiB file, a single reader doing 8 MiB ``readinto``
into one preallocated buffer, side by side with its baselines in one run.

    python -m benchmarks.bench_io                  # 1 GiB
    python -m benchmarks.bench_io --size 256M      # quick

Rows (each with its baseline):
- sequential write to S3 (moto's server, its own process): torchjuice vs raw boto3 parallel PUTs
  of the same number of 4 MiB blocks (16 threads);
- cold read from S3 (empty disk cache): torchjuice vs raw boto3 parallel GETs of the very blocks
  the volume stored (16 threads, ``get_into`` preallocated buffers);
- warm read (every block in the local disk cache, a fresh client so no memory buffer): torchjuice
  vs the same bytes read from a local file the same way (8 MiB ``readinto``, page cache warm for
  both), in two page-cache states, medians of ``--rounds`` interleaved rounds. Copying out of the
  page cache is ~30% slower here when the pages were filled by reading the file from disk than
  when they were filled by writing it (the kernel builds smaller folios on reads). So: a cache
  filled by ``warmup`` (written through the page cache) against the local file just written; a
  cache filled by the cold read (written with O_DIRECT while the filler lagged, then read once)
  against the local file dropped from the page cache (``POSIX_FADV_DONTNEED``) and read once;
- random 4 KiB reads on the warm cache: ops/s beside ``os.preadv`` on the local file.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torchjuice as tj
from torchjuice.object import create_store
from torchjuice.testing import S3Server
from torchjuice.units import parse_size

from .common import fmt_table, machine, timer, write_results

MiB = 1 << 20
IO = 8 * MiB


def read_all(f, view) -> int:
    n = 0
    while True:
        k = f.readinto(view)
        if not k:
            return n
        n += k


def local_write_fresh(path: str, size: int) -> None:
    """(Re)write the local baseline file: its page cache then comes from the writes."""
    block = os.urandom(IO)
    with open(path, "wb", buffering=0) as f:
        for _ in range(size // IO):
            f.write(block)


def random_reads(f_read_at, size: int, count: int, seed: int = 0) -> float:
    rng = random.Random(seed)
    offs = [rng.randrange(0, size - 4096) // 4096 * 4096 for _ in range(count)]
    buf = memoryview(bytearray(4096))
    t = time.perf_counter()
    for off in offs:
        f_read_at(off, buf)
    return count / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=1 << 30)
    ap.add_argument("--random-ops", type=int, default=20_000)
    ap.add_argument("--threads", type=int, default=16, help="threads of the raw boto3 baselines")
    ap.add_argument("--rounds", type=int, default=3, help="warm rounds (medians reported)")
    ap.add_argument("--no-save", action="store_true")
    a = ap.parse_args()
    size = max(IO, a.size // IO * IO)
    work = tempfile.mkdtemp(prefix="tj-bench-io-")
    buf = bytearray(os.urandom(IO))
    view = memoryview(buf)
    t: dict = {}
    print(machine())
    s3 = S3Server()
    try:
        # -- local file baseline ---------------------------------------------------------------
        local = os.path.join(work, "local.bin")
        local_write_fresh(local, size)
        fd = os.open(local, os.O_RDONLY)       # random reads: the page cache from writing it
        t["local_rand_ops"] = random_reads(lambda off, b: os.preadv(fd, [b], off), size,
                                           a.random_ops)
        os.close(fd)

        # -- raw boto3 PUTs, then torchjuice sequential write ------------------------------------
        url = s3.url()
        raw = create_store(url)
        raw.light_get = False          # the baselines are boto3's own calls (S3Store's light GET is not)
        raw.create()
        block = bytes(4 * MiB)
        keys = [f"raw/{i}" for i in range(size // (4 * MiB))]
        with ThreadPoolExecutor(a.threads) as pool:
            with timer(t, "raw_put"):
                list(pool.map(lambda k: raw.put(k, block), keys))
            list(pool.map(raw.delete, keys))
        meta = f"sqlite3://{work}/meta.db"
        tj.format(meta, "iobench", storage=url)
        with tj.connect(meta, cache_size=0) as vol:        # no cache: measure the upload path
            with timer(t, "tj_write"):
                with vol.open("/big.bin", "wb", buffering=0) as f:
                    for _ in range(size // IO):
                        f.write(buf)
            blocks = vol._blocks_of("/big.bin")

        # -- raw boto3 GETs of the same blocks, then torchjuice cold ------------------------------
        bufs = [memoryview(bytearray(b)) for _, b in blocks[: a.threads]]
        with ThreadPoolExecutor(a.threads) as pool:
            with timer(t, "raw_get"):
                list(pool.map(lambda i: raw.get_into(blocks[i][0], bufs[i % a.threads]),
                              range(len(blocks))))
        cache = os.path.join(work, "cache")
        with tj.connect(meta, cache_dir=cache) as vol:
            with vol.open("/big.bin", "rb", buffering=0) as f:
                with timer(t, "tj_cold"):
                    assert read_all(f, view) == size
            cold_metrics = vol.metrics()

        # -- warm: a fresh client, every block in the disk cache ------------------------------------
        # Two ways a cache gets warm, each against the local file in the same page-cache state:
        # blocks the cold pass cached (written with O_DIRECT while it lagged, so their page cache
        # was filled by reading them, as for a local file read back from disk) and blocks
        # `warmup` cached (written through the page cache, as the local file was).
        def local_timed(reread: bool) -> float:
            with open(local, "rb", buffering=0) as f:
                if reread:
                    os.fsync(f.fileno())                    # dirty pages are not dropped
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                read_all(f, view)                           # into the page cache
                f.seek(0)
                t0 = time.perf_counter()
                assert read_all(f, view) == size
                return time.perf_counter() - t0

        def tj_timed(vol) -> float:
            with vol.open("/big.bin", "rb", buffering=0) as f:
                read_all(f, view)                           # page cache of the cache files warm
            with vol.open("/big.bin", "rb", buffering=0) as f:
                t0 = time.perf_counter()
                assert read_all(f, view) == size
                return time.perf_counter() - t0

        warm_cache = os.path.join(work, "cache-warmup")
        with tj.connect(meta, cache_dir=warm_cache) as vol:
            vol.warmup("/big.bin")
        with tj.connect(meta, cache_dir=cache) as vol:
            warm_fill = vol.warmup("/big.bin")              # blocks the cold pass did not cache
        runs: dict = {k: [] for k in ("local_read", "local_reread", "tj_warm", "tj_warmup")}
        for _ in range(a.rounds):                           # interleaved; medians reported
            runs["local_reread"].append(local_timed(True))
            with tj.connect(meta, cache_dir=cache) as vol:
                runs["tj_warm"].append(tj_timed(vol))
            local_write_fresh(local, size)
            runs["local_read"].append(local_timed(False))
            with tj.connect(meta, cache_dir=warm_cache) as vol:
                runs["tj_warmup"].append(tj_timed(vol))
        for k, v in runs.items():
            t[k] = statistics.median(v)
        with tj.connect(meta, cache_dir=warm_cache) as vol:
            with vol.open("/big.bin", "rb", buffering=0) as f:
                def at(off, b):
                    f.seek(off)
                    f.readinto(b)
                t["tj_rand_ops"] = random_reads(at, size, a.random_ops)
            warm_metrics = vol.metrics()
        raw.close()
    finally:
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)

    def mbps(sec):
        return f"{size / sec / MiB:.0f}"
    rows = [
        ["sequential write to S3", mbps(t["tj_write"]), "raw boto3 parallel PUT", mbps(t["raw_put"]),
         f"{t['raw_put'] / t['tj_write']:.2f}x", ">= 0.85x"],
        ["cold read from S3", mbps(t["tj_cold"]), "raw boto3 parallel GET", mbps(t["raw_get"]),
         f"{t['raw_get'] / t['tj_cold']:.2f}x", ">= 0.85x"],
        ["warm read, cache filled by warmup", mbps(t["tj_warmup"]),
         "local file readinto (page cache from writing it)", mbps(t["local_read"]),
         f"{t['local_read'] / t['tj_warmup']:.2f}x", ">= 0.95x"],
        ["warm read, cache filled by the cold read", mbps(t["tj_warm"]),
         "local file readinto (page cache from reading it)", mbps(t["local_reread"]),
         f"{t['local_reread'] / t['tj_warm']:.2f}x", ">= 0.95x"],
        ["random 4 KiB, warm (ops/s)", f"{t['tj_rand_ops']:.0f}", "local file preadv",
         f"{t['local_rand_ops']:.0f}", f"{t['tj_rand_ops'] / t['local_rand_ops']:.2f}x", "report"],
    ]
    table = fmt_table([f"{size / (1 << 30):.2f} GiB, 8 MiB I/O", "torchjuice MiB/s", "baseline",
                       "baseline MiB/s", "ratio", "target"], rows)
    print(table)
    print(f"cold: {cold_metrics['get_count']} GETs, {cold_metrics['prefetch_count']} prefetched, "
          f"{cold_metrics['cache_skipped']} blocks left uncached (filled by warmup: "
          f"{warm_fill['downloaded_blocks']}); warm (random reads): {warm_metrics['cache_hits']} "
          f"cache hits, {warm_metrics['get_count']} GETs")
    if not a.no_save:
        notes = ("Single reader, 8 MiB readinto into one preallocated buffer. moto runs as its own "
                 "process on 127.0.0.1. The cold row starts with an empty disk cache. Warm rows: "
                 "the local file and the cache files are both in the page cache, filled the same "
                 "way on both sides (by writing, or by reading from disk: copies out of pages "
                 "filled by reads are ~30% slower on this kernel); medians of "
                 f"{a.rounds} interleaved rounds.")
        print("wrote", write_results("io", [{"row": r[0], "torchjuice": r[1], "baseline": r[2],
                                             "baseline_value": r[3], "ratio": r[4]} for r in rows],
                                     table, notes))


if __name__ == "__main__":
    main()
