"""Checkpoint benchmark: tj.save/tj.load, tj.async_save and torch.distributed.checkpoint on
torchjuice volumes, side by side with torch.save to a local file, s3torchconnector's S3Checkpoint
and raw parallel PUTs/GETs of the same bytes, in one run.

    python -m benchmarks.bench_checkpoint                       # a 1.5 GB state dict
    python -m benchmarks.bench_checkpoint --size 256M --repeat 1 --no-save     # quick

The state dict: float32 and bfloat16 "layer" tensors of 4-48 MiB plus small biases, sized to
--size. Each method saves it and loads it back (the load is checked against the original).

- local: ``torch.save``/``torch.load`` with a local file (page cache, no fsync: the base for the
  local rows); ``tj.save``/``tj.load`` on a volume with a local-directory store (SQLite).
- S3: the S3 server is moto in its own process on loopback, started afresh for each group of
  measurements (``fresh_s3``: moto keeps the memory of deleted objects) and for
  s3torchconnector (``s3c_run``).
  ``tj.save``/``tj.load`` on a volume with that S3 store (SQLite metadata, 4 MiB blocks, 16
  upload/download threads); s3torchconnector's ``S3Checkpoint`` writer (the AWS CRT client; it
  always uploads multipart, and moto reassembles the parts with a full copy when the upload
  completes: a cost of the test server that real S3 does not have) and, for loads, its range-based
  reader (``S3ReaderConstructor.range_based()``; ``S3Checkpoint.reader``'s default sequential
  reader took 197 s for the 1.5 GB load in a trial on this machine, and once failed with CRT's
  "failure to meet throughput minimum"). Its load runs once, in the first run only: moto answers
  every ranged GET by copying the whole object (1.5 GB) first, so a reader of one big object pays
  that per request -- a cost of the test server, not of the peer; torchjuice and the raw GETs
  read 4 MiB objects;
  raw boto3: the serialised checkpoint cut into 4 MiB blocks before the clock starts, then
  ``create_store(url).put``/``get_into`` of every block from 16 threads -- the ceiling the S3 rows
  are compared with. "tj.save replacing" saves over the checkpoint just written (the old blocks are
  deleted inside the call). The S3 volume runs without the local disk cache (so loads come from
  S3); "+ local disk cache" is the default setting for remote stores, which also writes every
  block it uploads to the cache (at low priority, skipping blocks when behind).
- async: ``tj.async_save`` -- the time until it returns (the snapshot: what training waits for) and
  until ``future.result()``; "first" is a process's first call (snapshot buffers allocated),
  "steady" a later one (buffers reused).
- DCP: ``dcp.save``/``dcp.load`` of the same state dict (one process) on the S3 volume with
  ``checkpoint_id="juice://..."`` (torch's FsspecWriter: sync_files=True -> os.sync() per file),
  FsspecWriter(sync_files=False), and JuiceStorageWriter/JuiceStorageReader.

Figures are the median of --repeat runs, methods interleaved. moto 5.2's CompleteMultipartUpload
reply names its root element ``CompleteMultipartUploadResponse`` where S3 says
``CompleteMultipartUploadResult``; the CRT client then fails with 'Header "ETag" not found', so the
server process here patches that one element name (boto3 and torchjuice ignore it).
"""
from __future__ import annotations

import argparse
import gc
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

MiB = 1 << 20
BLOCK = 4 * MiB
THREADS = 16

MOTO_PATCH = r"""
import sys
from moto.s3.responses import S3Response
_serialized = S3Response.serialized
def serialized(self, result):
    status, headers, body = _serialized(self, result)
    if self.data.get("Action") == "CompleteMultipartUpload":
        old, new = "CompleteMultipartUploadResponse", "CompleteMultipartUploadResult"
        body = body.replace(old.encode(), new.encode()) if isinstance(body, bytes) else body.replace(old, new)
    return status, headers, body
S3Response.serialized = serialized
from moto.server import main
sys.exit(main(sys.argv[1:]))
"""


def start_s3():
    """torchjuice.testing.S3Server, with the CompleteMultipartUpload element name fixed."""
    from torchjuice.testing import S3Server, _wait_port, free_port

    class PatchedS3Server(S3Server):
        def __init__(self):
            self.port = free_port()
            self.endpoint = f"http://127.0.0.1:{self.port}"
            # two malloc arenas: moto's thread-per-request server otherwise keeps freed 4 MiB
            # objects in many arenas and grows past 15 GB over a run (then the OOM killer)
            self.proc = subprocess.Popen(
                [sys.executable, "-c", MOTO_PATCH, "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env={**os.environ, "MALLOC_ARENA_MAX": "2"})
            _wait_port(self.port, self.proc, "moto server")
            for k, v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                         ("AWS_DEFAULT_REGION", "us-east-1")):
                os.environ.setdefault(k, v)
            self._n = 0

    return PatchedS3Server()


def make_state(size: int):
    """About ``size`` bytes of float32/bfloat16 tensors of 4-48 MiB, and small biases."""
    import torch
    g = torch.Generator().manual_seed(0)
    sd, total, i = {}, 0, 0
    shapes = [(4096, 3072, torch.float32), (2048, 2048, torch.bfloat16), (4096, 1024, torch.float32),
              (1024, 2048, torch.float32)]
    while total < size:
        rows, cols, dt = shapes[i % len(shapes)]
        rows = max(1, min(rows, (size - total) // (cols * (4 if dt == torch.float32 else 2))))
        sd[f"layers.{i}.weight"] = torch.randn(rows, cols, generator=g).to(dt)
        sd[f"layers.{i}.bias"] = torch.randn(cols, generator=g)
        total += sd[f"layers.{i}.weight"].nbytes + sd[f"layers.{i}.bias"].nbytes
        i += 1
    return sd


def nbytes(sd) -> int:
    return sum(t.nbytes for t in sd.values())


def check(out, sd) -> None:
    import torch
    assert out.keys() == sd.keys(), "loaded keys differ"
    for k in sd:
        assert torch.equal(out[k], sd[k]), f"loaded {k} differs"


_server_pid: list[int] = []          # the S3 server's pid, for its CPU time
_last_cpu: list[tuple[float, float]] = []


def _cpu() -> tuple[float, float]:
    """CPU seconds used so far by this process (every thread) and by the S3 server process."""
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    server = 0.0
    try:
        with open(f"/proc/{_server_pid[0]}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        server = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (IndexError, OSError):                  # no server (yet), or it is gone
        pass
    return r.ru_utime + r.ru_stime, server


def _server_rss() -> float:
    try:
        with open(f"/proc/{_server_pid[0]}/status") as f:
            kb = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
        return kb / (1 << 20)
    except (OSError, IndexError, StopIteration):
        return float("nan")


def timed(fn):
    c0 = _cpu()
    t = time.perf_counter()
    r = fn()
    wall = time.perf_counter() - t
    c1 = _cpu()
    _last_cpu[:] = [(c1[0] - c0[0], c1[1] - c0[1])]
    return wall, r


def s3c_run(sd, rep: int, note, check, failures: list) -> None:
    """s3torchconnector against a moto server of its own, stopped at the end: completing a
    1.5 GB multipart upload grows moto's process to about 12 GB (parts, the joined object and
    copies), which on this 24 GB machine must not share a server with the other methods."""
    import torch
    from s3torchconnector import S3Checkpoint, S3ClientConfig, S3ReaderConstructor

    from torchjuice.object import create_store
    srv = start_s3()
    _server_pid[:] = [srv.proc.pid]
    try:
        url = srv.url()
        create_store(url).create()
        bucket = url.split("/")[2].split("?")[0]
        s3c = S3Checkpoint(region="us-east-1", endpoint=srv.endpoint,
                           s3client_config=S3ClientConfig(force_path_style=True))
        ranged = S3ReaderConstructor.range_based()
        with s3c.writer(f"s3://{bucket}/warm.pt") as w:              # connect first
            torch.save({"w": torch.ones(1 << 20)}, w)

        def save():
            with s3c.writer(f"s3://{bucket}/step.pt") as w:
                torch.save(sd, w)

        def load():
            with s3c._client.get_object(bucket, "step.pt", reader_constructor=ranged) as r:
                return torch.load(r)
        note("s3torchconnector save", timed(save)[0])
        if rep == 0:                                   # minutes on moto: once (see the docstring)
            t, out = timed(load)
            note("s3torchconnector load", t)
            check(out, sd)
    finally:
        srv.stop()
        _server_pid[:] = _main_server_pid[:1]


_main_server_pid: list[int] = []


def main() -> None:
    from torchjuice.cli.main import parse_size
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=int(1.5 * (1 << 30)),
                    help="state dict size (default 1.5G)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per method; the median is shown")
    ap.add_argument("--no-s3connector", action="store_true", help="skip s3torchconnector")
    ap.add_argument("--no-dcp", action="store_true", help="skip torch.distributed.checkpoint")
    ap.add_argument("--no-save", action="store_true", help="print only; do not write results/")
    a = ap.parse_args()

    import signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))     # stop the S3 server, remove files
    work = tempfile.mkdtemp(prefix="tj-bench-ckpt-")
    os.environ["TORCHJUICE_HOME"] = os.path.join(work, "home")
    os.environ.pop("TORCHJUICE_META", None)
    # S3 rows measure S3: no local disk cache (on by default for remote stores) unless named
    os.environ["TORCHJUICE_CACHE_SIZE"] = "0"
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    warnings.filterwarnings("ignore", message=".*Detected an existing checkpoint.*")

    import torch
    import torch.distributed.checkpoint as dcp
    import torchjuice as tj
    import torchjuice.checkpoint as ck
    from torchjuice.object import create_store

    from .common import fmt_table, machine, write_results

    print(machine(), flush=True)
    sd = make_state(a.size)
    size = nbytes(sd)
    print(f"state dict: {len(sd)} tensors, {size / (1 << 30):.2f} GiB", flush=True)
    times: dict[str, list[float]] = {}
    failures: list[str] = []

    cpu: dict[str, list[tuple[float, float]]] = {}

    def note(key: str, seconds: float) -> None:
        times.setdefault(key, []).append(seconds)
        extra = ""
        if _last_cpu:
            cpu.setdefault(key, []).append(_last_cpu[0])
            extra = (f"  cpu: this process {_last_cpu[0][0]:6.2f}s, S3 server "
                     f"{_last_cpu[0][1]:6.2f}s (server RSS {_server_rss():.1f} GB)")
            _last_cpu.clear()
        print(f"  {key:38s} {seconds:7.2f}s  {size / seconds / MiB:7.0f} MiB/s{extra}", flush=True)

    cur: dict = {}                                  # this run's S3 server, volumes and stores

    def fresh_s3() -> None:
        """A new S3 server for every group of S3 measurements (moto keeps the memory of deleted
        objects -- about 1.5x their size -- so a run's 1.5 GB checkpoints would pile up in it past
        this machine's memory), a new S3 volume and stores on it, connected and warmed up before
        any clock starts."""
        if cur:
            cur["cached"].close()
            tj.volume_for("s3vol").close()
            cur["s3"].stop()
        s3 = cur["s3"] = start_s3()
        _server_pid[:] = _main_server_pid[:] = [s3.proc.pid]
        cur["n"] = cur.get("n", 0) + 1
        tj.format(f"sqlite3://{work}/s3-{cur['n']}.db", "s3vol", storage=s3.url("tj"))
        cur["cached"] = tj.connect("s3vol", cache_size=10 << 30)   # the default: a disk cache
        cur["raw"] = create_store(s3.url())
        cur["raw"].create()
        tiny = {"w": torch.ones(1 << 20)}
        tj.save(tiny, "juice://s3vol/warm.pt")
        check(tj.load("juice://s3vol/warm.pt"), tiny)
        tj.save(tiny, (cur["cached"], "/warm2.pt"))
        list(pool.map(cur["raw"].put, [f"warm/{i}" for i in range(THREADS)], [b"x" * BLOCK] * THREADS))

    try:
        tj.format(f"sqlite3://{work}/local.db", "local", storage=f"file://{work}/store")

        def serialised_blocks() -> list[bytes]:
            """The checkpoint's bytes cut into 4 MiB blocks (made before the raw clock starts)."""
            buf = io.BytesIO()
            torch.save(sd, buf)
            view = buf.getbuffer()
            out = [bytes(view[i:i + BLOCK]) for i in range(0, len(view), BLOCK)]
            del view
            return out

        blocks = serialised_blocks()
        ckpt_bytes = sum(len(b) for b in blocks)
        keys = [f"raw/{i}" for i in range(len(blocks))]
        sinks = threading.local()                     # one reused 4 MiB buffer per GET thread

        def raw_get(i: int) -> None:
            buf = getattr(sinks, "buf", None)
            if buf is None:
                buf = sinks.buf = bytearray(BLOCK)
            n = cur["raw"].get_into(keys[i], memoryview(buf)[:len(blocks[i])])
            assert n == len(blocks[i])

        pool = ThreadPoolExecutor(THREADS)
        tiny = {"w": torch.ones(1 << 20)}
        tj.save(tiny, "juice://local/warm.pt")
        check(tj.load("juice://local/warm.pt"), tiny)

        for rep in range(a.repeat):
            print(f"run {rep + 1}/{a.repeat}", flush=True)
            local = os.path.join(work, f"local-{rep}.pt")
            note("torch.save local file", timed(lambda: torch.save(sd, local))[0])
            t, out = timed(lambda: torch.load(local))
            note("torch.load local file", t)
            check(out, sd)
            del out
            os.remove(local)

            for vol in ("local", "s3vol"):
                if vol == "s3vol":
                    fresh_s3()
                url = f"juice://{vol}/ckpt/step-{rep}.pt"
                note(f"tj.save {vol}", timed(lambda: tj.save(sd, url))[0])
                t, out = timed(lambda: tj.load(url))
                note(f"tj.load {vol}", t)
                check(out, sd)
                del out
                note(f"tj.save {vol} replacing", timed(lambda: tj.save(sd, url))[0])
                tj.volume_for(vol).remove(f"/ckpt/step-{rep}.pt")
                gc.collect()
            fresh_s3()
            note("tj.save s3vol cached",
                 timed(lambda: tj.save(sd, (cur["cached"], f"/c/{rep}.pt")))[0])
            cur["cached"].remove(f"/c/{rep}.pt")

            fresh_s3()
            if blocks is None:
                blocks = serialised_blocks()
            note("raw PUT", timed(lambda: list(pool.map(cur["raw"].put, keys, blocks)))[0])
            note("raw GET", timed(lambda: list(pool.map(raw_get, range(len(keys)))))[0])
            assert cur["raw"].get(keys[-1]) == blocks[-1]
            list(pool.map(cur["raw"].delete, keys))
            blocks = None                              # 1.5 GB less while moto holds the peer's
            gc.collect()
            cur["s3"].stop()                           # and no idle server beside the peer's

            if not a.no_s3connector:
                try:
                    s3c_run(sd, rep, note, check, failures)
                except Exception as e:                 # a peer's failure is a result, not a crash
                    failures.append(f"run {rep + 1}: s3torchconnector: {type(e).__name__}: {e}")
                    print("  " + failures[-1], flush=True)

            for vol in ("local", "s3vol"):
                if vol == "s3vol":
                    fresh_s3()
                saver = ck.AsyncSaver()
                for phase in ("first", "steady"):
                    url = f"juice://{vol}/async/{phase}-{rep}.pt"
                    t0 = time.perf_counter()
                    fut = saver.save(sd, url)
                    t1 = time.perf_counter()
                    fut.result()
                    t2 = time.perf_counter()
                    note(f"tj.async_save {vol} {phase} returns", t1 - t0)
                    note(f"tj.async_save {vol} {phase} durable", t2 - t0)
                    tj.volume_for(vol).remove(f"/async/{phase}-{rep}.pt")
                saver.close()
                gc.collect()

            if not a.no_dcp:
                from torch.distributed.checkpoint._fsspec_filesystem import (FsspecReader,
                                                                           FsspecWriter)
                empty = {k: torch.empty_like(v) for k, v in sd.items()}
                runs = [("dcp default (fsspec, os.sync)", lambda c: dict(checkpoint_id=c),
                         lambda c: dict(checkpoint_id=c)),
                        ("dcp fsspec sync_files=False",
                         lambda c: dict(storage_writer=FsspecWriter(c, sync_files=False)),
                         lambda c: dict(storage_reader=FsspecReader(c))),
                        ("dcp JuiceStorageWriter/Reader",
                         lambda c: dict(storage_writer=ck.JuiceStorageWriter(c)),
                         lambda c: dict(storage_reader=ck.JuiceStorageReader(c)))]
                for i, (label, wkw, rkw) in enumerate(runs):
                    fresh_s3()
                    cid = f"juice://s3vol/dcp/{i}-{rep}"
                    note(f"{label} save", timed(lambda: dcp.save(sd, **wkw(cid)))[0])
                    note(f"{label} load", timed(lambda: dcp.load(empty, **rkw(cid)))[0])
                    check(empty, sd)
                    for v in empty.values():
                        v.zero_()
                    tj.volume_for("s3vol").rmtree(f"/dcp/{i}-{rep}")
                del empty
                gc.collect()
        pool.shutdown()
    finally:
        if cur:
            cur["s3"].stop()
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}

    def row(label, key, base_key=None, with_cpu=False):
        t = med.get(key)
        if t is None:
            return None
        ratio = ""
        if base_key and base_key in med:
            ratio = f"{med[base_key] / t:.2f}x"
        out = [label, f"{t:.2f}", f"{size / t / MiB:.0f}", ratio]
        if with_cpu:
            c = cpu.get(key) or [(float("nan"), float("nan"))]
            out += [f"{statistics.median(x[0] for x in c):.2f}",
                    f"{statistics.median(x[1] for x in c):.2f}"]
        return out

    def block(title, items, with_cpu=False):
        rows = [r for r in (row(*it, with_cpu=with_cpu) for it in items) if r is not None]
        head = [title, "seconds", "MiB/s", "speed vs base"]
        if with_cpu:
            head += ["CPU s, this process", "CPU s, S3 server"]
        return fmt_table(head, rows)

    gib = f"{size / (1 << 30):.2f} GiB"
    t_local = block(f"{gib}, local", [
        ("torch.save local file (base)", "torch.save local file", "torch.save local file"),
        ("tj.save, local-dir volume", "tj.save local", "torch.save local file"),
        ("tj.save replacing, local-dir volume", "tj.save local replacing", "torch.save local file"),
        ("torch.load local file (base)", "torch.load local file", "torch.load local file"),
        ("tj.load, local-dir volume", "tj.load local", "torch.load local file")])
    t_s3 = block(f"{gib}, S3 (moto, loopback)", [
        ("raw boto3 PUT, 16 threads (base)", "raw PUT", "raw PUT"),
        ("tj.save, S3 volume", "tj.save s3vol", "raw PUT"),
        ("tj.save replacing, S3 volume", "tj.save s3vol replacing", "raw PUT"),
        ("tj.save, S3 volume + local disk cache", "tj.save s3vol cached", "raw PUT"),
        ("s3torchconnector S3Checkpoint save", "s3torchconnector save", "raw PUT"),
        ("raw boto3 GET, 16 threads (base)", "raw GET", "raw GET"),
        ("tj.load, S3 volume", "tj.load s3vol", "raw GET"),
        ("s3torchconnector load (range-based reader)", "s3torchconnector load", "raw GET")],
        with_cpu=True)
    a_rows = []
    for vol, label in (("local", "local-dir volume"), ("s3vol", "S3 volume")):
        sync = med.get(f"tj.save {vol}")
        for phase in ("first", "steady"):
            ret, dur = med.get(f"tj.async_save {vol} {phase} returns"), \
                med.get(f"tj.async_save {vol} {phase} durable")
            if ret is None:
                continue
            a_rows.append([f"{label}, {phase} call", f"{ret:.3f}", f"{dur:.2f}", f"{sync:.2f}",
                           f"{100 * ret / sync:.1f}%"])
    t_async = fmt_table(["tj.async_save", "returns after s", "durable after s", "tj.save s",
                         "blocks for (of a save)"], a_rows)
    tables = [t_local, t_s3, t_async]
    if not a.no_dcp:
        tables.append(block(f"{gib}, DCP on the S3 volume", [
            (f"{lbl} {op}", f"{lbl} {op}", f"dcp default (fsspec, os.sync) {op}")
            for op in ("save", "load")
            for lbl in ("dcp default (fsspec, os.sync)", "dcp fsspec sync_files=False",
                        "dcp JuiceStorageWriter/Reader")]))
    summary = []
    if "raw PUT" in med and "tj.save s3vol" in med:
        summary.append(f"tj.save to S3 vs raw parallel PUTs: {med['raw PUT'] / med['tj.save s3vol']:.2f}x "
                       "(target >= 0.85x)")
    if "s3torchconnector save" in med and "tj.save s3vol" in med:
        summary.append(f"tj.save to S3 vs s3torchconnector: "
                       f"{med['s3torchconnector save'] / med['tj.save s3vol']:.2f}x faster (target > 1x)")
    for vol in ("s3vol", "local"):
        k = f"tj.async_save {vol} steady returns"
        if k in med:
            summary.append(f"tj.async_save ({vol}, steady) blocks for "
                           f"{100 * med[k] / med[f'tj.save {vol}']:.1f}% of a tj.save (target <= 15%)")
    table = "\n\n".join(tables) + "\n\n" + "\n".join(summary)
    if failures:
        table += "\n\nfailures:\n" + "\n".join(failures)
    print(table)
    rows_out = [{"method": k, "median_s": v, "runs_s": times[k], "MiBps": size / v / MiB,
                 "cpu_s_process_server": cpu.get(k)} for k, v in med.items()]
    if not a.no_save:
        notes = (f"State dict: {len(sd)} tensors, {size} bytes ({ckpt_bytes} serialised); median of "
                 f"{a.repeat} runs, methods interleaved. 'speed vs base' is base time / method time "
                 "(above 1 is faster than the base). Local rows: page cache, no fsync on either side. "
                 "S3 rows: moto in its own process on loopback, a fresh one for each group of "
                 "measurements. See the docstring of benchmarks/bench_checkpoint.py for what each "
                 "row does.")
        print("wrote", write_results("checkpoint", rows_out, table, notes))


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"total {time.time() - t0:.0f}s")
