"""The POSIX mount against the Python API on the same volume: dd-like sequential write and read of
one big file, in one run.

    python -m benchmarks.bench_fuse                   # 1 GiB, 3 rounds
    python -m benchmarks.bench_fuse --size 256M --rounds 2   # quick

One volume (SQLite + a local-directory store, in a temp dir), used at once by this process through
the Python API and by a ``torchjuice mount -d`` process (as users run it). Each round, in turns:

- API write: ``vol.open(p, "wb", buffering=0)``, 1 MiB ``write`` calls from one buffer, ``close``;
- mount write: ``os.open``/``os.write`` of 1 MiB (what ``dd bs=1M`` does), ``close`` (commits);
- API read of the file the mount wrote: ``readinto`` one preallocated 1 MiB buffer;
- mount read of the file the API wrote: ``os.readv`` into one 1 MiB buffer. The mount never held
  that file, so nothing comes from the kernel page cache of the mount;
- mount re-read of that file: unchanged since the mount opened it, so the kernel keeps its pages
  (a second epoch over a dataset), compared with the API's (cold) read.

Each side reads what the other wrote (so the run checks close-to-open too: sizes and a sample of
blocks are compared). The store's files sit in the host page cache for both sides alike. Rows give
the best and the median of the rounds, and the mount/API ratio of the best.
"""
from __future__ import annotations

import argparse
import hashlib
import json
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


def sample(read_at, size: int) -> str:
    """A digest of 8 blocks spread over the file."""
    h = hashlib.sha256()
    for i in range(8):
        h.update(read_at(i * (size // 8), 4096))
    return h.hexdigest()


def run_store(store: str, size: int, rounds: int, tmp: str) -> dict[str, list[float]]:
    """Rounds of the four measurements on one volume; returns the seconds of each."""
    env = {**os.environ, "TORCHJUICE_HOME": os.path.join(tmp, "home")}
    os.environ["TORCHJUICE_HOME"] = env["TORCHJUICE_HOME"]
    meta = f"sqlite3://{tmp}/meta.db"
    tj.format(meta, "benchfuse", storage=store, trash_days=0)
    mp = os.path.join(tmp, "mnt")
    os.mkdir(mp)
    mount_cmd = [sys.executable, "-m", "torchjuice.cli", "mount", meta, mp, "-d"]
    subprocess.run(mount_cmd, check=True, env=env, capture_output=True)
    with open(os.path.join(mp, ".torchjuice")) as f:
        pid = json.load(f)["pid"]
    vol = tj.connect(meta)
    buf = os.urandom(IO)
    view = memoryview(bytearray(IO))
    times: dict[str, list[float]] = {k: [] for k in ("api write", "mount write", "api read",
                                                     "mount read", "mount reread")}
    try:
        for r in range(rounds):
            api_p, fuse_p = f"/api-{r}.bin", f"fuse-{r}.bin"
            times["api write"].append(api_write(vol, api_p, size, buf))
            times["mount write"].append(fuse_write(os.path.join(mp, fuse_p), size, buf))
            t, n = api_read(vol, "/" + fuse_p, view)
            assert n == size, f"the API read {n} bytes of the mount's {size}"
            times["api read"].append(t)
            t, n = fuse_read(os.path.join(mp, api_p.lstrip("/")), view)
            assert n == size, f"the mount read {n} bytes of the API's {size}"
            times["mount read"].append(t)
            # the same file again: unchanged since this mount opened it, so the kernel keeps its
            # page cache (what a second epoch over a dataset sees)
            t, n = fuse_read(os.path.join(mp, api_p.lstrip("/")), view)
            assert n == size
            times["mount reread"].append(t)
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
            print(f"{store.split(':')[0]} round {r + 1}: " + ", ".join(
                f"{k} {size / v[-1] / MiB:.0f} MiB/s" for k, v in times.items()), flush=True)
    finally:
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
    ap.add_argument("--stores", default="file,s3", help="file, s3 or both (default)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where volumes live (default: a temp dir)")
    a = ap.parse_args()

    rows, table = [], []
    for kind in a.stores.split(","):
        size = (a.size if kind == "file" else a.s3_size) // IO * IO
        with tempfile.TemporaryDirectory(dir=a.dir, prefix="tj-bench-fuse-") as tmp:
            if kind == "file":
                times = run_store(f"file://{tmp}/bucket", size, a.rounds, tmp)
            else:
                from torchjuice.testing import S3Server
                srv = S3Server()
                try:
                    times = run_store(srv.url(), size, a.rounds, tmp)
                finally:
                    srv.stop()
        for op in ("write", "read", "reread"):
            api, mnt = times[f"api {'read' if op == 'reread' else op}"], times[f"mount {op}"]
            row = {"store": kind, "op": op, "size": size, "rounds": a.rounds,
                   "api_mib_s": size / min(api) / MiB, "mount_mib_s": size / min(mnt) / MiB,
                   "api_mib_s_median": size / statistics.median(api) / MiB,
                   "mount_mib_s_median": size / statistics.median(mnt) / MiB,
                   "ratio": min(api) / min(mnt),
                   "ratio_median": statistics.median(api) / statistics.median(mnt),
                   "seconds": {"api": api, "mount": mnt}}
            rows.append(row)
            table.append([kind, f"{size / MiB:.0f} MiB", op, f"{row['api_mib_s']:.0f}",
                          f"{row['mount_mib_s']:.0f}", f"{row['ratio']:.2f}",
                          f"{row['api_mib_s_median']:.0f}", f"{row['mount_mib_s_median']:.0f}",
                          f"{row['ratio_median']:.2f}"])
    text = fmt_table(["store", "file", "1 MiB I/O", "API MiB/s", "mount MiB/s", "mount/API",
                      "API median", "mount median", "ratio median"], table)
    print(text)
    notes = (f"{a.rounds} rounds per store; best and median per side. One volume per store "
             "(SQLite metadata) used at once by the Python API in the benchmark process and by a "
             "`torchjuice mount -d` process; each side reads the file the other wrote (the mount "
             "never cached it); `reread` reads that file through the mount once more (the kernel "
             "keeps its page cache for a file unchanged since the mount last opened it), against "
             "the API's read. 1 MiB writes/reads from one buffer (dd bs=1M from Python: "
             "os.write / os.readv on the mount, write / readinto on the API). `file`: a local "
             "directory, read back from the host page cache by both sides, so the API runs at "
             "memory-copy speed and the mount pays FUSE's extra copies and round trips; `s3`: "
             "moto's S3 server in its own process on loopback.")
    path = write_results("fuse", rows, text, notes)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
