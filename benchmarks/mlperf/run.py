"""The driver: data generation into every backend, the search for the largest N above the AU
floor, the checkpoint workload, the results (JSON, Markdown table, PNG chart)."""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from .. import common
from ..common import fmt_table, machine
from . import accel
from .workloads import WORKLOADS, file_content, plan, random_base

MiB = 1 << 20
GB = 1e9

# backend label -> (kind, cache state)
BACKENDS = {
    "torchjuice local-dir store (warm)": ("tj-local", "warm"),
    "torchjuice S3 (cold)": ("tj-s3", "cold"),
    "torchjuice S3 (warm)": ("tj-s3", "warm"),
    "local directory (warm)": ("local", "warm"),
    "s3torchconnector S3 (cold)": ("s3c", "cold"),
}
# not in the default set (--backends): cold reads from S3 with torchjuice's disk cache turned off
EXTRA_BACKENDS = {"torchjuice S3 (cold; no disk cache)": ("tj-s3-nocache", "cold")}


def _ctx():
    ctx = mp.get_context("forkserver")
    # the forkserver imports these once; each accelerator is a fork of that clean process
    ctx.set_forkserver_preload(["torch", "torch.utils.data", "torchjuice", "torchjuice.data",
                                "s3torchconnector", "benchmarks.mlperf.accel"])
    return ctx


def run_group(ctx, target, n: int, cfg: dict, timeout: float) -> list[dict]:
    """Start ``n`` processes of ``target(rank, n, cfg, barrier, results)``; their records by rank."""
    barrier = accel.StepBarrier(ctx, n)
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, n, cfg, barrier.for_rank(r), results),
                         daemon=False)
             for r in range(n)]
    for p in procs:
        p.start()
    out: dict[int, dict] = {}
    deadline = time.time() + timeout
    try:
        while len(out) < n:
            try:
                r, rec = results.get(timeout=max(0.1, min(5.0, deadline - time.time())))
                out[r] = rec
            except queue.Empty:
                if time.time() > deadline:
                    raise TimeoutError(f"{n} processes did not finish in {timeout:.0f}s")
                if all(not p.is_alive() for p in procs) and results.empty():
                    raise RuntimeError("processes died without a result: exit codes "
                                       f"{[p.exitcode for p in procs]}")
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(5)
    errors = [rec["error"] for rec in out.values() if "error" in rec]
    if errors:
        raise RuntimeError(errors[0])
    return [out[r] for r in range(n)]


class Bench:
    def __init__(self, a):
        self.a = a
        every = {**BACKENDS, **EXTRA_BACKENDS}
        names = list(BACKENDS) if not a.backends else [x.strip() for x in a.backends.split(",")]
        unknown = [x for x in names if x not in every]
        if unknown:
            raise SystemExit(f"unknown backend(s) {unknown}; known: {list(every)}")
        self.backends = {x: every[x] for x in names}
        self.work = tempfile.mkdtemp(prefix="tj-mlperf-", dir=a.work)
        os.environ["TORCHJUICE_HOME"] = os.path.join(self.work, "home")
        os.environ.pop("TORCHJUICE_META", None)
        os.environ.pop("TORCHJUICE_CACHE_DIR", None)
        self.rows: list[dict] = []
        self.ckpt_rows: list[dict] = []
        self._cache_n = 0

    def fresh_dir(self, tag: str) -> str:
        self._cache_n += 1
        d = os.path.join(self.work, f"{tag}-{self._cache_n}")
        os.makedirs(d)
        return d

    # -- setup -------------------------------------------------------------------------------------
    def setup(self):
        import torchjuice as tj
        self.tj = tj
        self.local_root = os.path.join(self.work, "local")
        self.meta_local = f"sqlite3://{self.work}/tjlocal.db"
        tj.format(self.meta_local, "tjlocal", storage=f"file://{self.work}/tjlocal-blocks")
        self.vol_local = tj.connect(self.meta_local)
        self.s3 = self.vol_s3 = None
        self.base = random_base()

    def fresh_s3(self, tag: str) -> None:
        """A new S3 server, bucket and S3 volume for the next workload. moto runs on this
        machine and keeps the memory of every object it was given (after deletes too): the
        workloads after the first would otherwise run beside the earlier ones' data."""
        import boto3
        from ..bench_checkpoint import start_s3
        if self.vol_s3 is not None:
            self.vol_s3.close()
        if self.s3 is not None:
            self.s3.stop()
        # moto's S3 server with bench_checkpoint's one-element fix of the CompleteMultipartUpload
        # reply (without it s3torchconnector's CRT client fails every multipart upload)
        self.s3 = start_s3()
        self.boto = boto3.client("s3", endpoint_url=self.s3.endpoint, region_name=accel.REGION)
        self.boto.create_bucket(Bucket="mlperf")
        self.s3_name = f"tjs3-{tag}"
        self.meta_s3 = f"sqlite3://{self.work}/{self.s3_name}.db"
        self.tj.format(self.meta_s3, self.s3_name, storage=self.s3.url())
        self.vol_s3 = self.tj.connect(self.meta_s3, cache_size=0)   # the writer keeps no cache

    def teardown(self):
        for v in (getattr(self, "vol_local", None), getattr(self, "vol_s3", None)):
            if v is not None:
                v.close()
        if getattr(self, "s3", None) is not None:
            self.s3.stop()
        shutil.rmtree(self.work, ignore_errors=True)

    def generate(self, lay) -> dict:
        """Write ``lay``'s files to the local directory, both volumes and the bucket."""
        t = time.perf_counter()
        dirs = sorted({os.path.dirname(f) for f in lay.files})
        for d in dirs:
            os.makedirs(os.path.join(self.local_root, d), exist_ok=True)
            self.vol_local.makedirs("/" + d, exist_ok=True)
            self.vol_s3.makedirs("/" + d, exist_ok=True)

        def put(i):
            f = lay.files[i]
            data = file_content(lay, i, self.base)
            with open(os.path.join(self.local_root, f), "wb") as fh:
                fh.write(data)
            self.boto.put_object(Bucket="mlperf", Key=f, Body=data)
            return len(data)
        with ThreadPoolExecutor(4) as pool:
            total = sum(pool.map(put, range(len(lay.files))))
        for vol in (self.vol_local, self.vol_s3):       # as `torchjuice cp` writes a dataset:
            vol.write_many(("/" + f, file_content(lay, i, self.base))     # small files packed
                           for i, f in enumerate(lay.files))
        secs = time.perf_counter() - t
        print(f"  generated {lay.workload}: {len(lay.files)} files, {lay.samples} samples of "
              f"{lay.sample_size} B, {total / MiB:.1f} MiB x 4 places in {secs:.1f}s", flush=True)
        return {"files": len(lay.files), "bytes": total, "seconds": secs}

    def warm_tj_s3(self, lay) -> str:
        """A cache directory filled by reading every file once through a fresh client."""
        d = self.fresh_dir("cache-warm")
        with self.tj.connect(self.meta_s3, cache_dir=d) as vol:
            vol.cache_fill = "wait" if self.a.cache_fill == "auto" else self.a.cache_fill

            def rd(f):
                return len(vol.read_bytes("/" + f))
            with ThreadPoolExecutor(8) as pool:
                sum(pool.map(rd, lay.files))
        return d

    def warm_local(self, lay) -> None:
        """Read the local copies once (the page cache holds them: "warm")."""
        for f in lay.files:
            with open(os.path.join(self.local_root, f), "rb") as fh:
                while fh.read(8 * MiB):
                    pass
        for f in lay.files:
            self.vol_local.read_bytes("/" + f)

    def backend_cfg(self, kind: str, state: str, warm_cache: str | None) -> dict:
        fill = self.a.cache_fill
        if kind == "tj-local":
            return {"kind": "tj", "volume": "tjlocal", "meta": self.meta_local, "cache_dir": None,
                    "cache_fill": fill}
        if kind == "tj-s3":
            cache = warm_cache if state == "warm" else self.fresh_dir("cache-cold")
            return {"kind": "tj", "volume": self.s3_name, "meta": self.meta_s3, "cache_dir": cache,
                    "cache_fill": fill}
        if kind == "tj-s3-nocache":
            return {"kind": "tj", "volume": self.s3_name, "meta": self.meta_s3, "cache_dir": None,
                    "cache_size": "0"}
        if kind == "local":
            return {"kind": "local", "root": self.local_root}
        if kind == "s3c":
            return {"kind": "s3c", "bucket": "mlperf", "endpoint": self.s3.endpoint}
        raise ValueError(kind)

    # -- training workloads ------------------------------------------------------------------------
    def training(self, ctx, wname: str) -> None:
        a = self.a
        w = WORKLOADS[wname]
        compute = w.compute_time(a.accelerator, a.time_scale)
        steps = a.steps or max(a.min_steps, min(a.max_steps, round(a.run_seconds / compute)))
        ns = [n for n in a.ns if n <= a.max_accelerators]
        lay = plan(w, a.scale, max(ns), steps * w.batch)
        print(f"{wname}: sample {lay.sample_size} B, batch {w.batch}, compute {compute:.4f} s/batch, "
              f"{steps} steps, N in {ns}", flush=True)
        gen = self.generate(lay)
        self.warm_local(lay)
        warm_cache = self.warm_tj_s3(lay)
        t_start = time.time()

        def run_n(n: int, label: str) -> bool:
            kind, state = self.backends[label]
            cfg = {"backend": self.backend_cfg(kind, state, warm_cache), "files": lay.files,
                   "per_file": lay.per_file, "batch": w.batch, "steps": steps,
                   "compute": compute, "device": a.device, "workers": a.workers,
                   "prefetch": a.prefetch}
            tries = []
            for attempt in range(1 + a.retries):
                if attempt:
                    print(f"  N={n:<3d} {label:36s} below the floor: once more", flush=True)
                if kind == "tj-s3" and state == "cold":
                    cfg["backend"] = self.backend_cfg(kind, state, warm_cache)   # empty cache
                tries.append(self.one_run(ctx, wname, w, label, kind, state, n, cfg, lay,
                                          steps, compute, gen))
                if tries[-1]["passed"]:
                    break
            row = max(tries, key=lambda r: r["au"] or 0)
            row["attempts"] = [r["au"] for r in tries]
            self.rows.append(row)
            return row["passed"]

        def in_budget(label: str, n: int) -> bool:
            if time.time() - t_start > a.search_budget:
                print(f"  {label}: search budget of {a.search_budget:.0f}s spent, stop before "
                      f"N={n}")
                return False
            return True

        search(ns, list(self.backends), run_n, in_budget, refine=a.refine, no_stop=a.no_stop)
        shutil.rmtree(warm_cache, ignore_errors=True)

    def one_run(self, ctx, wname, w, label, kind, state, n, cfg, lay, steps, compute, gen) -> dict:
        a = self.a
        t = time.perf_counter()
        try:
            recs = run_group(ctx, accel.accelerator, n, cfg, timeout=a.run_timeout)
            per = [accel.au_of(r["steps"]) for r in recs]
            au = sum(p["au"] for p in per) / n
            row = {"workload": wname, "backend": label, "kind": kind, "cache": state,
                   "n": n, "au": au, "au_min": min(p["au"] for p in per),
                   "au_per_accelerator": [p["au"] for p in per],
                   "floor": w.floor, "passed": au >= w.floor,
                   "samples_per_s": sum(p["samples"] / p["wall"] for p in per),
                   "MiB_per_s": sum(p["bytes"] / p["wall"] for p in per) / MiB,
                   "io_wait_s": sum(p["io_wait"] for p in per) / n,
                   "wall_s": sum(p["wall"] for p in per) / n,
                   "wraps": sum(r["wraps"] for r in recs), "steps": steps,
                   "sample_size": lay.sample_size, "compute_s": compute,
                   "run_seconds": time.perf_counter() - t, "generate": gen}
        except Exception as e:
            row = {"workload": wname, "backend": label, "kind": kind, "cache": state,
                   "n": n, "au": None, "floor": w.floor, "passed": False,
                   "error": str(e)[:2000], "run_seconds": time.perf_counter() - t}
        au_s = "error" if row["au"] is None else f"{row['au'] * 100:5.1f}%"
        print(f"  N={n:<3d} {label:36s} AU {au_s}  "
              f"{row.get('MiB_per_s', 0):8.1f} MiB/s  ({row['run_seconds']:.1f}s)"
              + (f"  {row['error'].splitlines()[0]}" if "error" in row else ""), flush=True)
        return row

    # -- checkpoint ----------------------------------------------------------------------------------
    def checkpoint(self, ctx) -> None:
        a = self.a
        ranks = a.ckpt_ranks
        print(f"checkpoint: Llama-8B-style state dict at scale {a.scale}, {ranks} ranks", flush=True)
        seed = self.base[: 4 << 20]
        cases = [("torchjuice local-dir store", "tj-local", {}),
                 ("torchjuice S3 (cold read)", "tj-s3", {"read_cache_dir": "fresh"}),
                 ("local directory (warm read)", "local", {}),
                 ("s3torchconnector S3 (cold read)", "s3c", {})]
        for i, (label, kind, extra) in enumerate(cases):
            be = self.backend_cfg(kind, "cold", None)
            if kind == "tj-s3":
                be["cache_dir"] = None
                be["read_cache_dir"] = self.fresh_dir("cache-ckpt")
            cfg = {"backend": be, "scale": a.scale, "seed": seed, "prefix": f"ckpt/run{i}"}
            t = time.perf_counter()
            try:
                recs = run_group(ctx, accel.ckpt_rank, ranks, cfg, timeout=a.run_timeout)
                nbytes = sum(r["bytes"] for r in recs)
                wsecs = max(r["write"][1] for r in recs) - min(r["write"][0] for r in recs)
                rsecs = max(r["read"][1] for r in recs) - min(r["read"][0] for r in recs)
                row = {"workload": "checkpoint", "backend": label, "kind": kind, "ranks": ranks,
                       "bytes": nbytes, "write_s": wsecs, "read_s": rsecs,
                       "write_GBps": nbytes / wsecs / GB, "read_GBps": nbytes / rsecs / GB,
                       "verified": all(r["ok"] for r in recs)}
            except Exception as e:
                row = {"workload": "checkpoint", "backend": label, "kind": kind, "ranks": ranks,
                       "error": str(e)[:2000]}
            row["run_seconds"] = time.perf_counter() - t
            self.ckpt_rows.append(row)
            if "error" in row:
                print(f"  {label:36s} error: {row['error'].splitlines()[0]}", flush=True)
            else:
                print(f"  {label:36s} {nbytes / MiB:8.1f} MiB  write {row['write_GBps']:.3f} GB/s  "
                      f"read {row['read_GBps']:.3f} GB/s  verified={row['verified']}", flush=True)


# -- results ------------------------------------------------------------------------------------------
def search(ns: list[int], labels: list[str], run_n, in_budget, refine: int = 0,
           no_stop: bool = False) -> dict[str, int]:
    """The largest N above the floor per backend: every backend at each N of ``ns`` in turn (so
    the machine's drift hits them alike) until it falls below (``run_n(n, label)`` is False),
    then ``refine`` bisection steps between its largest N above the floor and its smallest below
    (doubling leaves a gap of a factor 2). ``in_budget(label, n)`` False: that backend stops.
    Returns each backend's largest N above the floor (0: none)."""
    alive = dict.fromkeys(labels, True)
    passed_at = dict.fromkeys(labels, 0)
    failed_at: dict[str, int] = {}

    def run(n: int, label: str) -> bool:
        ok = run_n(n, label)
        if ok:
            passed_at[label] = max(passed_at[label], n)
        else:
            failed_at[label] = min(failed_at.get(label, n), n)
        return ok

    for n in ns:
        for label in labels:
            if not alive[label]:
                continue
            if not in_budget(label, n):
                alive[label] = False
            elif not run(n, label) and not no_stop:
                alive[label] = False
        if not any(alive.values()):
            break
    for _ in range(refine):
        todo = {}
        for label, bad in failed_at.items():
            good = passed_at[label]
            if 0 < good < bad and (good + bad) // 2 > good:
                todo[label] = (good + bad) // 2
        if not todo:
            break
        for label, n in todo.items():
            if in_budget(label, n):
                run(n, label)
    return passed_at


def summary(rows: list[dict]) -> list[dict]:
    """Per workload and backend: the largest N whose AU was at or above the floor."""
    out = []
    for wname in dict.fromkeys(r["workload"] for r in rows):
        for label in {**BACKENDS, **EXTRA_BACKENDS}:
            sel = [r for r in rows if r["workload"] == wname and r["backend"] == label]
            if not sel:
                continue
            passed = [r["n"] for r in sel if r["passed"]]
            out.append({"workload": wname, "backend": label,
                        "max_n": max(passed) if passed else 0,
                        "tried": [r["n"] for r in sel],
                        "au": {r["n"]: r["au"] for r in sel}})
    return out


def verdicts(summ: list[dict]) -> list[str]:
    lines = []
    for wname in dict.fromkeys(s["workload"] for s in summ):
        by = {s["backend"]: s["max_n"] for s in summ if s["workload"] == wname}
        tjw = by.get("torchjuice S3 (warm)")
        tjc = by.get("torchjuice S3 (cold)")
        tjl = by.get("torchjuice local-dir store (warm)")
        loc = by.get("local directory (warm)")
        s3c = by.get("s3torchconnector S3 (cold)")
        if None in (tjw, tjc, tjl, loc, s3c):
            continue
        best_tj_warm = max(tjw, tjl)
        lines.append(
            f"- {wname}: torchjuice warm (max of local-dir store {tjl}, S3 warm cache {tjw}) vs "
            f"local directory warm {loc}: {'HOLDS' if best_tj_warm >= loc else 'FAILS'} (>=); "
            f"torchjuice S3 cold {tjc} vs s3torchconnector cold {s3c}: "
            f"{'HOLDS' if tjc > s3c else ('TIE' if tjc == s3c else 'FAILS')} (>)")
    return lines


def tables(rows, ckpt_rows, summ) -> str:
    out = []
    for wname in dict.fromkeys(r["workload"] for r in rows):
        sel = [r for r in rows if r["workload"] == wname]
        ns = sorted({r["n"] for r in sel})
        body = []
        for label in {**BACKENDS, **EXTRA_BACKENDS}:
            by = {r["n"]: r for r in sel if r["backend"] == label}
            if not by:
                continue
            cells = []
            for n in ns:
                r = by.get(n)
                cells.append("-" if r is None else "err" if r["au"] is None else
                             f"{r['au'] * 100:.1f}%" + ("" if r["passed"] else "*"))
            mx = next(s["max_n"] for s in summ if s["workload"] == wname and s["backend"] == label)
            best = max((r for r in by.values() if r.get("au") is not None),
                       key=lambda r: r["n"], default=None)
            body.append([label] + cells + [mx, f"{best['MiB_per_s']:.1f}" if best else "-"])
        floor = sel[0]["floor"]
        out.append(fmt_table([f"{wname} AU (floor {floor:.0%})"] + [f"N={n}" for n in ns]
                             + ["max N >= floor", "MiB/s at last N"], body))
    if ckpt_rows:
        body = []
        for r in ckpt_rows:
            if "error" in r:
                body.append([r["backend"], "err", "err", "err", r["error"].splitlines()[0][:60]])
            else:
                body.append([r["backend"], f"{r['bytes'] / MiB:.1f}", f"{r['write_GBps']:.3f}",
                             f"{r['read_GBps']:.3f}", r["verified"]])
        out.append(fmt_table([f"checkpoint ({ckpt_rows[0]['ranks']} ranks)", "MiB", "write GB/s",
                              "read GB/s", "verified"], body))
    return "\n\n".join(out) + "\n\n(* = below the floor; the doubling stops there)"


def chart(rows, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    wnames = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(1, max(1, len(wnames)), figsize=(5 * max(1, len(wnames)), 4),
                             squeeze=False)
    for ax, wname in zip(axes[0], wnames):
        sel = [r for r in rows if r["workload"] == wname and r.get("au") is not None]
        for label in {**BACKENDS, **EXTRA_BACKENDS}:
            pts = sorted((r["n"], r["au"] * 100) for r in sel if r["backend"] == label)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        floor = next(r["floor"] for r in rows if r["workload"] == wname)
        ax.axhline(floor * 100, color="grey", linestyle="--", linewidth=1, label="AU floor")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("emulated accelerators N")
        ax.set_ylabel("AU %")
        ax.set_ylim(0, 105)
        ax.set_title(wname)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.mlperf",
                                 description="MLPerf-Storage-style benchmark (see docs/mlperf.md)")
    ap.add_argument("--workloads", default="unet3d,resnet50,cosmoflow,checkpoint")
    ap.add_argument("--backends", default="",
                    help="comma-separated backend labels (default: the five of the comparison)")
    ap.add_argument("--scale", type=float, default=0.002,
                    help="factor on every sample's size (and on the checkpoint's bytes)")
    ap.add_argument("--time-scale", type=float, default=1.0,
                    help="factor on the emulated compute time per batch")
    ap.add_argument("--accelerator", choices=["h100", "a100"], default="h100")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cpu: compute is a sleep; cuda: a calibrated matmul loop")
    ap.add_argument("--max-accelerators", type=int, default=8)
    ap.add_argument("--ns", default="1,2,4,8,16,32", help="the N tried, in order")
    ap.add_argument("--steps", type=int, default=0, help="steps per run (0: from --run-seconds)")
    ap.add_argument("--run-seconds", type=float, default=6.0,
                    help="aim of compute time per run (steps = this / compute, bounded)")
    ap.add_argument("--min-steps", type=int, default=6)
    ap.add_argument("--max-steps", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers per accelerator")
    ap.add_argument("--prefetch", type=int, default=2, help="DataLoader prefetch_factor")
    ap.add_argument("--cache-fill", choices=["auto", "wait", "adaptive", "direct", "skip"],
                    default="direct",
                    help="torchjuice datasets' cache_fill (default direct: what 'auto' picks for "
                         "a data set larger than memory, as MLPerf Storage's are; the scaled "
                         "data here fits, and 'auto' would fill the page cache)")
    ap.add_argument("--ckpt-ranks", type=int, default=4)
    ap.add_argument("--search-budget", type=float, default=240.0,
                    help="seconds per workload's search; backends still going then stop")
    ap.add_argument("--run-timeout", type=float, default=300.0)
    ap.add_argument("--retries", type=int, default=1,
                    help="a run below the floor is run again this many times; the best AU counts")
    ap.add_argument("--no-stop", action="store_true", help="try every N even after a failure")
    ap.add_argument("--refine", type=int, default=3,
                    help="bisection steps between the largest N above the floor and the "
                         "smallest below it, after the doubling (0: none)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny: scale 0.0005, 3 steps, N in {1, 2}, every backend and workload")
    ap.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    ap.add_argument("--work", default=None, help="where the data sets go (default: a temp dir)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.scale = min(a.scale, 0.0005)
        a.steps = a.steps or 3
        a.max_accelerators = min(a.max_accelerators, 2)
        a.ckpt_ranks = min(a.ckpt_ranks, 2)
        a.no_stop = True
        a.retries = 0
        a.refine = 0
        a.search_budget = min(a.search_budget, 120.0)
    a.ns = [int(x) for x in a.ns.split(",")]
    return a


def main(argv=None) -> None:
    t0 = time.time()
    a = parse_args(argv)
    if a.out:
        common.RESULTS = os.path.abspath(a.out)
    print(machine(), flush=True)
    import signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # run teardown (S3 server, files)
    ctx = _ctx()
    b = Bench(a)
    try:
        b.setup()
        for wname in a.workloads.split(","):
            b.fresh_s3(wname)
            if wname == "checkpoint":
                b.checkpoint(ctx)
            else:
                b.training(ctx, wname)
    finally:
        b.teardown()
    summ = summary(b.rows)
    table = tables(b.rows, b.ckpt_rows, summ)
    verdict = verdicts(summ)
    print(table)
    print("\n".join(verdict))
    notes = (
        f"Emulated accelerator: {a.accelerator.upper()} compute times x{a.time_scale} "
        f"({'sleep' if a.device == 'cpu' else 'calibrated CUDA matmul'}); samples at --scale "
        f"{a.scale} of their real size (batch sizes and samples per file are the real ones). "
        f"Each accelerator is a process (forkserver) with a DataLoader ({a.workers} worker(s), "
        f"prefetch {a.prefetch}) over its 1/N of the files; a barrier ends every step; batches "
        "reach it in shared memory opened by name (torch's 'file_system' sharing strategy). AU = "
        "compute time / wall time with the first step excluded, per accelerator, then averaged "
        "(DLIO). N doubles until the AU falls under the floor, then "
        f"{a.refine} bisection step(s) between the last N above the floor and the first below "
        f"it (a run below the floor is run {a.retries} more time(s); the best AU counts).\n\n"
        f"torchjuice datasets with cache_fill={a.cache_fill!r} (MLPerf Storage sizes its data "
        "sets at 5x the host's memory or more, which torchjuice's 'auto' mode answers with "
        "'direct': the local disk cache filled and read with O_DIRECT, not through the page cache; "
        "the scaled data set here would fit in memory).\n\n"
        "Cache states (the page cache cannot be dropped here): warm = every file was read once "
        "before the runs (local directory and torchjuice's local-dir store: the page cache; "
        "torchjuice S3 (warm): its local disk cache filled by one read pass); cold = torchjuice "
        "S3 with an empty disk cache directory for every run (blocks come from the S3 server), "
        "s3torchconnector with a fresh client (it has no cache). The S3 server is moto in its own "
        "process on loopback (its objects are in its memory). Checkpoint: each rank saves then "
        "loads its shard; GB/s = all ranks' bytes over the span from the first start to the last "
        "end; torchjuice via tj.save/tj.load, the local directory via torch.save (+fsync) / "
        "torch.load, s3torchconnector via S3Checkpoint; cold read = fresh client, empty cache."
        "\n\nVerdicts:\n" + "\n".join(verdict) + f"\n\nTotal time {time.time() - t0:.0f}s.")
    rows = b.rows + b.ckpt_rows + [{"summary": summ, "verdicts": verdict,
                                    "args": {k: v for k, v in vars(a).items()}}]
    os.makedirs(common.RESULTS, exist_ok=True)
    print("wrote", common.write_results("mlperf", rows, table, notes))
    png = os.path.join(common.RESULTS, "mlperf.png")
    if b.rows:
        chart(b.rows, png)
        print("wrote", png)
    print(f"total {time.time() - t0:.0f}s", flush=True)
    sys.stdout.flush()
