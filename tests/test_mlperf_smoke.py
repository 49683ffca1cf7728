"""The MLPerf-style benchmark's smoke run (`python -m benchmarks.mlperf --smoke`): every backend and
workload at a tiny scale, N in {1, 2}; results go to --out, not to benchmarks/results."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = {"torchjuice local-dir store (warm)", "torchjuice S3 (cold)", "torchjuice S3 (warm)",
            "local directory (warm)", "s3torchconnector S3 (cold)"}
WORKLOADS = {"unet3d", "resnet50", "cosmoflow"}


def test_mlperf_smoke(tmp_path):
    out = tmp_path / "out"
    results = os.path.join(ROOT, "benchmarks", "results")

    def committed():
        names = ("mlperf.json", "mlperf.md", "mlperf.png")     # what a run writes
        return {n: os.stat(os.path.join(results, n)).st_mtime_ns for n in names
                if os.path.exists(os.path.join(results, n))}
    before = committed()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.mlperf", "--smoke", "--out", str(out),
                           "--work", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "mlperf.json").read_text())
    rows = [r for r in data["rows"] if "workload" in r]
    training = [r for r in rows if r["workload"] in WORKLOADS]
    seen = {(r["workload"], r["backend"]) for r in training}
    assert seen == {(w, b) for w in WORKLOADS for b in BACKENDS}
    for r in training:
        assert r.get("error") is None, r
        assert 0 < r["au"] <= 1, r
        assert {r2["n"] for r2 in training
                if (r2["workload"], r2["backend"]) == (r["workload"], r["backend"])} == {1, 2}
        assert r["samples_per_s"] > 0 and r["MiB_per_s"] > 0
    ckpt = [r for r in rows if r["workload"] == "checkpoint"]
    assert len(ckpt) == 4
    for r in ckpt:
        assert r.get("error") is None, r
        assert r["write_GBps"] > 0 and r["read_GBps"] > 0 and r["verified"], r
    summary = next(r for r in data["rows"] if "summary" in r)["summary"]
    assert {(s["workload"], s["backend"]) for s in summary} == seen
    assert all(0 <= s["max_n"] <= 2 for s in summary)
    png = out / "mlperf.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "mlperf.md").exists()
    # nothing written to the committed results
    assert committed() == before


def test_search_doubles_then_bisects():
    """Doubling until a backend falls below the floor, then bisection between its last N above and
    its first below; a backend out of budget stops."""
    sys.path.insert(0, ROOT)
    from benchmarks.mlperf.run import search
    capacity = {"a": 11, "b": 16, "c": 0, "d": 100}        # the largest N each one keeps busy
    calls = []

    def run_n(n, label):
        calls.append((label, n))
        return n <= capacity[label]

    def in_budget(label, n):
        return not (label == "d" and n > 4)

    got = search([1, 2, 4, 8, 16, 32], list(capacity), run_n, in_budget, refine=2)
    # a: 8 passes, 16 fails; 12 fails, 10 passes.  b: 16 passes, 32 fails; 24, then 20, fail.
    # c: N=1 fails, nothing to bisect.  d: stopped by its budget after N=4.
    assert got == {"a": 10, "b": 16, "c": 0, "d": 4}
    assert [n for lab, n in calls if lab == "a"] == [1, 2, 4, 8, 16, 12, 10]
    assert [n for lab, n in calls if lab == "b"] == [1, 2, 4, 8, 16, 32, 24, 20]
    assert [n for lab, n in calls if lab == "c"] == [1]
    assert [n for lab, n in calls if lab == "d"] == [1, 2, 4]
    # doubling runs every backend at one N before the next N
    assert calls[:4] == [("a", 1), ("b", 1), ("c", 1), ("d", 1)]
    assert search([1, 2, 4], ["a"], run_n, in_budget, refine=0) == {"a": 4}


def test_plan_gives_every_rank_enough_whole_files():
    """Every rank of a run with up to the planned number of accelerators finds the samples of all
    its steps in its own files (files[r::n]): none runs out and starts its DataLoader again."""
    sys.path.insert(0, ROOT)
    from benchmarks.mlperf.workloads import WORKLOADS, plan
    for name, steps in (("resnet50", 40), ("unet3d", 9), ("cosmoflow", 1000)):
        w = WORKLOADS[name]
        lay = plan(w, 0.01, 16, steps * w.batch)
        assert lay.samples == len(lay.files) * w.per_file
        for n in range(1, 17):
            least = min(len(lay.files[r::n]) for r in range(n)) * w.per_file
            assert least >= steps * w.batch, (name, n, least)


def _barrier_rounds(rank, barrier, arrived, out, rounds):
    import time
    for r in range(rounds):
        with arrived.get_lock():
            arrived[r] += 1
        time.sleep(0.002 * ((rank * 7 + r) % 5))       # arrivals in a changing order
        barrier.wait(30)
        out.put((rank, r, arrived[r]))              # everyone had arrived at round r


def _barrier_abort(rank, barrier, out):
    import threading
    if rank == 0:
        barrier.abort()
        out.put((rank, "aborted"))
        return
    try:
        barrier.wait(30)
        out.put((rank, "passed"))
    except threading.BrokenBarrierError:
        out.put((rank, "broken"))


def test_step_barrier_releases_a_round_only_when_all_arrived_and_abort_breaks_it():
    import multiprocessing as mp
    sys.path.insert(0, ROOT)
    from benchmarks.mlperf.accel import StepBarrier
    ctx = mp.get_context("fork")
    n, rounds = 5, 20
    barrier = StepBarrier(ctx, n)
    arrived, out = ctx.Array("i", rounds), ctx.Queue()
    procs = [ctx.Process(target=_barrier_rounds, args=(r, barrier.for_rank(r), arrived, out, rounds))
             for r in range(n)]
    for p in procs:
        p.start()
    got = [out.get(timeout=60) for _ in range(n * rounds)]
    for p in procs:
        p.join(10)
    assert sorted((rank, r) for rank, r, _ in got) == [(k, r) for k in range(n) for r in range(rounds)]
    assert all(seen == n for _, _, seen in got)
    barrier = StepBarrier(ctx, 3)
    procs = [ctx.Process(target=_barrier_abort, args=(r, barrier.for_rank(r), out)) for r in range(3)]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=60) for _ in range(3))
    for p in procs:
        p.join(10)
    assert got == {0: "aborted", 1: "broken", 2: "broken"}
