"""Dataset benchmark: samples/s and MiB/s through a DataLoader, torchjuice beside the peers, one run.

    python -m benchmarks.bench_datasets                       # 20,000 x 100 KiB files, 64 x 64 MiB shards
    python -m benchmarks.bench_datasets --files 2000 --shards 8 --shard-size 8M --list-files 10000

(a) small files: a map-style dataset over FILES files of FILE_SIZE — torchjuice ``JuiceDataset``
    (in file order and shuffled, and ``JuiceIterableDataset``) on a volume whose blocks are on the
    S3 server, written with ``Volume.write_many`` (small files packed ~40 to a block object, as
    ``torchjuice cp`` writes them), and on a second volume written file by file (one object each),
    beside the same files in a local directory (``open().read()``, in order and shuffled) and
    s3torchconnector's ``S3MapDataset`` on a bucket of the same server holding the same files.
(b) tar shards: SHARDS shards of SHARD_SIZE (WebDataset layout: ``KEY.bin`` of SAMPLE_SIZE plus
    ``KEY.cls``) — torchjuice ``JuiceIterableDataset`` and ``webdataset.WebDataset("juice://...")``,
    beside the shards in a local directory (Python ``tarfile`` streaming, and ``webdataset`` on
    local paths), s3torchconnector's ``S3IterableDataset`` (``enable_sharding=True``) streaming
    each object into ``tarfile``, and ``webdataset`` on the S3 server through a boto3 gopen handler
    (``gopen_schemes["s3"]`` = ``get_object(...)["Body"]``, one GET per shard).
(a') writing those FILES files: a local directory, ``Volume.write_many`` (packed), ``write_bytes``
    on 8 threads (one object per file), and boto3 ``put_object`` on 8 threads to the same server.
(c) listing: building a ``JuiceDataset`` index (one metadata call per directory) over LIST_FILES
    empty files in directories of 1,000, beside ``os.walk`` + ``os.stat`` of the same tree locally,
    and, for the FILES files of (a), beside S3 ListObjectsV2 (s3torchconnector ``from_prefix``).

Every loader: ``torch.utils.data.DataLoader``, WORKERS workers (fork), batch size BATCH; the collate
function reduces each batch to (samples, bytes) inside the worker, so what is measured is reading
and parsing, not inter-process copies. "cold" is the first epoch of a fresh client (empty local
cache; the writer used no cache); "warm" is the second epoch (torchjuice's local disk cache,
issue #3, is on by default for an S3 store). The local directory is in the page cache (warm):
its files are read once right before each local row (this VM reclaims page cache left unused
for a while, even with memory free). The S3 server is moto in its own process on loopback.
"""
from __future__ import annotations

import argparse
import gc
import io
import os
import shutil
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch  # noqa: F401  (import before forking workers)
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from torchjuice.units import parse_size

from .common import LocalFiles, fmt_table, machine, read_all, rewarm, write_results

MiB = 1 << 20
REGION = "us-east-1"


# -- datasets of the baselines ------------------------------------------------------------------------
def measure(batch) -> tuple[int, int]:
    """The collate function: (samples, payload bytes) of a batch, computed in the worker."""
    n = nbytes = 0
    for s in batch:
        n += 1
        if isinstance(s, (bytes, bytearray, memoryview)):
            nbytes += len(s)
        elif isinstance(s, dict):
            nbytes += sum(len(v) for k, v in s.items() if isinstance(v, (bytes, bytearray)))
        else:
            raise TypeError(type(s))
    return n, nbytes


def tar_samples(fileobj, url: str):
    """WebDataset grouping over a tar stream read with Python's tarfile (the baselines' parser)."""
    cur = None
    with tarfile.open(fileobj=fileobj, mode="r|") as tf:
        for m in tf:
            if not m.isreg():
                continue
            data = tf.extractfile(m).read()
            d, _, base = m.name.rpartition("/")
            stem, _, ext = base.partition(".")
            key = f"{d}/{stem}" if d else stem
            if cur is not None and cur["__key__"] == key:
                cur[ext] = data
                continue
            if cur is not None:
                yield cur
            cur = {"__key__": key, "__url__": url, ext: data}
    if cur is not None:
        yield cur


def _my_part(items):
    info = get_worker_info()
    return items if info is None else items[info.id::info.num_workers]


class LocalTars(IterableDataset):
    def __init__(self, paths):
        self.paths = paths

    def __iter__(self):
        for p in _my_part(self.paths):
            with open(p, "rb") as f:
                yield from tar_samples(f, p)


class S3ConnectorTars(IterableDataset):
    """s3torchconnector's S3IterableDataset (sharded over workers), each object streamed into
    tarfile."""

    def __init__(self, uris, endpoint):
        from s3torchconnector import S3ClientConfig, S3IterableDataset
        self.inner = S3IterableDataset.from_objects(
            uris, region=REGION, endpoint=endpoint, enable_sharding=True,
            s3client_config=S3ClientConfig(force_path_style=True))

    def __iter__(self):
        for reader in self.inner:
            yield from tar_samples(reader, reader.key)


_boto = {}


def gopen_boto3(url, mode="rb", bufsize=8192, **kw):
    """webdataset gopen handler for s3:// on the benchmark's server: one streaming GET."""
    import boto3
    c = _boto.get(os.getpid())
    if c is None:
        c = _boto[os.getpid()] = boto3.client("s3", endpoint_url=os.environ["BENCH_S3_ENDPOINT"],
                                             region_name=REGION)
    bucket, key = url[len("s3://"):].split("/", 1)
    return c.get_object(Bucket=bucket, Key=key)["Body"]


# -- running -------------------------------------------------------------------------------------------
def disk_read_kib() -> int:
    """KiB this machine has read from its disks so far (/proc/vmstat pgpgin; 0 where absent)."""
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("pgpgin "):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_epoch(ds, workers: int, batch: int, shuffle: bool = False) -> dict:
    loader = DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=measure,
                        multiprocessing_context="fork" if workers else None, shuffle=shuffle,
                        generator=torch.Generator().manual_seed(0) if shuffle else None)
    disk = disk_read_kib()
    t = time.perf_counter()
    n = nbytes = 0
    for k, b in loader:
        n += k
        nbytes += b
    secs = time.perf_counter() - t
    return {"seconds": secs, "samples": n, "bytes": nbytes,
            "disk_read_mib": (disk_read_kib() - disk) // 1024}


def put_many(fn, items, threads: int = 8) -> None:
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(fn, items):
            pass


def make_shard(index: int, size: int, sample_size: int, base: bytes) -> tuple[bytes, int]:
    buf = io.BytesIO()
    n = 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        while buf.tell() + sample_size + 2048 <= size or n == 0:
            key = f"s{index:05d}-{n:06d}"
            off = (index * 7919 + n * 104729) % (len(base) - sample_size)
            for ext, data in (("bin", base[off:off + sample_size]), ("cls", str(n % 1000).encode())):
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
            n += 1
    return buf.getvalue(), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--file-size", type=parse_size, default=100 << 10)
    ap.add_argument("--shards", type=int, default=64)
    ap.add_argument("--shard-size", type=parse_size, default=64 << 20)
    ap.add_argument("--sample-size", type=parse_size, default=100 << 10)
    ap.add_argument("--list-files", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--parts", default="files,shards,list")
    ap.add_argument("--no-save", action="store_true", help="print only; do not write results/")
    a = ap.parse_args()
    parts = set(a.parts.split(","))

    work = tempfile.mkdtemp(prefix="tj-bench-data-")
    os.environ["TORCHJUICE_HOME"] = os.path.join(work, "home")
    os.environ["TORCHJUICE_CACHE_DIR"] = os.path.join(work, "cache")     # the readers' cache
    os.environ.pop("TORCHJUICE_META", None)
    import torchjuice as tj
    from torchjuice.data import JuiceDataset, JuiceIterableDataset
    from torchjuice.testing import S3Server
    import boto3

    print(machine(), flush=True)
    s3 = S3Server()
    os.environ["BENCH_S3_ENDPOINT"] = s3.endpoint
    client = boto3.client("s3", endpoint_url=s3.endpoint, region_name=REGION)
    base = os.urandom(max(a.file_size, a.sample_size) * 4 + (1 << 20))
    rows: list[dict] = []
    current = [""]                  # the part (files, shards, list) being run

    def record(part, label, res, epoch):
        res = {"part": part, "label": label, "epoch": epoch, **res,
               "samples_per_s": res["samples"] / res["seconds"],
               "MiB_per_s": res["bytes"] / MiB / res["seconds"],
               "load1": os.getloadavg()[0], "run": current[0],
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        rows.append(res)
        print(f"  {part:6s} {label:44s} {epoch:5s} {res['samples']:7d} samples "
              f"{res['seconds']:7.2f}s {res['samples_per_s']:9.0f}/s {res['MiB_per_s']:8.1f} MiB/s "
              f"load {res['load1']:.1f}"
              + (f" disk reads {res['disk_read_mib']} MiB" if "disk_read_mib" in res else ""),
              flush=True)

    def volume(name: str):
        meta = f"sqlite3://{work}/{name}.db"
        tj.format(meta, name, storage=s3.url())
        return tj.connect(meta, cache_size=0)          # the writer keeps no cache

    def best_warm(local, make, shuffle=False):
        """Warm at its best: the fastest of 3 epochs, the files under ``local`` (a local directory,
        or torchjuice's disk cache) read into the page cache right before (this VM reclaims page
        cache left unused)."""
        rewarm([local])
        return min((run_epoch(make(), a.workers, a.batch, shuffle) for _ in range(3)),
                   key=lambda r: r["seconds"])

    def epochs(part, label, make, names=("cold", "warm"), shuffle=False):
        for epoch in names:
            record(part, label, run_epoch(make(), a.workers, a.batch, shuffle), epoch)
            gc.collect()

    def two_epochs(part, label, make):
        epochs(part, label, make)

    def juice_epochs(part, label, make, shuffle=False):
        shutil.rmtree(os.environ["TORCHJUICE_CACHE_DIR"], ignore_errors=True)
        epochs(part, label, make, ("cold",), shuffle)
        cache = os.environ["TORCHJUICE_CACHE_DIR"]
        held = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache) for f in fs
                   if not f.endswith(".tmp"))
        rows[-1]["cache_mib_after"] = round(held / MiB)
        print(f"  {part:6s} {label}: the disk cache holds {held / MiB:.0f} MiB after the cold "
              "epoch", flush=True)
        epochs(part, label, make, ("warm",), shuffle)        # the 2nd epoch, as it comes
        # then warm as the local directory rows are measured: the local disk cache's files read
        # once right before, the best of 3 epochs
        record(part, label, best_warm(cache, make, shuffle), "best3")

    try:
        # -- (a) small files ------------------------------------------------------------------------
        if "files" in parts:
            current[0] = "files"
            print(f"(a) {a.files} files of {a.file_size} bytes", flush=True)
            names = [f"d{i // 1000:03d}/f{i:06d}.bin" for i in range(a.files)]

            def content(i):
                off = (i * 104729) % (len(base) - a.file_size)
                return base[off:off + a.file_size]
            local = os.path.join(work, "files")
            for d in sorted({n.split("/")[0] for n in names}):
                os.makedirs(os.path.join(local, d))
            def timed_write(label, fn):
                t = time.perf_counter()
                fn()
                record("write", label, {"seconds": time.perf_counter() - t, "samples": a.files,
                                        "bytes": a.files * a.file_size}, "-")

            def write_local():
                for i, n in enumerate(names):
                    with open(os.path.join(local, n), "wb") as f:
                        f.write(content(i))
            timed_write("local dir, open().write(), 1 thread", write_local)
            with volume("benchfiles") as vol:           # small files packed (as `cp` does)
                for d in sorted({n.split("/")[0] for n in names}):
                    vol.makedirs(f"/files/{d}")
                timed_write("torchjuice Volume.write_many (packed), 1 thread", lambda: vol.write_many(
                    (f"/files/{names[i]}", content(i)) for i in range(a.files)))
                print(f"  {vol.metrics()['put_count']} objects", flush=True)
            with volume("benchfiles1") as vol:          # one object per file (write_bytes)
                for d in sorted({n.split("/")[0] for n in names}):
                    vol.makedirs(f"/files/{d}")
                timed_write("torchjuice Volume.write_bytes, 8 threads", lambda: put_many(
                    lambda i: vol.write_bytes(f"/files/{names[i]}", content(i)), range(a.files)))
            client.create_bucket(Bucket="bench-files")
            timed_write("boto3 put_object, 8 threads", lambda: put_many(
                lambda i: client.put_object(Bucket="bench-files", Key=f"files/{names[i]}",
                                            Body=content(i)), range(a.files)))

            # listing the same files three ways
            t = time.perf_counter()
            jds = JuiceDataset("juice://benchfiles/files/")
            t_juice = time.perf_counter() - t
            from s3torchconnector import S3ClientConfig, S3MapDataset
            t = time.perf_counter()
            sds = S3MapDataset.from_prefix("s3://bench-files/files/", region=REGION,
                                           endpoint=s3.endpoint, transform=read_all,
                                           s3client_config=S3ClientConfig(force_path_style=True))
            len(sds)
            t_s3 = time.perf_counter() - t
            t = time.perf_counter()
            paths = sorted(os.path.join(r, f) for r, _, fs in os.walk(local) for f in fs)
            sizes = [os.stat(p).st_size for p in paths]
            t_local = time.perf_counter() - t
            assert len(jds) == len(sds) == len(paths) == a.files and sum(sizes) == jds.urls.total_size
            for label, secs in (("local dir (os.walk + stat)", t_local),
                                ("torchjuice JuiceDataset index", t_juice),
                                ("s3torchconnector from_prefix (ListObjectsV2)", t_s3)):
                record("list", label, {"seconds": secs, "samples": a.files, "bytes": 0}, "-")

            for shuffle in (False, True):
                record("files", "local dir, open().read()" + (", shuffled" if shuffle else ""),
                       best_warm(local, lambda: LocalFiles(paths), shuffle), "warm")
            juice_epochs("files", "torchjuice JuiceDataset",
                         lambda: JuiceDataset("juice://benchfiles/files/"))
            # the same two warm, side by side: 3 rounds of one epoch each, who goes first
            # alternating (the first reader of a round gets the memory the last one freed; see
            # bench_fuse), the best epoch of each
            turns: dict[str, list] = {"local": [], "tj": []}
            os.sync()
            rewarm([local, os.environ["TORCHJUICE_CACHE_DIR"]])
            sides = [("local", lambda: LocalFiles(paths)),
                     ("tj", lambda: JuiceDataset("juice://benchfiles/files/"))]
            for rnd in range(3):
                for side, make in sides if rnd % 2 == 0 else sides[::-1]:
                    turns[side].append(run_epoch(make(), a.workers, a.batch))
            for side, label, epoch in (("local", "local dir, open().read(), in turns", "warm"),
                                       ("tj", "torchjuice JuiceDataset, in turns", "best3")):
                record("files", label, min(turns[side], key=lambda r: r["seconds"]), epoch)
            juice_epochs("files", "torchjuice JuiceDataset, shuffled",
                         lambda: JuiceDataset("juice://benchfiles/files/"), shuffle=True)
            juice_epochs("files", "torchjuice JuiceDataset, object per file",
                         lambda: JuiceDataset("juice://benchfiles1/files/"))
            two_epochs("files", "s3torchconnector S3MapDataset", lambda: sds)
            juice_epochs("files", "torchjuice JuiceIterableDataset (files)",
                         lambda: JuiceIterableDataset("juice://benchfiles/files/"))
            shutil.rmtree(os.environ["TORCHJUICE_CACHE_DIR"], ignore_errors=True)
            tj.volume_for("benchfiles1").close()
            shutil.rmtree(local, ignore_errors=True)
            tj.volume_for("benchfiles").close()
            # a fresh S3 server for the next part: moto, on this machine, keeps the memory the
            # files part's objects took after a reset, and the shards rows would run beside it
            s3.stop()
            s3 = S3Server()
            os.environ["BENCH_S3_ENDPOINT"] = s3.endpoint
            client = boto3.client("s3", endpoint_url=s3.endpoint, region_name=REGION)
            gc.collect()

        # -- (b) tar shards -------------------------------------------------------------------------
        if "shards" in parts:
            current[0] = "shards"
            print(f"(b) {a.shards} shards of {a.shard_size} bytes, samples of {a.sample_size}",
                  flush=True)
            local = os.path.join(work, "shards")
            os.makedirs(local)
            t = time.perf_counter()
            total = 0
            with volume("benchshards") as vol:
                vol.makedirs("/shards")

                def put_shard(i):
                    data, n = make_shard(i, a.shard_size, a.sample_size, base)
                    name = f"shard-{i:06d}.tar"
                    with open(os.path.join(local, name), "wb") as f:
                        f.write(data)
                    vol.write_bytes(f"/shards/{name}", data)
                    return n
                with ThreadPoolExecutor(2) as pool:
                    total = sum(pool.map(put_shard, range(a.shards)))
            print(f"  wrote {total} samples x 2 places in {time.perf_counter() - t:.1f}s", flush=True)
            names = [f"shard-{i:06d}.tar" for i in range(a.shards)]
            pattern = f"{{{0:06d}..{a.shards - 1:06d}}}"
            import webdataset as wds
            import torchjuice.webdataset  # noqa: F401
            wds.gopen_schemes["s3"] = gopen_boto3

            def local_wds():
                return wds.WebDataset(f"{local}/shard-{pattern}.tar", shardshuffle=False)
            record("shards", "local dir, tarfile", best_warm(
                local, lambda: LocalTars([os.path.join(local, n) for n in names])), "warm")
            record("shards", "local dir, webdataset", best_warm(local, local_wds), "warm")
            juice_epochs("shards", "torchjuice JuiceIterableDataset",
                         lambda: JuiceIterableDataset(f"juice://benchshards/shards/shard-{pattern}.tar"))
            juice_epochs("shards", "torchjuice JuiceIterableDataset, cache_fill='wait'",
                         lambda: JuiceIterableDataset(f"juice://benchshards/shards/shard-{pattern}.tar",
                                                      cache_fill="wait"))
            juice_epochs("shards", "torchjuice JuiceIterableDataset, cache_fill='direct'",
                         lambda: JuiceIterableDataset(f"juice://benchshards/shards/shard-{pattern}.tar",
                                                      cache_fill="direct"))
            shutil.rmtree(os.environ["TORCHJUICE_CACHE_DIR"], ignore_errors=True)
            two_epochs("shards", "torchjuice webdataset juice://",
                       lambda: wds.WebDataset(f"juice://benchshards/shards/shard-{pattern}.tar",
                                              shardshuffle=False))
            shutil.rmtree(os.environ["TORCHJUICE_CACHE_DIR"], ignore_errors=True)
            # The S3 server keeps its objects in this machine's memory: the peers' copy of the
            # shards goes in only now, the volume's out, so that no more than one copy presses the
            # page cache of the side being measured (a real S3 server is another machine).
            tj.volume_for("benchshards").close()
            s3.reset()
            client.create_bucket(Bucket="bench-shards")
            t = time.perf_counter()

            def put_object(name):
                with open(os.path.join(local, name), "rb") as f:
                    client.put_object(Bucket="bench-shards", Key=f"shards/{name}", Body=f.read())
            put_many(put_object, names, threads=2)
            print(f"  put the shards in a bucket in {time.perf_counter() - t:.1f}s", flush=True)
            two_epochs("shards", "s3torchconnector S3IterableDataset+tarfile",
                       lambda: S3ConnectorTars([f"s3://bench-shards/shards/{n}" for n in names],
                                               s3.endpoint))
            two_epochs("shards", "webdataset s3:// (boto3 gopen)",
                       lambda: wds.WebDataset(f"s3://bench-shards/shards/shard-{pattern}.tar",
                                              shardshuffle=False))
            shutil.rmtree(local, ignore_errors=True)
            s3.reset()

        # -- (c) listing speed ----------------------------------------------------------------------
        if "list" in parts and a.list_files:
            current[0] = "list"
            print(f"(c) listing {a.list_files} files", flush=True)
            meta = f"sqlite3://{work}/benchlist.db"
            tj.format(meta, "benchlist", storage=f"file://{work}/listdata")
            local = os.path.join(work, "list")
            t = time.perf_counter()
            with tj.connect(meta) as vol:
                for i in range(a.list_files):
                    if i % 1000 == 0:
                        vol.makedirs(f"/list/d{i // 1000:04d}")
                        os.makedirs(f"{local}/d{i // 1000:04d}")
                    vol.open(f"/list/d{i // 1000:04d}/f{i:07d}", "wb").close()
                    open(f"{local}/d{i // 1000:04d}/f{i:07d}", "wb").close()
            print(f"  created in {time.perf_counter() - t:.1f}s", flush=True)
            t = time.perf_counter()
            ds = JuiceDataset("juice://benchlist/list/")
            t_juice = time.perf_counter() - t
            t = time.perf_counter()
            paths = sorted(os.path.join(r, f) for r, _, fs in os.walk(local) for f in fs)
            for p in paths:
                os.stat(p)
            t_local = time.perf_counter() - t
            assert len(ds) == len(paths) == a.list_files
            record("list", "local dir (os.walk + stat)", {"seconds": t_local, "samples": a.list_files,
                                                          "bytes": 0}, "-")
            record("list", "torchjuice JuiceDataset index (sqlite)",
                   {"seconds": t_juice, "samples": a.list_files, "bytes": 0}, "-")
    finally:
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(tables(rows))
    if not a.no_save:
        notes = (f"DataLoader: {a.workers} workers (fork), batch {a.batch}; the collate reduces each "
                 "batch to (samples, bytes) in the worker. cold = first epoch of a fresh client "
                 "(empty local cache); warm = second epoch, as it comes; best3 = warm measured as "
                 "the local directory rows are: the files read (here the local disk cache's) "
                 "read once right before, then the best of 3 epochs (torchjuice's local disk "
                 "cache is on by default for an S3 store; its fill runs in the background at a "
                 "low priority (nice 10); both data sets fit in half the memory, so the datasets' "
                 "cache_fill='auto' makes a cold epoch wait for the fill rather than leave blocks "
                 "uncached: 'wait' for the 100 KiB files (packed, read back in pieces: through "
                 "the page cache), 'adaptive' for the 64 MiB shards (through the page cache while "
                 "the fill keeps up, with O_DIRECT when it falls behind; such blocks are read "
                 "back with O_DIRECT); the rows marked cache_fill='wait' and 'direct' (always "
                 "O_DIRECT) show the other modes on the shards; the cache "
                 "size after the cold epoch is in the JSON). s3torchconnector and webdataset have no cache. Local directory rows: from the page cache "
                 "(their files read once right before, as this VM reclaims page cache left "
                 "unused), the best of 3 runs; shuffled rows (the DataLoader's "
                 "RandomSampler, seed 0) compare with the shuffled local row; the 'in turns' "
                 "rows: the local directory and torchjuice's warm cache read side by side, 3 "
                 "rounds of one epoch each, who goes first alternating, the best epoch of each, "
                 "compared with each other. 'vs' columns are "
                 "time ratios (>1: faster than the reference). 'load' is the 1-minute load average "
                 "when the row finished (other work shares this 2-core machine). 'disk reads': "
                 "what the machine read from its disk during the row (/proc/vmstat). S3 server: "
                 "moto in its own process on loopback, holding its objects in this machine's "
                 "memory; for the shards, the peers' bucket is filled only after torchjuice's "
                 "rows and the volume's objects dropped first.")
        # a run of some parts goes to a file of its own, not over the full run's
        name = "datasets" if set(parts) >= {"files", "shards", "list"} else \
            "datasets-" + "-".join(sorted(parts))
        print("wrote", write_results(name, rows, tables(rows), notes))


def tables(rows: list[dict]) -> str:
    def find(part, label, epoch):
        return next((r for r in rows if r["part"] == part and r["label"] == label
                     and r["epoch"] == epoch), None)

    out_tables = []
    for part, local_label, peer_label in (
            ("files", "local dir, open().read()", "s3torchconnector S3MapDataset"),
            ("shards", "local dir, tarfile", "s3torchconnector S3IterableDataset+tarfile")):
        sel = [r for r in rows if r["part"] == part]
        if not sel:
            continue
        out = []
        for r in sel:
            suffix = next((x for x in (", shuffled", ", in turns") if r["label"].endswith(x)), "")
            loc = (suffix and find(part, local_label + suffix, "warm")) or \
                find(part, local_label, "warm")
            peer = find(part, peer_label, r["epoch"]) or find(part, peer_label, "warm")
            out.append([r["label"], r["epoch"], r["samples"], f"{r['samples_per_s']:.0f}",
                        f"{r['MiB_per_s']:.1f}",
                        f"{loc['seconds'] / r['seconds']:.2f}x" if loc else "-",
                        f"{peer['seconds'] / r['seconds']:.2f}x" if peer else "-",
                        f"{r.get('load1', float('nan')):.1f}"])
        size = sel[0]["bytes"] / max(1, sel[0]["samples"])
        title = (f"(a) {sel[0]['samples']} files x {size / 1024:.0f} KiB" if part == "files" else
                 f"(b) {sel[0]['samples']} samples in tar shards")
        out_tables.append(fmt_table([title, "epoch", "samples", "samples/s", "MiB/s",
                                     "vs local dir", "vs s3torchconnector same epoch", "load"], out))
    wr = [r for r in rows if r["part"] == "write"]
    if wr:
        ref = next((r for r in wr if r["label"].startswith("boto3")), None)
        out_tables.append(fmt_table(
            [f"writing {wr[0]['samples']} files x {wr[0]['bytes'] / wr[0]['samples'] / 1024:.0f} KiB",
             "seconds", "files/s", "MiB/s", "vs boto3 put_object", "load"],
            [[r["label"], f"{r['seconds']:.1f}", f"{r['samples_per_s']:.0f}",
              f"{r['MiB_per_s']:.1f}", f"{ref['seconds'] / r['seconds']:.2f}x" if ref else "-",
              f"{r.get('load1', float('nan')):.1f}"] for r in wr]))
    lst = [r for r in rows if r["part"] == "list"]
    if lst:
        out_tables.append(fmt_table(["listing", "files", "seconds", "files/s", "load"],
                                    [[r["label"], r["samples"], f"{r['seconds']:.2f}",
                                      f"{r['samples_per_s']:.0f}", f"{r.get('load1', float('nan')):.1f}"]
                                     for r in lst]))
    return "\n\n".join(out_tables)


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"total {time.time() - t0:.0f}s")
