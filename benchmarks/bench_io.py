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
  both);
- random 4 KiB reads on the warm cache: ops/s beside ``os.preadv`` on the local file.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
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
        with open(local, "wb", buffering=0) as f:
            for _ in range(size // IO):
                f.write(buf)
        with open(local, "rb", buffering=0) as f:
            read_all(f, view)                               # page cache warm
            f.seek(0)
            with timer(t, "local_read"):
                assert read_all(f, view) == size
        fd = os.open(local, os.O_RDONLY)
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
        with tj.connect(meta, cache_dir=cache) as vol:
            warm_fill = vol.warmup("/big.bin")              # blocks the cold pass did not cache
            with vol.open("/big.bin", "rb", buffering=0) as f:
                read_all(f, view)                           # page cache of the cache files warm
            with vol.open("/big.bin", "rb", buffering=0) as f:
                with timer(t, "tj_warm"):
                    assert read_all(f, view) == size

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
        ["warm read (disk cache)", mbps(t["tj_warm"]), "local file readinto", mbps(t["local_read"]),
         f"{t['local_read'] / t['tj_warm']:.2f}x", ">= 0.95x"],
        ["random 4 KiB, warm (ops/s)", f"{t['tj_rand_ops']:.0f}", "local file preadv",
         f"{t['local_rand_ops']:.0f}", f"{t['tj_rand_ops'] / t['local_rand_ops']:.2f}x", "report"],
    ]
    table = fmt_table([f"{size / (1 << 30):.2f} GiB, 8 MiB I/O", "torchjuice MiB/s", "baseline",
                       "baseline MiB/s", "ratio", "target"], rows)
    print(table)
    print(f"cold: {cold_metrics['get_count']} GETs, {cold_metrics['prefetch_count']} prefetched, "
          f"{cold_metrics['cache_skipped']} blocks left uncached (filled by warmup: "
          f"{warm_fill['downloaded_blocks']}); warm: {warm_metrics['cache_hits']} cache hits, "
          f"{warm_metrics['get_count'] - warm_fill['downloaded_blocks']} GETs")
    if not a.no_save:
        notes = ("Single reader, 8 MiB readinto into one preallocated buffer. moto runs as its own "
                 "process on 127.0.0.1. The local file and the cache files are both in the page "
                 "cache (warm rows); the cold row starts with an empty disk cache.")
        print("wrote", write_results("io", [{"row": r[0], "torchjuice": r[1], "baseline": r[2],
                                             "baseline_value": r[3], "ratio": r[4]} for r in rows],
                                     table, notes))


if __name__ == "__main__":
    main()
