"""Model loading benchmark: tj.load_safetensors beside safetensors, raw parallel reads and
runai-model-streamer, side by side in one run.

    python -m benchmarks.bench_models                    # a 1.5 GiB Llama-like model
    python -m benchmarks.bench_models --size 128M --repeat 1 --no-save      # quick
    python -m benchmarks.bench_models --size 64M --name models-64M   # runai reads moto at this size

The model: embeddings, N decoder layers (q/k/v/o and gate/up/down in bf16, f16 q/k/v biases, f32
norms), an int8 lm_head with f32 scales, an i64 buffer -- sized to --size.

Warm (everything in the page cache): a local file read by ``safetensors.torch.load_file``, by a raw
multi-threaded ``os.preadv`` into a buffer allocated before the clock starts, and by runai's
streamer; the same bytes on a volume with a ``file://`` store read by ``tj.load_safetensors`` (its
blocks memory-mapped in place, and, for comparison, copied with ``mmap=False``); and on an S3
volume whose local disk cache was warmed (``Volume.warmup``; cached blocks are mapped, then
checksummed through the mapping).

What "warm" means is controlled: right before each warm run, the files it reads are dropped from
the page cache (``POSIX_FADV_DONTNEED``) and the same method runs once, untimed, in a fresh process
-- so the timed run finds them as that loader's previous load (a server's last start) left them.
The shape matters: a file's pages may sit in 2 MiB folios, mapped with one fault each, or in small
ones, mapped 4-64 KiB a fault. safetensors' plain ``mmap`` fault-in leaves mostly small folios;
``tj.load_safetensors`` asks for huge pages on its block mappings (``MADV_HUGEPAGE``), so its
fault-in leaves 2 MiB folios. Two more rows fill the page cache by ``read()`` instead (after the
same eviction): readahead over one big file ramps up to 2 MiB folios, over a volume's 4 MiB block
files it does not. (The pages are put back right before each run either way: this VM's kernel
reclaims page cache left unused for a while, even with memory free.)

Cold (the S3 server -- moto, its own process, loopback): ``tj.load_safetensors`` from an S3 volume
with no disk cache, beside raw parallel GETs of the same blocks (``get_into`` in a
ThreadPoolExecutor) and runai's ``SafetensorsStreamer`` reading the same file as one object.

Every run is a fresh subprocess (so its peak RSS, VmHWM, is that method's), timed from just before
the load call to the end of "materialised": every tensor fully read into the process (one byte of
every 4 KiB page touched -- for safetensors' mmap tensors this is what faults the file in). The
clock includes connecting to the volume and creating S3 clients (not imports: every method's
modules are imported before it starts, the metadata engine's too, and a full garbage collection
runs right before the clock, so that a collection the imports left due does not land inside one
method's window). Each run then checks its bytes
against checksums taken when the model was written. Time to first tensor: from the start to the
first tensor materialised. Figures: the median of --repeat runs, methods interleaved.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

MiB = 1 << 20
GiB = 1 << 30
PAGE = 4096


# -- the model ---------------------------------------------------------------------------------------
def model_spec(size: int) -> list[tuple[str, str, tuple]]:
    """A Llama-like layer set of about ``size`` bytes: ``(name, dtype, shape)``."""
    h, inter, vocab = (2048, 5632, 32000) if size >= 512 * MiB else (512, 1408, 8000)
    kv = h // 4
    head = vocab * h * 2 + vocab * h + vocab * 4 + h * 4 + 4096 * 8
    layer = 2 * (2 * h * h + 2 * h * kv + 3 * h * inter) + 2 * (h + 2 * kv) + 2 * 4 * h
    layers = max(1, round((size - head) / layer))
    spec = [("model.embed_tokens.weight", "bfloat16", (vocab, h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        spec += [(p + "input_layernorm.weight", "float32", (h,)),
                 (p + "self_attn.q_proj.weight", "bfloat16", (h, h)),
                 (p + "self_attn.q_proj.bias", "float16", (h,)),
                 (p + "self_attn.k_proj.weight", "bfloat16", (kv, h)),
                 (p + "self_attn.k_proj.bias", "float16", (kv,)),
                 (p + "self_attn.v_proj.weight", "bfloat16", (kv, h)),
                 (p + "self_attn.v_proj.bias", "float16", (kv,)),
                 (p + "self_attn.o_proj.weight", "bfloat16", (h, h)),
                 (p + "post_attention_layernorm.weight", "float32", (h,)),
                 (p + "mlp.gate_proj.weight", "bfloat16", (inter, h)),
                 (p + "mlp.up_proj.weight", "bfloat16", (inter, h)),
                 (p + "mlp.down_proj.weight", "bfloat16", (h, inter))]
    spec += [("model.norm.weight", "float32", (h,)),
             ("lm_head.weight", "int8", (vocab, h)),
             ("lm_head.scales", "float32", (vocab,)),
             ("model.rotary.position_ids", "int64", (4096,))]
    return spec


def write_model(path: str, size: int, seed: int = 0) -> dict:
    """Write the model with safetensors.torch.save_file; returns per-tensor byte sums."""
    import torch
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, dtype, shape in model_spec(size):
        dt = getattr(torch, dtype)
        n = dt.itemsize
        for d in shape:
            n *= d
        tensors[name] = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).view(dt).view(shape)
    save_file(tensors, path)
    sums = {k: byte_sum(v) for k, v in tensors.items()}
    return sums


def byte_sum(t) -> int:
    import torch
    return int(t.detach().reshape(-1).view(torch.uint8).sum(dtype=torch.int64))


def file_sum(path: str) -> int:
    import torch
    with open(path, "rb") as f:
        data = bytearray(f.read())
    return int(torch.frombuffer(data, dtype=torch.uint8).sum(dtype=torch.int64))


# -- one method, in a fresh process ---------------------------------------------------------------
def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: on Linux a child's ru_maxrss
    starts from its parent's (it survives fork and exec), so it would report the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pmd_mapped_mib() -> float:
    """How much file data this process maps with 2 MiB entries (page-cache folios of that size,
    one fault each), from /proc/self/smaps_rollup."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("FilePmdMapped:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def touch(t) -> None:
    """Read one byte of every page of ``t`` (materialise an mmap-backed tensor)."""
    import torch
    u = t.reshape(-1).view(torch.uint8)
    if u.numel():
        u[::PAGE].sum()


def mapped_share(tensors: dict) -> float:
    """The share of the tensors' bytes that lie in file mappings (the mmap path), not in private
    memory: from /proc/self/maps, by each tensor's middle byte."""
    import bisect
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) > 5 and parts[5].startswith("/") and parts[4] != "0":
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                spans.append((lo, hi))
    spans.sort()
    total = mapped = 0
    for t in tensors.values():
        n = t.numel() * t.element_size()
        p = t.data_ptr() + n // 2
        i = bisect.bisect_right(spans, (p, float("inf"))) - 1
        total += n
        if n and i >= 0 and spans[i][0] <= p < spans[i][1]:
            mapped += n
    return mapped / total if total else 0.0


def parallel(n_items: int, fn, threads: int) -> None:
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(fn, i) for i in range(n_items)]:
            f.result()


def child(args: dict) -> dict:
    import torch
    from torchjuice.models import LOCAL_THREADS, THREADS
    method, threads = args["method"], args.get("threads")
    out: dict = {}
    tensors = None
    buf = None
    if method == "noop":
        import safetensors.torch  # noqa: F401
        import torchjuice  # noqa: F401
        return {"seconds": 0.0, "maxrss_mib": peak_rss_mib(), "minflt": 0, "pmd_mib": 0.0}
    if method.startswith("preadv"):
        size = os.path.getsize(args["path"])
        buf = torch.empty(size, dtype=torch.uint8)
        if method == "preadv_touched":
            buf.fill_(0)
    elif method == "raw_s3":
        from torchjuice.object import create_store
        keys = args["keys"]
        buf = torch.empty(sum(n for _, n in keys), dtype=torch.uint8)
    elif method.startswith("tj"):
        import torchjuice as tj
        # modules connect imports lazily (the engine, the store, compaction): not load time
        import torchjuice.meta.sql  # noqa: F401
        import torchjuice.object.file  # noqa: F401
        import torchjuice.ops.compact  # noqa: F401
        from torchjuice.models import iter_safetensors
    elif method.startswith("st"):
        from safetensors import safe_open
        from safetensors.torch import load_file
    elif method == "runai":
        from runai_model_streamer import SafetensorsStreamer

    # a garbage collection the imports left due must not land inside one method's window (a
    # generation-2 pass over torch's objects takes ~50 ms here): collect first, for every method
    gc.collect()
    flt0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    if method.startswith("preadv"):
        from torchjuice.models import _byte_view
        view, piece = _byte_view(buf), 4 * MiB
        fd = os.open(args["path"], os.O_RDONLY)

        def one(i):
            os.preadv(fd, [view[i * piece:(i + 1) * piece]], i * piece)
        parallel((size + piece - 1) // piece, one, threads or LOCAL_THREADS)
        os.close(fd)
    elif method == "raw_s3":
        from torchjuice.models import _byte_view
        store = create_store(args["store"])
        store.light_get = False        # raw boto3 GETs (S3Store's own light GET path is not the baseline)
        view = _byte_view(buf)
        offs = [0]
        for _, n in keys:
            offs.append(offs[-1] + n)

        def one(i):
            store.get_into(keys[i][0], view[offs[i]:offs[i + 1]])
        parallel(len(keys), one, threads or THREADS)
    elif method.startswith("st"):
        with safe_open(args["path"], "pt") as f:
            first = f.offset_keys()[0]
            touch(f.get_tensor(first))
        out["ttft"] = time.perf_counter() - t0
        tensors = load_file(args["path"])
        if method == "st_clone":
            tensors = {k: v.clone() for k, v in tensors.items()}
    elif method.startswith("tj"):
        tensors = {}
        for name, t in iter_safetensors(args["url"], threads=threads,
                                        mmap=args.get("mmap", True)):
            if not tensors:
                touch(t)
                out["ttft"] = time.perf_counter() - t0
            tensors[name] = t
    elif method == "runai":
        tensors = {}
        with SafetensorsStreamer() as streamer:
            streamer.stream_file(args["url"])
            for name, t in streamer.get_tensors():
                if not tensors:
                    touch(t)
                    out["ttft"] = time.perf_counter() - t0
                tensors[name] = t
    if tensors is not None:
        for t in tensors.values():
            touch(t)
    out["seconds"] = time.perf_counter() - t0
    out["maxrss_mib"] = peak_rss_mib()
    out["minflt"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - flt0
    out["pmd_mib"] = pmd_mapped_mib()
    if tensors is not None:
        out["sums"] = {k: byte_sum(v) for k, v in tensors.items()}
    elif buf is not None:
        out["total_sum"] = byte_sum(buf)
    if method.startswith("tj"):
        out["mapped_share"] = mapped_share(tensors)
        out["metrics"] = {k: v for k, v in tj.volume_for(args["volume"]).metrics().items()
                          if k in ("get_count", "get_bytes", "cache_hits", "cache_hit_bytes")}
    return out


def run_child(args: dict, env: dict | None = None) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_models", "--child", json.dumps(args)]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})},
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{args['method']} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")


# -- the run -----------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1.5G", help="model size (default 1.5G)")
    ap.add_argument("--threads", type=int, default=None,
                    help="parallel reads for every method (default: the loader's own choice, "
                         "16 for S3, the number of cores for local reads, for each side)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-s3", action="store_true", help="skip the S3 (cold) part")
    ap.add_argument("--no-runai", action="store_true")
    ap.add_argument("--no-save", action="store_true", help="print only; do not write results/")
    ap.add_argument("--name", default="models",
                    help="results file name, results/NAME.md and .json (default: models)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(json.loads(a.child))), flush=True)
        return

    import torchjuice as tj
    from torchjuice.cli.main import parse_size
    from torchjuice.models import LOCAL_THREADS, THREADS
    from torchjuice.testing import S3Server, ServerUnavailable
    from .common import evict, fmt_table, machine, rewarm, write_results

    import signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))     # stop the S3 server, remove files
    size = parse_size(a.size)
    work = tempfile.mkdtemp(prefix="tj-bench-models-")
    home = os.path.join(work, "home")
    env = {"TORCHJUICE_HOME": home, "TORCHJUICE_CACHE_SIZE": "0"}
    os.environ.update(env)
    s3 = None
    print(machine(), flush=True)
    results: dict[str, list[dict]] = {}
    try:
        local = os.path.join(work, "model.safetensors")
        t = time.perf_counter()
        sums = write_model(local, size)
        nbytes = os.path.getsize(local)
        total = file_sum(local)
        print(f"model: {len(sums)} tensors, {nbytes / GiB:.2f} GiB ({time.perf_counter() - t:.0f}s "
              "to make)", flush=True)

        def copy_in(vol, path):
            with open(local, "rb") as src, vol.open(path, "wb") as dst:
                shutil.copyfileobj(src, dst, 8 * MiB)

        tj.format(f"sqlite3://{work}/warm.db", "warm", storage=f"file://{work}/warmstore")
        with tj.connect("warm") as vol:
            copy_in(vol, "/model.safetensors")
        runs: dict[str, tuple[dict, dict]] = {
            "noop": ({"method": "noop"}, {}),
            "st_mmap": ({"method": "st_mmap", "path": local}, {}),
            "st_clone": ({"method": "st_clone", "path": local}, {}),
            "preadv": ({"method": "preadv", "path": local}, {}),
            "preadv_touched": ({"method": "preadv_touched", "path": local}, {}),
            "tj_warm": ({"method": "tj", "url": "juice://warm/model.safetensors", "volume": "warm"}, {}),
            "tj_warm_copy": ({"method": "tj", "url": "juice://warm/model.safetensors", "volume": "warm",
                              "mmap": False}, {}),
        }
        runs["st_mmap_read"] = runs["st_mmap"]
        runs["tj_warm_read"] = runs["tj_warm"]
        if not a.no_runai:
            runs["runai_warm"] = ({"method": "runai", "url": local}, {})
        # what each warm run reads: evicted, then put back in the page cache right before it --
        # by a run of the same method, or (the keys in read_fill) by read()
        warm_files = {k: [local] for k in ("st_mmap", "st_mmap_read", "st_clone", "preadv",
                                           "preadv_touched", "runai_warm")}
        for k in ("tj_warm", "tj_warm_read", "tj_warm_copy"):
            warm_files[k] = [f"{work}/warmstore", f"{work}/warm.db"]
        read_fill = {"st_mmap_read", "tj_warm_read"}
        if not a.no_s3:
            try:
                s3 = S3Server()
            except ServerUnavailable as e:
                print(f"skipping S3: {e}")
        if s3 is not None:
            t = time.perf_counter()
            url = s3.url()
            tj.format(f"sqlite3://{work}/cold.db", "cold", storage=url)
            with tj.connect("cold", cache_size=0) as vol:
                copy_in(vol, "/model.safetensors")
                keys = [(k, int(k.rsplit("_", 1)[1]))
                        for c in vol.info("/model.safetensors")["chunks"] for s in c["slices"]
                        for k in s["objects"]]
            cache_dir = os.path.join(work, "cache")
            with tj.connect("cold", cache_dir=cache_dir, cache_size=4 * nbytes) as vol:
                vol.warmup("/model.safetensors")
            warm_files["tj_s3_disk_cache"] = [cache_dir, f"{work}/cold.db"]
            runs["tj_s3_disk_cache"] = ({"method": "tj", "url": "juice://cold/model.safetensors",
                                         "volume": "cold"},
                                        {"TORCHJUICE_CACHE_DIR": cache_dir,
                                         "TORCHJUICE_CACHE_SIZE": str(4 * nbytes)})
            runs["raw_s3"] = ({"method": "raw_s3", "store": url, "keys": keys}, {})
            runs["tj_s3"] = ({"method": "tj", "url": "juice://cold/model.safetensors",
                              "volume": "cold"}, {})
            if not a.no_runai:
                from torchjuice.object import create_store
                bucket = s3.url()
                store = create_store(bucket)
                store.create()
                with open(local, "rb") as f:
                    store.put("model.safetensors", f.read())
                store.close()
                b = bucket.split("://", 1)[1].split("?", 1)[0]
                runs["runai_s3"] = ({"method": "runai", "url": f"s3://{b}/model.safetensors"},
                                    {"AWS_ENDPOINT_URL": s3.endpoint,
                                     "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
                                     "AWS_EC2_METADATA_DISABLED": "true"})
            print(f"S3 set up in {time.perf_counter() - t:.0f}s", flush=True)

        errors: dict[str, str] = {}
        for r in range(a.repeat):
            for key, (args, extra) in runs.items():
                if key in errors:
                    continue
                args = {**args, "threads": a.threads}
                try:
                    if key in warm_files:
                        evict(warm_files[key])
                        if key in read_fill:
                            rewarm(warm_files[key])
                        else:
                            run_child(args, {**env, **extra})
                    res = run_child(args, {**env, **extra})
                except RuntimeError as e:
                    errors[key] = str(e).strip().splitlines()[-1][:300]
                    print(f"{key}: FAILED: {errors[key]}", flush=True)
                    continue
                if "sums" in res and res.pop("sums") != sums:
                    raise SystemExit(f"{key}: the bytes loaded differ from the model's")
                if "total_sum" in res and res.pop("total_sum") != total:
                    raise SystemExit(f"{key}: the bytes read differ from the file's")
                results.setdefault(key, []).append(res)
                mapped = f", {res['mapped_share']:.0%} mapped" if "mapped_share" in res else ""
                print(f"[{r + 1}/{a.repeat}] {key}: {res['seconds']:.3f}s "
                      f"rss {res['maxrss_mib']:.0f} MiB{mapped}, {res['minflt']} faults, "
                      f"{res['pmd_mib']:.0f} MiB in 2 MiB mappings", flush=True)
    finally:
        if s3 is not None:
            s3.stop()
        shutil.rmtree(work, ignore_errors=True)

    def med(key, field="seconds"):
        vals = [r[field] for r in results.get(key, []) if field in r]
        return statistics.median(vals) if vals else None

    labels = {
        "st_mmap": "safetensors.torch.load_file, local file (mmap, pages touched)",
        "st_mmap_read": "safetensors.torch.load_file, file put in the page cache by read()",
        "st_clone": "safetensors.torch.load_file + clone (private copy)",
        "preadv": f"raw os.preadv, {a.threads or LOCAL_THREADS} threads, buffer allocated before the clock",
        "preadv_touched": "raw os.preadv into a pre-faulted buffer (memcpy ceiling)",
        "runai_warm": "runai-model-streamer, local file",
        "tj_warm": "tj.load_safetensors, file:// volume (blocks mapped)",
        "tj_warm_read": "tj.load_safetensors, file:// volume, blocks put in the page cache by read()",
        "tj_warm_copy": "tj.load_safetensors(mmap=False), file:// volume (copied)",
        "tj_s3_disk_cache": "tj.load_safetensors, S3 volume, warm disk cache (mapped, verified)",
        "raw_s3": f"raw parallel GETs of the same blocks, {a.threads or THREADS} threads",
        "tj_s3": "tj.load_safetensors, S3 volume, no disk cache",
        "runai_s3": "runai-model-streamer, s3:// (one object)",
    }
    ratios = {"tj_warm": [("st_mmap", 1.0), ("st_mmap_read", None), ("st_clone", None),
                          ("preadv", 0.95), ("runai_warm", None)],
              "tj_warm_read": [("st_mmap_read", None), ("st_mmap", None)],
              "tj_warm_copy": [("st_clone", None), ("preadv", None)],
              "tj_s3_disk_cache": [("st_mmap", None), ("preadv", None)],
              "tj_s3": [("raw_s3", 0.9), ("runai_s3", 1.0)]}
    rss0 = med("noop", "maxrss_mib") or 0
    rows, out_rows = [], []
    for scen, keys in (("warm", ["st_mmap", "st_mmap_read", "st_clone", "preadv",
                                 "preadv_touched", "runai_warm", "tj_warm", "tj_warm_read",
                                 "tj_warm_copy", "tj_s3_disk_cache"]),
                       ("cold", ["raw_s3", "runai_s3", "tj_s3"])):
        for key in keys:
            if key in errors:
                rows.append([scen, labels[key], "failed", "", "", "", "", "", errors[key][:60]])
                out_rows.append({"scenario": scen, "method": key, "label": labels[key],
                                 "error": errors[key]})
                continue
            s = med(key)
            if s is None:
                continue
            ttft = med(key, "ttft")
            rss = med(key, "maxrss_mib")
            vs = []
            for base, target in ratios.get(key, []):
                b = med(base)
                if b:
                    vs.append(f"{b / s:.2f}x {base}" + (f" (target {target:.2f}x)" if target else ""))
            rows.append([scen, labels[key], f"{s:.3f}", f"{nbytes / s / GiB:.2f}",
                         "-" if ttft is None else f"{ttft * 1000:.0f}",
                         f"{rss:.0f} (+{rss - rss0:.0f})", f"{med(key, 'minflt'):.0f}",
                         f"{med(key, 'pmd_mib') * MiB / nbytes:.0%}", "; ".join(vs)])
            out_rows.append({"scenario": scen, "method": key, "label": labels[key], "seconds": s,
                             "GiBps": nbytes / s / GiB, "ttft_s": ttft, "maxrss_mib": rss,
                             "runs": results[key]})
    table = fmt_table(["", "method", "seconds", "GiB/s", "first tensor ms", "peak RSS MiB",
                       "faults", "2M-mapped", "tj vs baseline"], rows)
    print(table)
    if not a.no_save:
        notes = (f"Model: {len(sums)} tensors, {nbytes / GiB:.2f} GiB (bf16/f16/f32/i8/i64). "
                 f"Median of {a.repeat} runs, each in a fresh process; methods interleaved. "
                 f"Peak RSS is the VmHWM of that process (ru_maxrss would carry the parent's peak over fork+exec); (+N) is above the {rss0:.0f} MiB of a "
                 "process that only imports torch, safetensors and torchjuice. "
                 "'x baseline' is baseline seconds / tj seconds (higher is better for tj). "
                 "faults: the minor page faults of the timed window; 2M-mapped: the share of the "
                 "model's bytes the process maps with 2 MiB entries at the end.\n\n"
                 + __doc__.split("\n\n", 3)[3])
        if "runai_s3" in errors:
            notes += ("\n\nrunai-model-streamer on S3 failed here: it reads the file as one object "
                      "with ranged GETs, moto serves each ranged GET of a 1.5 GiB object slowly, and "
                      "runai's AWS CRT client aborts such connections ('Http connection channel "
                      "shut down due to failure to meet throughput minimum'; RUNAI_STREAMER_S3_TIMEOUT "
                      "does not change it). It works against moto for small models (a 64 MiB run: "
                      "1.8 s, 4.4x slower than tj.load_safetensors). Its local-file row stands.")
        print("wrote", write_results(a.name, out_rows, table, notes))


if __name__ == "__main__":
    t0 = time.time()
    main()
    if "--child" not in sys.argv:
        print(f"total {time.time() - t0:.0f}s")
