"""One emulated accelerator: a process with a DataLoader over its part of the data set, "computing"
for the workload's time per batch (a sleep, or a calibrated matmul loop with ``device="cuda"``),
then waiting at a barrier shared by all accelerators of the run (the all-reduce of data parallel
training). Also the checkpoint ranks.

Everything here runs in a child process (forkserver), configured by a plain dict, so that the
parent never holds a DataLoader, a volume connection or an S3 client across a fork.
"""
from __future__ import annotations

import os
import tarfile
import threading
import time
import traceback

from ..common import LocalFiles, read_all

REGION = "us-east-1"
BARRIER_TIMEOUT = 300.0


# -- readers of the baselines ------------------------------------------------------------------------
def _torch():
    import torch
    return torch


def tar_payloads(fileobj):
    """The ``.bin`` members of a tar stream, read with Python's tarfile (the baselines' parser)."""
    with tarfile.open(fileobj=fileobj, mode="r|") as tf:
        for m in tf:
            if m.isreg() and m.name.endswith(".bin"):
                yield tf.extractfile(m).read()


def _my_part(items):
    from torch.utils.data import get_worker_info
    info = get_worker_info()
    return items if info is None else items[info.id::info.num_workers]


def _iterable_base():
    from torch.utils.data import IterableDataset
    return IterableDataset


class LocalTars(_iterable_base()):
    def __init__(self, paths):
        self.paths = paths

    def __iter__(self):
        for p in _my_part(self.paths):
            with open(p, "rb") as f:
                yield from tar_payloads(f)


class S3ConnectorTars(_iterable_base()):
    """s3torchconnector's S3IterableDataset (sharded over DataLoader workers), each object streamed
    into tarfile."""

    def __init__(self, uris, endpoint):
        self.uris, self.endpoint = uris, endpoint

    def __iter__(self):
        from s3torchconnector import S3ClientConfig, S3IterableDataset
        inner = S3IterableDataset.from_objects(
            self.uris, region=REGION, endpoint=self.endpoint, enable_sharding=True,
            s3client_config=S3ClientConfig(force_path_style=True))
        for reader in inner:
            yield from tar_payloads(reader)


def to_batch(samples):
    """Collate: the batch's payloads as one uint8 tensor (what goes to the accelerator). In a
    DataLoader worker the tensor is made in shared memory, as torch's default_collate makes its
    batches there: sending it to the accelerator then copies nothing more."""
    torch = _torch()
    from torch.utils.data import get_worker_info
    parts = [s["bin"] if isinstance(s, dict) else s for s in samples]
    n = sum(len(p) for p in parts)
    if get_worker_info() is not None:
        out = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(n))
    else:
        out = torch.empty(n, dtype=torch.uint8)
    mv = memoryview(out.numpy())
    off = 0
    for p in parts:
        mv[off:off + len(p)] = p
        off += len(p)
    return len(parts), out


def make_dataset(cfg: dict, files: list):
    """The dataset of one accelerator over ``files`` (relative paths), for the backend in ``cfg``."""
    be, tar = cfg["backend"], cfg["per_file"] > 1
    kind = be["kind"]
    if kind == "tj":
        from torchjuice.data import JuiceDataset, JuiceIterableDataset
        urls = [f"juice://{be['volume']}/{f}" for f in files]
        fill = be.get("cache_fill", "auto")
        if tar:
            return JuiceIterableDataset(urls, rank=0, world_size=1, meta=be["meta"],
                                        cache_fill=fill)
        return JuiceDataset(urls, meta=be["meta"], cache_fill=fill)
    if kind == "local":
        paths = [os.path.join(be["root"], f) for f in files]
        return LocalTars(paths) if tar else LocalFiles(paths)
    if kind == "s3c":
        uris = [f"s3://{be['bucket']}/{f}" for f in files]
        if tar:
            return S3ConnectorTars(uris, be["endpoint"])
        from s3torchconnector import S3ClientConfig, S3MapDataset
        return S3MapDataset.from_objects(uris, region=REGION, endpoint=be["endpoint"],
                                         transform=read_all,
                                         s3client_config=S3ClientConfig(force_path_style=True))
    raise ValueError(kind)


# -- the step barrier ---------------------------------------------------------------------------------
class StepBarrier:
    """A barrier of ``n`` processes whose last arrival wakes all the others at once: one byte down
    each waiting process's own pipe. ``multiprocessing.Barrier`` wakes its waiters one after the
    other, each through a handshake with the waker; with a dozen processes on two busy cores the
    accelerators waited ~30 ms a step at it here (resnet50 at N=12, a reader from memory: AU
    93.8 % with it, 95.3 % with this one). ``for_rank(r)`` is what process ``r`` gets; ``wait`` and ``abort`` are
    ``threading.Barrier``'s."""

    def __init__(self, ctx, n: int):
        self.n = n
        self._state = ctx.Array("i", 2)            # [arrived this round, broken]
        self._pipes = [ctx.Pipe(duplex=False) for _ in range(n)]    # (reader, writer) per rank
        self.rank = None

    def for_rank(self, rank: int) -> "StepBarrier":
        view = object.__new__(StepBarrier)
        view.__dict__.update(self.__dict__, rank=rank)
        return view

    def _wake(self, ranks) -> None:
        for r in ranks:
            self._pipes[r][1].send_bytes(b"x")

    def wait(self, timeout: float | None = None) -> None:
        st = self._state
        with st.get_lock():
            if st[1]:
                raise threading.BrokenBarrierError
            st[0] += 1
            last = st[0] == self.n
            if last:
                st[0] = 0
        if last:
            self._wake(r for r in range(self.n) if r != self.rank)
            return
        reader = self._pipes[self.rank][0]
        if not reader.poll(timeout):
            self.abort()
            raise threading.BrokenBarrierError
        reader.recv_bytes()
        if st[1]:
            raise threading.BrokenBarrierError

    def abort(self) -> None:
        with self._state.get_lock():
            if self._state[1]:
                return
            self._state[1] = 1
        self._wake(r for r in range(self.n) if r != self.rank)


# -- compute -----------------------------------------------------------------------------------------
class Compute:
    """``run()`` takes ``seconds``: a sleep on CPU; with ``device="cuda"`` a loop of matmuls whose
    count was calibrated to last that long (synchronised)."""

    def __init__(self, seconds: float, device: str = "cpu"):
        self.seconds = seconds
        self.cuda = False
        if device == "cuda":
            torch = _torch()
            if not torch.cuda.is_available():
                raise RuntimeError("--device cuda: torch.cuda.is_available() is False")
            self.cuda = True
            self.a = torch.randn(2048, 2048, device="cuda", dtype=torch.float16)
            for _ in range(3):
                self.a @ self.a
            torch.cuda.synchronize()
            t, n = time.perf_counter(), 20
            for _ in range(n):
                self.a @ self.a
            torch.cuda.synchronize()
            per = (time.perf_counter() - t) / n
            self.reps = max(1, round(seconds / per))

    def run(self) -> None:
        if not self.cuda:
            time.sleep(self.seconds)
            return
        torch = _torch()
        for _ in range(self.reps):
            self.a @ self.a
        torch.cuda.synchronize()


def _process_setup(be: dict):
    """A rank process's environment for backend ``be`` (torchjuice's cache directory and size);
    returns torch, on one thread."""
    if be.get("cache_dir"):
        os.environ["TORCHJUICE_CACHE_DIR"] = be["cache_dir"]
    else:
        os.environ.pop("TORCHJUICE_CACHE_DIR", None)
    if be.get("cache_size") is not None:
        os.environ["TORCHJUICE_CACHE_SIZE"] = be["cache_size"]
    torch = _torch()
    torch.set_num_threads(1)
    # batches come from the DataLoader worker in shared memory opened by name. With torch's
    # default ("file_descriptor"), every next() of the accelerator connects to the worker's
    # resource-sharer thread to be handed the fd, and that thread must first win the worker's GIL
    # from whatever the worker is doing (parsing the next batch). Measured here, the same for every
    # backend: next() on a batch already waiting, the worker parsing tar: 23-35 ms with fds,
    # 6-24 ms by name; resnet50 at N=5 on the local directory: AU 80-82 % with fds, 85-89 % by name
    torch.multiprocessing.set_sharing_strategy("file_system")
    return torch


# -- the accelerator process -------------------------------------------------------------------------
def accelerator(rank: int, n: int, cfg: dict, barrier, results) -> None:
    """Run ``cfg["steps"]`` steps; put ``(rank, record)`` on ``results``."""
    try:
        be = cfg["backend"]
        _process_setup(be)
        from torch.utils.data import DataLoader
        files = cfg["files"][rank::n]
        ds = make_dataset(cfg, files)
        workers = cfg["workers"]
        loader = DataLoader(ds, batch_size=cfg["batch"], num_workers=workers, collate_fn=to_batch,
                            shuffle=False, drop_last=False,
                            prefetch_factor=cfg["prefetch"] if workers else None,
                            multiprocessing_context="fork" if workers else None)
        compute = Compute(cfg["compute"], cfg["device"])
        it = iter(loader)
        wraps = 0
        steps = []
        barrier.wait(BARRIER_TIMEOUT)               # all accelerators start together
        for _ in range(cfg["steps"]):
            t0 = time.perf_counter()
            try:
                k, batch = next(it)
            except StopIteration:                  # the part ran out: a new epoch over it
                wraps += 1
                it = iter(loader)
                k, batch = next(it)
            t1 = time.perf_counter()
            compute.run()
            t2 = time.perf_counter()
            barrier.wait(BARRIER_TIMEOUT)
            t3 = time.perf_counter()
            steps.append((t0, t1, t2, t3, k, batch.numel()))
        del it
        results.put((rank, {"steps": steps, "wraps": wraps}))
    except BaseException as e:                     # report, and let the others go
        try:
            barrier.abort()
        except Exception:
            pass
        results.put((rank, {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}))


def au_of(steps) -> dict:
    """DLIO's accelerator utilisation of one accelerator, the first step excluded: the compute
    time of steps 2..S over the wall time from the end of step 1 to the end of step S."""
    if len(steps) < 2:
        raise ValueError("need at least 2 steps")
    compute = sum(t2 - t1 for t0, t1, t2, t3, _, _ in steps[1:])
    wall = steps[-1][3] - steps[0][3]
    samples = sum(s[4] for s in steps[1:])
    nbytes = sum(s[5] for s in steps[1:])
    io_wait = sum(t1 - t0 for t0, t1, _, _, _, _ in steps[1:])
    return {"au": compute / wall, "wall": wall, "compute": compute, "io_wait": io_wait,
            "samples": samples, "bytes": nbytes}


# -- checkpoint ranks ---------------------------------------------------------------------------------
def ckpt_rank(rank: int, n: int, cfg: dict, barrier, results) -> None:
    """Build this rank's shard, save it (timed, after a barrier), barrier, load it (timed)."""
    try:
        be = cfg["backend"]
        torch = _process_setup(be)
        from .workloads import llama_shard_shapes, make_shard
        sd = make_shard(rank, llama_shard_shapes(cfg["scale"], n, rank), cfg["seed"])
        nbytes = sum(t.numel() * t.element_size() for t in sd.values())
        name = f"{cfg['prefix']}/rank-{rank:03d}.pt"
        kind = be["kind"]
        if kind == "tj":                # connections are made before the clocks start
            import torchjuice as tj
            from torchjuice.volume import volume_for
            url = f"juice://{be['volume']}/{name}"
            volume_for(be["volume"], be["meta"])
            save = lambda: tj.save(sd, url, meta=be["meta"])                     # noqa: E731
            # the read: a fresh connection (cold: with a fresh, empty cache directory)
            reader = tj.connect(be["meta"], cache_dir=be.get("read_cache_dir"))
            load = lambda: tj.load((reader, "/" + name), map_location="cpu",     # noqa: E731
                                   weights_only=True)
        elif kind == "local":
            path = os.path.join(be["root"], name)
            os.makedirs(os.path.dirname(path), exist_ok=True)

            def save():
                with open(path, "wb") as f:
                    torch.save(sd, f)
                    f.flush()
                    os.fsync(f.fileno())
            load = lambda: torch.load(path, map_location="cpu", weights_only=True)  # noqa: E731
        elif kind == "s3c":
            from s3torchconnector import S3Checkpoint, S3ClientConfig
            uri = f"s3://{be['bucket']}/{name}"
            writer_c, reader_c = (S3Checkpoint(region=REGION, endpoint=be["endpoint"],
                                               s3client_config=S3ClientConfig(force_path_style=True))
                                  for _ in range(2))       # the reader: a fresh client

            def save():
                with writer_c.writer(uri) as w:
                    torch.save(sd, w)

            def load():
                with reader_c.reader(uri) as r:
                    return torch.load(r, map_location="cpu", weights_only=True)
        else:
            raise ValueError(kind)
        barrier.wait(BARRIER_TIMEOUT)
        w0 = time.time()
        save()
        w1 = time.time()
        barrier.wait(BARRIER_TIMEOUT)
        barrier.wait(BARRIER_TIMEOUT)
        r0 = time.time()
        back = load()
        r1 = time.time()
        ok = set(back) == set(sd) and all(         # bitwise (random bf16 bits include NaNs)
            torch.equal(back[k].view(torch.int16), sd[k].view(torch.int16)) for k in sd)
        results.put((rank, {"bytes": nbytes, "write": (w0, w1), "read": (r0, r1), "ok": ok}))
    except BaseException as e:
        try:
            barrier.abort()
        except Exception:
            pass
        results.put((rank, {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}))
