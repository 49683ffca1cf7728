"""Train a small model on a dataset stored in a volume (embedded default: SQLite + a local dir).

    python examples/train.py                 # writes the dataset once, trains 3 epochs
    python examples/train.py --resume        # continue from the last checkpoint, mid-epoch if need be

1. Generates a synthetic classification set (16 features, 4 classes, a hidden linear teacher) as
   WebDataset tar shards ``juice://NAME/shards/train-{000000..000007}.tar`` (``KEY.x`` = 16
   float32, ``KEY.cls`` = the label in ASCII) and a validation set of one file per sample
   (``juice://NAME/val/KEY.bin``).
2. Trains an MLP with ``JuiceIterableDataset`` (shuffled shards + sample buffer, 2 DataLoader
   workers through ``JuiceDataLoader``) and a tqdm progress bar; every 50 steps it saves the model,
   the optimizer and the data-loader position with ``tj.save`` — ``--resume`` picks up exactly
   where that checkpoint was, mid-epoch.
3. Evaluates on the validation files with the map-style ``JuiceDataset``.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import tarfile
import time

import torch
from torch import nn
from tqdm import tqdm

import torchjuice as tj
from torchjuice.data import JuiceDataLoader

NAME = os.environ.get("TRAIN_VOLUME", "train-example")
FEATURES, CLASSES, SHARDS, PER_SHARD, VAL = 16, 4, 8, 1000, 1000
CKPT = f"juice://{NAME}/ckpt/last.pt"


def make_data(vol) -> None:
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(FEATURES, CLASSES, generator=g)

    def sample(n):
        x = torch.randn(n, FEATURES, generator=g)
        return x, (x @ teacher).argmax(1)
    vol.makedirs("/shards", exist_ok=True)
    for s in range(SHARDS):
        x, y = sample(PER_SHARD)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for i in range(PER_SHARD):
                for ext, data in (("x", x[i].numpy().tobytes()), ("cls", str(int(y[i])).encode())):
                    ti = tarfile.TarInfo(f"s{s:02d}-{i:05d}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
        vol.write_bytes(f"/shards/train-{s:06d}.tar", buf.getvalue())
    vol.makedirs("/val", exist_ok=True)
    x, y = sample(VAL)
    # one small file per sample (feature bytes + the label byte), packed into shared objects
    vol.write_many((f"/val/{i:05d}.bin", x[i].numpy().tobytes() + bytes([int(y[i])]))
                   for i in range(VAL))


def decode_train(sample: dict):                 # runs in the DataLoader workers
    x = torch.frombuffer(bytearray(sample["x"]), dtype=torch.float32)
    return x, int(sample["cls"])


def decode_val(raw: bytes):
    return torch.frombuffer(bytearray(raw[:-1]), dtype=torch.float32), raw[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    t0 = time.time()
    try:
        tj.format(None, NAME)
        print(f"formatted embedded volume {NAME!r} under {tj.volume.home()}")
    except tj.AlreadyFormattedError:
        pass
    vol = tj.volume_for(NAME)
    if not vol.exists(f"/shards/train-{SHARDS - 1:06d}.tar") or not vol.exists(f"/val/{VAL - 1:05d}.bin"):
        make_data(vol)
        print(f"wrote {SHARDS} shards x {PER_SHARD} samples and {VAL} validation files")

    ds = tj.JuiceIterableDataset(f"juice://{NAME}/shards/train-{{000000..{SHARDS - 1:06d}}}.tar",
                                 shuffle=True, seed=0, buffer_size=500, transform=decode_train)
    loader = JuiceDataLoader(ds, batch_size=64, num_workers=a.workers)
    model = nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, CLASSES))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    start_epoch, step, done = 0, 0, 0
    if a.resume and vol.exists("/ckpt/last.pt"):
        ck = tj.load(CKPT, weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        ds.load_state_dict(ck["data"])          # the epoch, and how far each worker had got
        start_epoch, step, done = ck["data"]["epoch"], ck["step"], ck["data"]["batches"]
        print(f"resumed at epoch {start_epoch}, step {step}, "
              f"{sum(ck['data']['positions'])} samples of that epoch already seen")
    vol.makedirs("/ckpt", exist_ok=True)

    workers = max(1, a.workers)                 # each worker ends with its own partial batch
    per_epoch = sum(math.ceil(len(range(w, SHARDS, workers)) * PER_SHARD / 64) for w in range(workers))
    for epoch in range(start_epoch, a.epochs):
        ds.set_epoch(epoch)                     # same call as DistributedSampler.set_epoch
        bar = tqdm(loader, desc=f"epoch {epoch}", unit="batch", total=per_epoch,
                   initial=done if epoch == start_epoch else 0, mininterval=0.5)
        correct = seen = 0
        for x, y in bar:
            loss = nn.functional.cross_entropy(out := model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            correct += int((out.argmax(1) == y).sum())
            seen += len(y)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{correct / seen:.3f}")
            if step % 50 == 0:                  # model, optimizer and data position together
                tj.save({"model": model.state_dict(), "opt": opt.state_dict(),
                         "data": ds.state_dict(), "step": step}, CKPT)

    val = tj.JuiceDataset(f"juice://{NAME}/val/", transform=decode_val)
    correct = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(val, batch_size=256, num_workers=a.workers):
            correct += int((model(x).argmax(1) == y).sum())
    print(f"validation accuracy {correct / len(val):.3f} on {len(val)} files; "
          f"{time.time() - t0:.1f}s in all")


if __name__ == "__main__":
    main()
