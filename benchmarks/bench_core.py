"""Core engine benchmark: big-file sequential write/read and small-file metadata operations on each
metadata engine, side by side with the same work on a local directory, in one run.

    python -m benchmarks.bench_core                 # 1 GiB file, 10,000 small files
    python -m benchmarks.bench_core --size 256M --files 2000 --engines sqlite   # quick

Big file: 8 MiB writes from one buffer, then 8 MiB ``readinto`` into one preallocated buffer.
Every engine runs on a local-directory store; SQLite also on the S3 server (moto, its own process,
loopback), beside raw boto3 parallel PUTs/GETs of the same 4 MiB blocks. Metadata: create (empty
file), stat, rename, unlink of N files in one directory from one Python client. Nothing here drops
the page cache: the local file and the file store are both read back warm.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torchjuice as tj
from torchjuice.units import parse_size
from torchjuice.testing import PostgresServer, RedisServer, S3Server, ServerUnavailable

from .common import fmt_table, machine, timer, write_results

MiB = 1 << 20
IO = 8 * MiB


def big_local(path: str, size: int, buf: bytearray) -> dict:
    out = {}
    with timer(out, "write"):
        with open(path, "wb", buffering=0) as f:
            for _ in range(size // IO):
                f.write(buf)
    view = memoryview(buf)
    with timer(out, "read"):
        with open(path, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    os.remove(path)
    return out


def big_volume(vol, size: int, buf: bytearray) -> dict:
    out = {}
    with timer(out, "write"):
        with vol.open("/big.bin", "wb", buffering=0) as f:
            for _ in range(size // IO):
                f.write(buf)
    view = memoryview(buf)
    with timer(out, "read"):
        with vol.open("/big.bin", "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    vol.remove("/big.bin")
    return out


def raw_s3(url: str, size: int, block: int = 4 * MiB, threads: int = 16) -> dict:
    """Raw boto3: parallel PUTs then parallel GETs of ``size/block`` blocks (the ceiling)."""
    from torchjuice.object import create_store
    store = create_store(url)
    store.create()
    data = os.urandom(block)
    keys = [f"raw/{i}" for i in range(size // block)]
    out = {}
    with ThreadPoolExecutor(threads) as pool:
        with timer(out, "write"):
            list(pool.map(lambda k: store.put(k, data), keys))
        bufs = [bytearray(block) for _ in range(threads)]

        def get(i):
            store.get_into(keys[i], memoryview(bufs[i % threads]))
        with timer(out, "read"):
            list(pool.map(get, range(len(keys))))
        list(pool.map(store.delete, keys))
    store.close()
    return out


def meta_local(root: str, n: int) -> dict:
    out = {}
    names = [os.path.join(root, f"f{i}") for i in range(n)]
    with timer(out, "create"):
        for p in names:
            os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
    with timer(out, "stat"):
        for p in names:
            os.stat(p)
    with timer(out, "rename"):
        for p in names:
            os.rename(p, p + "r")
    with timer(out, "unlink"):
        for p in names:
            os.unlink(p + "r")
    return out


def meta_volume(vol, n: int) -> dict:
    out = {}
    vol.makedirs("/small", exist_ok=True)
    names = [f"/small/f{i}" for i in range(n)]
    with timer(out, "create"):
        for p in names:
            vol.open(p, "wb", buffering=0).close()
    with timer(out, "stat"):
        for p in names:
            vol.stat(p)
    with timer(out, "rename"):
        for p in names:
            vol.rename(p, p + "r")
    with timer(out, "unlink"):
        for p in names:
            vol.remove(p + "r")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=1 << 30)
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--engines", default="sqlite,redis,postgres")
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--no-save", action="store_true", help="print only; do not write results/")
    a = ap.parse_args()
    size = max(IO, a.size // IO * IO)
    engines = a.engines.split(",")
    work = tempfile.mkdtemp(prefix="tj-bench-core-")
    servers = []
    buf = bytearray(os.urandom(IO))
    print(machine())
    try:
        def start(cls):
            try:
                srv = cls()
                servers.append(srv)
                return srv
            except ServerUnavailable as e:
                print(f"skipping: {e}")
                return None

        meta_urls = {}
        for engine in engines:
            if engine == "sqlite":
                meta_urls[engine] = lambda tag: f"sqlite3://{work}/{tag}.db"
            elif engine == "redis" and (r := start(RedisServer)):
                meta_urls[engine] = lambda tag, r=r: r.url()
            elif engine == "postgres" and (p := start(PostgresServer)):
                meta_urls[engine] = lambda tag, p=p: p.url()
        s3 = None if a.no_s3 else start(S3Server)

        big, meta_rows = [], []
        local = big_local(os.path.join(work, "local.bin"), size, buf)
        big.append(("local file", local))
        os.makedirs(os.path.join(work, "localdir"))
        meta_local_t = meta_local(os.path.join(work, "localdir"), a.files)
        meta_rows.append(("local dir", meta_local_t))

        def volume(engine, storage, tag):
            url = meta_urls[engine](tag)
            tj.format(url, tag, storage=storage)
            return tj.connect(url)

        for engine in meta_urls:
            with volume(engine, f"file://{work}/store-{engine}", f"big-{engine}") as vol:
                big.append((f"torchjuice {engine} + file", big_volume(vol, size, buf)))
            with volume(engine, f"file://{work}/store-m-{engine}", f"meta-{engine}") as vol:
                meta_rows.append((f"torchjuice {engine}", meta_volume(vol, a.files)))
            print(f"done: {engine}", flush=True)
        if s3 is not None:
            big.append(("raw boto3 16 threads", raw_s3(s3.url(), size)))
            if "sqlite" in meta_urls:
                with volume("sqlite", s3.url(), "big-s3") as vol:
                    big.append(("torchjuice sqlite + s3", big_volume(vol, size, buf)))
    finally:
        for srv in servers:
            srv.stop()
        shutil.rmtree(work, ignore_errors=True)

    gib = size / (1 << 30)
    rows = []
    out_rows = []
    for label, t in big:
        base = local if "s3" not in label and "boto3" not in label else dict(big)["raw boto3 16 threads"]
        w, r = size / t["write"] / MiB, size / t["read"] / MiB
        rows.append([label, f"{w:.0f}", f"{r:.0f}", f"{base['write'] / t['write']:.2f}x",
                     f"{base['read'] / t['read']:.2f}x"])
        out_rows.append({"kind": "big", "label": label, "write_MiBps": w, "read_MiBps": r})
    table1 = fmt_table([f"{gib:.2f} GiB sequential", "write MiB/s", "read MiB/s",
                        "write vs base", "read vs base"], rows)
    rows = []
    for label, t in meta_rows:
        ops = {k: a.files / v for k, v in t.items()}
        rows.append([label] + [f"{ops[k]:.0f}" for k in ("create", "stat", "rename", "unlink")] +
                    [f"{meta_local_t['stat'] / t['stat']:.3f}x"])
        out_rows.append({"kind": "meta", "label": label, **{f"{k}_per_s": v for k, v in ops.items()}})
    table2 = fmt_table([f"{a.files} small files", "create/s", "stat/s", "rename/s", "unlink/s",
                        "stat vs local"], rows)
    table = table1 + "\n\n" + table2
    print(table)
    if not a.no_save:
        notes = ("Base for file-store rows: a local file written and read the same way; for S3 rows: "
                 "raw boto3 parallel PUT/GET of the same bytes in 4 MiB blocks on the same moto "
                 "server. Page cache not dropped (both sides warm). Metadata ops: one Python client.")
        print("wrote", write_results("core", out_rows, table, notes))


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"total {time.time() - t0:.0f}s")
