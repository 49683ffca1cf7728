"""MLPerf Storage workload parameters (v1.0 / v2.0 training workloads) and data generation.

Real parameters (DLIO configs of MLPerf Storage):

============  =================  ===================  =====  ==========  ==========  ========
workload      sample             layout               batch  H100 s/b    A100 s/b    AU floor
============  =================  ===================  =====  ==========  ==========  ========
unet3d        146,600,628 B      one sample per file  7      0.323       0.636       90 %
resnet50      114,660 B          1,251 per file (tar) 400    0.224       0.435       90 %
cosmoflow     2,828,486 B        one sample per file  1      0.0035      0.0055      70 %
============  =================  ===================  =====  ==========  ==========  ========

Scaling (``--scale S``, ``--time-scale T``): every sample is ``S`` times its real size (at least
64 bytes); samples per file (1,251 for resnet50) and batch sizes are the real ones; the emulated
compute time per batch is ``T`` times the real one. The bandwidth one emulated accelerator asks
for is therefore ``S / T`` times what a real one asks for, and a count ``N`` here stands for about
``N * S / T`` real accelerators as far as bytes go (not as far as files/samples per second go:
those are ``N / T`` times a real one's). The number of samples written is what the largest run
needs (``max N x steps x batch``, in whole files for each accelerator), so no sample is read
twice in one run.
"""
from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass, asdict


@dataclass
class Workload:
    name: str
    sample_bytes: int          # real size
    per_file: int              # samples per file (1: one file per sample)
    batch: int
    compute: dict              # accelerator -> seconds per batch (real)
    floor: float               # AU floor

    def sample_size(self, scale: float) -> int:
        return max(64, int(self.sample_bytes * scale))

    def compute_time(self, accel: str, time_scale: float) -> float:
        return self.compute[accel] * time_scale

    def as_dict(self) -> dict:
        return asdict(self)


WORKLOADS = {
    "unet3d": Workload("unet3d", 146_600_628, 1, 7, {"h100": 0.323, "a100": 0.636}, 0.90),
    "resnet50": Workload("resnet50", 114_660, 1251, 400, {"h100": 0.224, "a100": 0.435}, 0.90),
    "cosmoflow": Workload("cosmoflow", 2_828_486, 1, 1, {"h100": 0.0035, "a100": 0.0055}, 0.70),
}

# Llama 3 8B (hidden 4096, 32 layers, FFN 14336, 8 KV heads of 128, vocab 128256), bf16: ~16 GB.
LLAMA_8B = {"hidden": 4096, "layers": 32, "ffn": 14336, "kv": 1024, "vocab": 128256}


def llama_shard_shapes(scale: float, ranks: int, rank: int) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of rank ``rank``'s shard of a Llama-style state dict (tensor parallel over
    ``ranks``: every matrix split along its first dimension). Width dims are scaled by
    ``sqrt(scale)`` (so the bytes scale by about ``scale``), the layer count is kept."""
    f = scale ** 0.5

    def d(x):
        return max(64, int(x * f) // 64 * 64)
    h, ffn, kv, vocab = d(LLAMA_8B["hidden"]), d(LLAMA_8B["ffn"]), d(LLAMA_8B["kv"]), d(LLAMA_8B["vocab"])

    def part(n):
        return max(1, n // ranks)
    shapes = {"tok_embeddings.weight": (part(vocab), h), "output.weight": (part(vocab), h),
              "norm.weight": (h,)}
    for i in range(LLAMA_8B["layers"]):
        p = f"layers.{i}."
        shapes.update({p + "attention.wq.weight": (part(h), h), p + "attention.wk.weight": (part(kv), h),
                       p + "attention.wv.weight": (part(kv), h), p + "attention.wo.weight": (part(h), h),
                       p + "feed_forward.w1.weight": (part(ffn), h),
                       p + "feed_forward.w2.weight": (part(h), ffn),
                       p + "feed_forward.w3.weight": (part(ffn), h),
                       p + "attention_norm.weight": (h,), p + "ffn_norm.weight": (h,)})
    return shapes


def make_shard(rank: int, shapes: dict, seed: bytes):
    """A state dict of bf16 tensors with non-repeating content (not compressible)."""
    import torch
    sd = {}
    for i, (k, shp) in enumerate(shapes.items()):
        n = 1
        for s in shp:
            n *= s
        raw = bytearray(_pattern(seed, rank * 100_003 + i, 2 * n))
        sd[k] = torch.frombuffer(raw, dtype=torch.bfloat16).reshape(shp)
    return sd


def _pattern(base: bytes, k: int, n: int) -> bytes:
    """``n`` bytes taken from the random ``base`` at an offset depending on ``k`` (wrapping)."""
    off = (k * 104729) % len(base)
    out = bytearray()
    while len(out) < n:
        take = min(n - len(out), len(base) - off)
        out += base[off:off + take]
        off = 0
    return bytes(out)


@dataclass
class Layout:
    """The files of one workload's data set (relative paths) and how samples sit in them."""
    workload: str
    files: list
    samples: int
    sample_size: int
    per_file: int


def plan(w: Workload, scale: float, ranks: int, samples_per_rank: int) -> Layout:
    """The files for up to ``ranks`` accelerators that each read ``samples_per_rank`` samples
    from their own files (rank ``r`` of ``n`` takes every ``n``-th file from ``r``): whole files
    of ``per_file`` samples, so that no rank of a run with ``n <= ranks`` runs out and reads a
    file twice (it would start its DataLoader again mid-run)."""
    size = w.sample_size(scale)
    nfiles = ranks * -(-samples_per_rank // w.per_file)
    if w.per_file == 1:
        files = [f"{w.name}/d{i // 1000:03d}/s{i:07d}.bin" for i in range(nfiles)]
    else:
        files = [f"{w.name}/shard-{i:06d}.tar" for i in range(nfiles)]
    return Layout(w.name, files, nfiles * w.per_file, size, w.per_file)


def file_content(lay: Layout, i: int, base: bytes) -> bytes:
    if lay.per_file == 1:
        return _pattern(base, i, lay.sample_size)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for j in range(lay.per_file):
            key = f"s{i:06d}-{j:05d}"
            for ext, data in (("bin", _pattern(base, i * lay.per_file + j, lay.sample_size)),
                              ("cls", str(j % 1000).encode())):
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def random_base(n: int = 8 << 20) -> bytes:
    return os.urandom(n)
