"""Checkpoints: tj.save/tj.load, atomic commit, faults, SIGKILL mid-save, async_save, leftovers,
retention, and torch.distributed.checkpoint (one process and two ranks)."""
from __future__ import annotations

import errno
import io
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict

import pytest

torch = pytest.importorskip("torch")

import torchjuice as tj  # noqa: E402
import torchjuice.checkpoint as ck  # noqa: E402
from conftest import make_meta_url  # noqa: E402

MiB = 1 << 20


# -- fixtures ----------------------------------------------------------------------------------------
def _format(request, tmp_path, engine="sqlite", name="ck"):
    meta = make_meta_url(engine, request, tmp_path)
    tj.format(meta, name, storage=f"file://{tmp_path}/bucket-{name}", block_size=1 * MiB)
    return meta


@pytest.fixture
def vol(request, tmp_path):
    """A registered volume "ck" (SQLite + local dir, 1 MiB blocks): juice://ck/... resolves."""
    meta = _format(request, tmp_path)
    v = tj.connect(meta)
    request.addfinalizer(v.close)
    return v


def _faulty(request, tmp_path, store_cls=None, **kw):
    from torchjuice.meta import new_meta
    from torchjuice.object import create_store
    from torchjuice.object.fault import FaultyStore
    meta_url = f"sqlite3://{tmp_path}/f.db"
    tj.format(meta_url, "faulty", storage=f"file://{tmp_path}/fb", block_size=1 * MiB)
    meta = new_meta(meta_url)
    fmt = meta.load()
    store = (store_cls or FaultyStore)(create_store(fmt.storage), **kw)
    v = tj.Volume(meta, fmt, store)
    request.addfinalizer(v.close)
    return v, store


def state(seed: int, n: int = 64 * 1024) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"step": seed, "w": torch.randn(n, generator=g), "b": torch.arange(n // 4) + seed,
            "opt": {"lr": 0.1 * seed, "m": [torch.full((7,), float(seed))]}}


def names(v, path: str = "/") -> list[str]:
    """A directory's entries, without the volume's trash (``/.trash``, where the engine keeps it)."""
    return [n for n in v.listdir(path) if n != ".trash"]


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


# -- save / load ---------------------------------------------------------------------------------------
def test_round_trip_keeps_types_sharing_and_metadata(vol):
    base = torch.arange(100, dtype=torch.float64)
    sd = OrderedDict(a=base, view=base[10:20], half=torch.ones(3, 4, dtype=torch.bfloat16),
                     p=torch.nn.Parameter(torch.randn(5)), i=torch.tensor([1, 2], dtype=torch.int8),
                     nested={"t": (torch.zeros(2), 3, "x")}, empty=torch.empty(0))
    sd._metadata = {"": {"version": 2}}
    tj.save(sd, "juice://ck/ckpt/model.pt")
    out = tj.load("juice://ck/ckpt/model.pt", weights_only=False)
    assert type(out) is OrderedDict and out._metadata == {"": {"version": 2}}
    assert same(dict(out), dict(sd))
    assert isinstance(out["p"], torch.nn.Parameter)
    # a view still shares its storage with the tensor it views, as with torch.save
    assert out["view"].untyped_storage().data_ptr() == out["a"].untyped_storage().data_ptr()
    out["a"][10] = -1
    assert out["view"][0] == -1
    assert vol.listdir("/ckpt") == ["model.pt"]         # no temporary file left behind


def test_file_is_byte_for_byte_what_torch_save_writes(vol):
    sd = state(3, MiB)
    tj.save(sd, "juice://ck/a.pt")
    buf = io.BytesIO()
    torch.save(sd, buf)
    assert vol.read_bytes("/a.pt") == buf.getvalue()
    assert same(tj.load("juice://ck/a.pt"), sd)


def test_targets_volume_pair_volume_kwarg_and_local(vol, tmp_path):
    tj.save({"x": torch.ones(2)}, (vol, "/p/pair.pt"))
    assert same(tj.load((vol, "p/pair.pt")), {"x": torch.ones(2)})
    tj.save({"x": torch.zeros(2)}, "/p/kw.pt", volume=vol)
    assert same(tj.load("juice://ck/p/kw.pt", volume=vol), {"x": torch.zeros(2)})
    with pytest.raises(tj.VolumeMismatchError):
        tj.save({}, "juice://other/x.pt", volume=vol)
    local = tmp_path / "local.pt"                        # not juice: torch.save/torch.load unchanged
    tj.save({"x": torch.ones(1)}, local)
    assert same(torch.load(local), {"x": torch.ones(1)})
    assert same(tj.load(str(local)), {"x": torch.ones(1)})
    buf = io.BytesIO()
    tj.save({"y": 1}, buf)
    buf.seek(0)
    assert tj.load(buf) == {"y": 1}


def test_map_location_and_weights_only(vol):
    tj.save({"w": torch.arange(4.0)}, "juice://ck/m.pt")
    out = tj.load("juice://ck/m.pt", map_location=lambda s, loc: s, weights_only=True)
    assert same(out, {"w": torch.arange(4.0)})
    tj.save({"obj": ck.Leftover(*range(8))}, "juice://ck/obj.pt")    # a global weights_only refuses
    with pytest.raises(pickle.UnpicklingError, match="juice://ck/obj.pt"):
        tj.load("juice://ck/obj.pt", weights_only=True)
    assert tj.load("juice://ck/obj.pt", weights_only=False)["obj"].pid == 3
    with pytest.raises(ValueError, match="mmap"):
        tj.load("juice://ck/m.pt", mmap=True)


def test_fsspec_open_works_with_torch_and_tj(vol):
    import fsspec
    with fsspec.open("juice://ck/fs/a.pt", "wb") as f:
        torch.save({"a": torch.ones(3)}, f)
    with fsspec.open("juice://ck/fs/a.pt", "rb") as f:
        assert same(torch.load(f), {"a": torch.ones(3)})
    tj.save({"b": torch.zeros(3)}, fsspec.open("juice://ck/fs/b.pt", "wb"))   # atomic path
    assert same(tj.load(fsspec.open("juice://ck/fs/b.pt")), {"b": torch.zeros(3)})
    assert vol.listdir("/fs") == ["a.pt", "b.pt"]


def test_missing_parents_are_created_and_bad_targets_refused(vol):
    tj.save({"k": 1}, "juice://ck/deep/er/still/x.pt")
    assert vol.isdir("/deep/er/still") and tj.load("juice://ck/deep/er/still/x.pt") == {"k": 1}
    vol.makedirs("/adir/sub")
    with pytest.raises(IsADirectoryError, match="juice://ck/adir"):
        tj.save({"k": 1}, "juice://ck/adir")
    vol.write_bytes("/afile", b"x")
    with pytest.raises(NotADirectoryError, match="juice://ck/afile/x.pt"):
        tj.save({"k": 1}, "juice://ck/afile/x.pt")
    with pytest.raises(FileNotFoundError, match="juice://ck/nope.pt"):
        tj.load("juice://ck/nope.pt")
    assert vol.listdir("/adir") == ["sub"]


def test_replace_is_atomic_for_readers(vol):
    tj.save(state(1, 512 * 1024), (vol, "/r.pt"))
    reader = vol.open("/r.pt", "rb")                     # opened before the replace (same client)
    tj.save(state(2, 512 * 1024), (vol, "/r.pt"))
    assert same(torch.load(reader), state(1, 512 * 1024))    # still the old one, whole
    reader.close()
    assert same(tj.load("juice://ck/r.pt"), state(2, 512 * 1024))
    assert names(vol) == ["r.pt"]


def test_unpicklable_object_leaves_old_file_and_nothing_else(vol):
    tj.save(state(1), "juice://ck/u.pt")
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        tj.save({"w": torch.ones(4 * MiB), "f": lambda: 0}, "juice://ck/u.pt")
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        tj.save({"w": torch.ones(10), "lock": threading.Lock()}, "juice://ck/new.pt")
    assert names(vol) == ["u.pt"]
    assert same(tj.load("juice://ck/u.pt"), state(1))


@pytest.mark.parametrize("when", ["first", "always"])
def test_failing_store_keeps_old_checkpoint_and_raises(request, tmp_path, when):
    v, store = _faulty(request, tmp_path)
    tj.save(state(1, MiB), (v, "/c/ck.pt"))
    if when == "first":
        store.fail_next(1, op="put", exc=PermissionError)  # not transient (EIO is retried)
    else:
        store.fail_always(True, ops=["put"])
    big = state(2, 6 * MiB)                             # 24 MiB of floats: many 1 MiB blocks
    with pytest.raises(OSError):
        tj.save(big, (v, "/c/ck.pt"))
    store.fail_always(False)
    assert v.listdir("/c") == ["ck.pt"]                  # the temporary file is gone
    assert same(tj.load((v, "/c/ck.pt")), state(1, MiB))
    tj.save(big, (v, "/c/ck.pt"))                        # and the volume keeps working
    assert same(tj.load((v, "/c/ck.pt")), big)


def test_store_error_surfacing_inside_torch_save_is_the_one_raised(request, tmp_path):
    # past the first 64 MiB chunk, a failed upload is seen by a write inside torch.save, which
    # answers with an error of its own ("unexpected pos"): the store's error must reach the caller
    v, store = _faulty(request, tmp_path)
    tj.save(state(1), (v, "/ck.pt"))
    store.fail_always(True, ops=["put"])
    big = {f"w{i}": torch.full((4 * MiB,), float(i)) for i in range(6)}   # 96 MiB
    with pytest.raises(OSError, match="injected failure of put"):
        tj.save(big, (v, "/ck.pt"))
    store.fail_always(False)
    assert names(v) == ["ck.pt"] and same(tj.load((v, "/ck.pt")), state(1))


def test_dead_s3_endpoint_mid_save_raises_the_store_error(request, tmp_path):
    # torch.save swallows some write errors and fails later with "unexpected pos" of its own; the
    # caller must get the store's error (here: the S3 server is gone)
    from torchjuice.testing import S3Server, ServerUnavailable
    try:
        srv = S3Server()
    except ServerUnavailable as e:
        pytest.skip(str(e))
    request.addfinalizer(srv.stop)
    meta = f"sqlite3://{tmp_path}/dead.db"
    tj.format(meta, "dead", storage=srv.url())
    v = tj.connect(meta, cache_size=0)
    request.addfinalizer(v.close)
    tj.save(state(1), (v, "/ck.pt"))
    srv.proc.kill()
    srv.proc.wait()
    big = {f"w{i}": torch.full((4 * MiB,), float(i)) for i in range(10)}   # 160 MiB
    with pytest.raises(OSError, match="S3|endpoint|connect"):
        tj.save(big, (v, "/ck.pt"))
    with pytest.raises(OSError, match="S3|endpoint|connect"):
        tj.async_save(big, (v, "/ck.pt")).result(120)


def test_store_full_after_some_blocks(request, tmp_path):
    from torchjuice.object.fault import FaultyStore

    class FullAfter(FaultyStore):
        budget = 5

        def put(self, key, data):
            with self._lock:
                self.budget -= 1
                full = self.budget < 0
            if full:
                raise OSError(errno.ENOSPC, "No space left on device", key)
            return super().put(key, data)

    v, store = _faulty(request, tmp_path, FullAfter)
    store.budget = 10**9
    tj.save(state(1, MiB), (v, "/ck.pt"))
    store.budget = 5
    with pytest.raises(OSError) as ei:
        tj.save(state(2, 8 * MiB), (v, "/ck.pt"))
    assert ei.value.errno == errno.ENOSPC
    assert names(v) == ["ck.pt"]
    assert same(tj.load((v, "/ck.pt")), state(1, MiB))


def test_truncated_corrupt_and_foreign_files_raise_checkpoint_error(vol):
    tj.save(state(4, MiB), "juice://ck/good.pt")
    raw = vol.read_bytes("/good.pt")
    vol.write_bytes("/trunc.pt", raw[: len(raw) // 2])
    vol.write_bytes("/empty.pt", b"")
    vol.write_bytes("/text.pt", b"this is not a checkpoint\n" * 100)
    bad = bytearray(raw)
    bad[-200:] = bytes(200)                              # the zip central directory
    vol.write_bytes("/tail.pt", bytes(bad))
    for name in ("trunc.pt", "empty.pt", "text.pt", "tail.pt"):
        with pytest.raises(ck.CheckpointError, match=f"juice://ck/{name}") as ei:
            tj.load(f"juice://ck/{name}", weights_only=False)
        assert isinstance(ei.value, RuntimeError) and ei.value.url == f"juice://ck/{name}"
    assert same(tj.load("juice://ck/good.pt"), state(4, MiB))


# -- SIGKILL in the middle of a save -------------------------------------------------------------------
ZYGOTE = r"""
import json, os, sys, time, traceback
import torch
import torchjuice as tj
import torchjuice.checkpoint          # imported once here, not in every forked saver

def make(seed, n):
    return {"seed": seed, "w": torch.full((n,), float(seed)),
            "v": torch.arange(n, dtype=torch.float32) * seed, "tail": torch.ones(n // 3) * seed}

print("READY", flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            sd = make(cmd["seed"], cmd["n"])
            name = tj.split_url(cmd["url"])[0]
            tj.volume_for(name, cmd["meta"])       # connected: the kill window is the save itself
            print("SAVING", os.getpid(), flush=True)
            tj.save(sd, cmd["url"], meta=cmd["meta"])
            print("SAVED", os.getpid(), flush=True)
            time.sleep(600)          # wait to be killed: the pid is never reaped early
        except BaseException:
            traceback.print_exc()
        os._exit(1)
    _, status = os.waitpid(pid, 0)
    print("EXIT", pid, status, flush=True)
"""


@pytest.fixture(scope="module")
def zygote():
    """One process with torch imported that forks a saver per kill (a fresh interpreter per kill
    would spend seconds importing torch)."""
    env = dict(os.environ)
    p = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout.readline().strip() == "READY"
    yield p
    p.stdin.close()
    p.wait(30)


def _expect(p, word: str) -> list[str]:
    line = p.stdout.readline().split()
    assert line and line[0] == word, f"expected {word}, got {line}"
    return line


def make(seed, n):
    return {"seed": seed, "w": torch.full((n,), float(seed)),
            "v": torch.arange(n, dtype=torch.float32) * seed, "tail": torch.ones(n // 3) * seed}


@pytest.mark.parametrize("engine", ["sqlite", "redis"])
def test_sigkill_mid_save_never_damages_the_old_checkpoint(request, tmp_path, zygote, engine):
    meta = _format(request, tmp_path, engine, name="kill")
    url, n = "juice://kill/ckpt/model.pt", 5 * MiB          # ~47 MiB: 47 blocks, one chunk boundary
    tj.save(make(0, n), url, meta=meta)
    vol = tj.connect(meta)
    request.addfinalizer(vol.close)

    def run(seed: int, delay: float | None):
        zygote.stdin.write(json.dumps({"seed": seed, "n": n, "url": url, "meta": meta}) + "\n")
        zygote.stdin.flush()
        pid = int(_expect(zygote, "SAVING")[1])
        t0 = time.perf_counter()
        if delay is None:                                   # let it finish: measure a whole save
            _expect(zygote, "SAVED")
            took = time.perf_counter() - t0
        else:
            time.sleep(delay)
            took = None
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass                                            # it died by itself: reported below
        line = zygote.stdout.readline().split()
        if line and line[0] == "SAVED" and delay is not None:
            line = zygote.stdout.readline().split()
        assert line[:2] == ["EXIT", str(pid)], line
        status = int(line[2])
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, \
            f"the saver exited by itself (status {status}): see its traceback above"
        return pid, took

    full = min(run(s, None)[1] for s in (1, 2, 3))     # the quickest whole save: the kill window
    current = 3
    assert same(tj.load(url, meta=meta), make(3, n))
    rng = random.Random(int(os.environ.get("TJ_KILL_SEED", "5")))
    interrupted = 0
    for i in range(20):
        seed = 100 + i
        pid, _ = run(seed, rng.uniform(0, full))
        got = tj.load(url, meta=meta)
        leftovers = ck.find_leftovers("juice://kill/ckpt", meta=meta)
        mine = [lo for lo in leftovers if lo.pid == pid]
        assert got["seed"] in (current, seed), f"kill {i}: loaded seed {got['seed']}"
        if mine:                                            # killed before its rename: the old one
            interrupted += 1
            assert got["seed"] == current, f"kill {i}: a half-done save replaced the checkpoint"
            assert mine[0].target == "model.pt" and mine[0].local and mine[0].alive is False
        assert same(got, make(got["seed"], n)), f"kill {i}: checkpoint {got['seed']} damaged"
        current = got["seed"]
        removed = ck.cleanup_leftovers("juice://kill/ckpt", meta=meta)
        assert {lo.path for lo in removed} == {lo.path for lo in leftovers}
        assert vol.listdir("/ckpt") == ["model.pt"]
    print(f"{engine}: {interrupted} of 20 kills landed inside a save (a whole save: {full:.2f}s)")
    assert interrupted >= 8, f"only {interrupted} of 20 kills landed inside a save"
    tj.save(make(7, n), url, meta=meta)                     # the volume still works
    assert tj.load(url, meta=meta)["seed"] == 7


# -- leftovers and retention -------------------------------------------------------------------------
def test_find_and_cleanup_leftovers(vol):
    vol.makedirs("/d/sub")
    here = ck._host_tag()
    live = f"/d/.a.pt.tj-tmp-{os.getpid()}-{here}00c0ffee"        # this process: a save running
    vol.write_bytes(live, b"partial")
    dead = f"/d/.b.pt.tj-tmp-999999999-{here}12345678"            # no such pid on this host
    vol.write_bytes(dead, b"partial!")
    other = "ffffffff" if here != "ffffffff" else "00000000"
    foreign = f"/d/sub/.c.pt.tj-tmp-{os.getpid()}-{other}0a0a0a0a"  # another host: unknown
    vol.write_bytes(foreign, b"?")
    vol.write_bytes("/d/.hidden", b"not ours")
    vol.write_bytes("/d/.e.pt.tj-tmp-12-xyz", b"not our pattern")
    found = ck.find_leftovers("juice://ck/d")
    assert [(lo.target, lo.local, lo.alive, lo.size) for lo in sorted(found, key=lambda x: x.target)] \
        == [("a.pt", True, True, 7), ("b.pt", True, False, 8)]
    assert len(ck.find_leftovers("juice://ck/d", recursive=True)) == 3
    assert [lo.target for lo in ck.cleanup_leftovers("juice://ck/d", recursive=True,
                                                     dry_run=True)] == ["b.pt"]
    assert [lo.target for lo in ck.cleanup_leftovers("juice://ck/d", recursive=True)] == ["b.pt"]
    assert not vol.exists(dead) and vol.exists(live) and vol.exists(foreign)
    gone = ck.cleanup_leftovers("juice://ck/d", recursive=True, min_age=0)   # unknown + old enough
    assert [lo.target for lo in gone] == ["c.pt"]                             # a live writer: never
    assert sorted(vol.listdir("/d")) == sorted([live[3:], ".hidden", ".e.pt.tj-tmp-12-xyz", "sub"])
    assert vol.listdir("/d/sub") == []


def test_retain_keeps_the_newest(vol):
    for i in (1, 2, 9, 10, 11, 100):
        tj.save({"i": i}, f"juice://ck/r/step-{i}.pt")
    vol.write_bytes("/r/.step-200.pt.tj-tmp-1-ab", b"in progress")      # never touched
    vol.write_bytes("/r/notes.txt", b"keep me")                          # not matching
    vol.makedirs("/r/step-300")                                          # DCP dir in progress
    vol.makedirs("/r/step-0")
    vol.write_bytes("/r/step-0/.metadata", b"m")                         # a complete DCP dir
    removed = ck.retain("juice://ck/r", keep=3, pattern="step-*", key="name")
    assert removed == ["juice://ck/r/step-0", "juice://ck/r/step-1.pt", "juice://ck/r/step-2.pt",
                       "juice://ck/r/step-9.pt"]
    assert vol.listdir("/r") == [".step-200.pt.tj-tmp-1-ab", "notes.txt", "step-10.pt",
                                 "step-100.pt", "step-11.pt", "step-300"]
    for name in ("a", "b", "c"):                                          # by modification time
        tj.save({"n": name}, f"juice://ck/m/{name}.pt")
        time.sleep(0.01)
    vol.utime("/m/a.pt", (time.time() + 10, time.time() + 10))            # "a" is now the newest
    assert ck.retain("juice://ck/m", keep=1, dry_run=True) == ["juice://ck/m/b.pt",
                                                               "juice://ck/m/c.pt"]
    assert ck.retain("juice://ck/m", keep=1) == ["juice://ck/m/b.pt", "juice://ck/m/c.pt"]
    assert vol.listdir("/m") == ["a.pt"]
    assert ck.retain("juice://ck/m", keep=1) == []
    with pytest.raises(ValueError):
        ck.retain("juice://ck/m", keep=0)


# -- async save ------------------------------------------------------------------------------------
@pytest.fixture
def gated(request, tmp_path):
    """A volume whose store holds every put until the gate opens."""
    from torchjuice.object.fault import FaultyStore

    class Gated(FaultyStore):
        gate = threading.Event()

        def put(self, key, data):
            assert self.gate.wait(60), "gate never opened"
            return super().put(key, data)

    v, store = _faulty(request, tmp_path, Gated)
    store.gate = threading.Event()
    store.gate.set()
    request.addfinalizer(store.gate.set)
    return v, store


def test_async_save_returns_before_upload_and_snapshots(gated):
    v, store = gated
    saver = ck.AsyncSaver()
    sd = state(5, MiB)
    expect = state(5, MiB)
    store.gate.clear()
    fut = saver.save(sd, (v, "/a/async.pt"))
    assert not fut.done()                             # the upload is held: save is still running
    assert not v.exists("/a/async.pt")
    sd["w"].add_(1)                                    # training goes on, mutating the tensors
    sd["opt"]["lr"] = 99
    sd["opt"]["m"].append(torch.ones(1))
    store.gate.set()
    assert fut.result(60) is None
    assert same(tj.load((v, "/a/async.pt")), expect)  # the snapshot, not the mutated state
    sd2 = state(6, MiB)                                # a second save reuses the buffers
    fut2 = saver.save(sd2, (v, "/a/async2.pt"))
    sd2["w"].zero_()
    fut2.result(60)
    assert same(tj.load((v, "/a/async2.pt")), state(6, MiB))
    assert same(tj.load((v, "/a/async.pt")), expect)
    saver.close()


def test_second_async_save_waits_for_the_first(gated):
    v, store = gated
    saver = ck.AsyncSaver()
    store.gate.clear()
    first = saver.save(state(1, MiB), (v, "/q/1.pt"))
    second = []
    t = threading.Thread(target=lambda: second.append(saver.save(state(2, MiB), (v, "/q/2.pt"))))
    t.start()
    t.join(0.5)
    assert t.is_alive() and not first.done()          # waits while the first is in flight
    store.gate.set()
    t.join(60)
    assert first.result(60) is None and second[0].result(60) is None
    assert same(tj.load((v, "/q/1.pt")), state(1, MiB))
    assert same(tj.load((v, "/q/2.pt")), state(2, MiB))
    saver.close()


def test_async_save_failure_reaches_result_and_keeps_old(request, tmp_path):
    v, store = _faulty(request, tmp_path)
    tj.save(state(1), (v, "/f.pt"))
    store.fail_always(True, ops=["put"])
    fut = tj.async_save(state(2, MiB), (v, "/f.pt"))
    with pytest.raises(OSError):
        fut.result(60)
    store.fail_always(False)
    assert names(v) == ["f.pt"] and same(tj.load((v, "/f.pt")), state(1))
    fut = tj.async_save(state(3), "juice://faulty/g.pt", meta=f"sqlite3://{tmp_path}/f.db")
    ck.wait_async(60)
    assert fut.done() and same(tj.load("juice://faulty/g.pt", meta=f"sqlite3://{tmp_path}/f.db"),
                               state(3))


def test_async_save_in_flight_finishes_before_the_interpreter_exits(vol, tmp_path):
    script = (
        "import torch, torchjuice as tj\n"
        "sd = {'w': torch.arange(8 << 20, dtype=torch.float32)}\n"
        "fut = tj.async_save(sd, 'juice://ck/exit/last.pt')\n"
        "print('returned', fut.done(), flush=True)\n")        # and the script ends here
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=dict(os.environ), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("returned")
    got = tj.load("juice://ck/exit/last.pt")
    assert torch.equal(got["w"], torch.arange(8 << 20, dtype=torch.float32))
    assert vol.listdir("/exit") == ["last.pt"]


def test_async_save_bad_target_fails_at_once(vol):
    with pytest.raises(tj.InvalidURLError):
        tj.async_save({"x": 1}, "juice://")


# -- torch.distributed.checkpoint ----------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.filterwarnings("ignore:Detected an existing checkpoint")
def test_dcp_single_process_writer_reader_and_fsspec(vol):
    import torch.distributed.checkpoint as dcp
    sd = {"w": torch.randn(1000), "layers": {str(i): torch.full((300,), float(i)) for i in range(6)},
          "step": 3}
    dcp.save(sd, checkpoint_id="juice://ck/dcp/fsspec")          # torch's FsspecWriter, unchanged
    writer = ck.JuiceStorageWriter("juice://ck/dcp/ours", thread_count=3)
    dcp.save(sd, storage_writer=writer)
    for cid, reader in (("juice://ck/dcp/fsspec", None),
                        ("juice://ck/dcp/ours", ck.JuiceStorageReader("juice://ck/dcp/ours")),
                        ("juice://ck/dcp/fsspec", ck.JuiceStorageReader("juice://ck/dcp/fsspec"))):
        out = {"w": torch.zeros(1000), "layers": {str(i): torch.zeros(300) for i in range(6)},
               "step": 0}
        if reader is None:
            dcp.load(out, checkpoint_id=cid)
        else:
            dcp.load(out, storage_reader=reader)
        assert same(out, sd)
    first = set(vol.listdir("/dcp/ours"))
    assert ".metadata" in first and len(first) == 4 and not any(ck.TMP_MARK in n for n in first)
    sd2 = {**sd, "w": sd["w"] + 1, "step": 4}                    # save over it: fresh data files,
    dcp.save(sd2, storage_writer=ck.JuiceStorageWriter("juice://ck/dcp/ours", thread_count=3))
    second = set(vol.listdir("/dcp/ours"))                       # and the old ones are gone
    assert len(second) == 4 and first & second == {".metadata"}
    out = {"w": torch.zeros(1000), "layers": {str(i): torch.zeros(300) for i in range(6)}, "step": 0}
    dcp.load(out, storage_reader=ck.JuiceStorageReader("juice://ck/dcp/ours"))
    assert same(out, sd2)
    fut = dcp.async_save(sd2, storage_writer=ck.JuiceStorageWriter("juice://ck/dcp/zasync"))
    fut.result()                                                 # dcp.async_save works too
    out = {"w": torch.zeros(1000), "layers": {str(i): torch.zeros(300) for i in range(6)}, "step": 0}
    dcp.load(out, storage_reader=ck.JuiceStorageReader("juice://ck/dcp/zasync"))
    assert same(out, sd2)
    assert ck.retain("juice://ck/dcp", keep=2, key="name") == ["juice://ck/dcp/fsspec"]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_writer_reader_on_an_open_volume_and_streamed_items(request, tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException   # a BaseException
    v, store = _faulty(request, tmp_path)                 # a Volume object, not a registered URL
    sd = {"big": torch.randn(300_000), "small": torch.arange(10), "meta": {"k": "v"}}
    dcp.save(sd, storage_writer=ck.JuiceStorageWriter("/run/c1", volume=v))
    monkeypatch.setattr(ck, "DCP_WHOLE_ITEM", 4096)       # "big" now streams, "small" is fetched whole
    out = {"big": torch.zeros(300_000), "small": torch.zeros(10, dtype=torch.int64),
           "meta": {"k": ""}}
    dcp.load(out, storage_reader=ck.JuiceStorageReader("/run/c1", volume=v))
    assert same(out, sd)
    store.fail_always(True, ops=["get"])                  # a failing store reaches dcp.load's caller
    with pytest.raises((OSError, CheckpointException), match="injected failure"):
        dcp.load(out, storage_reader=ck.JuiceStorageReader("/run/c1", volume=v))
    store.fail_always(False)
    store.fail_always(True, ops=["put"])                  # and a failing save leaves the old one
    with pytest.raises((OSError, CheckpointException), match="injected failure"):
        dcp.save({**sd, "small": torch.zeros(10, dtype=torch.int64)},
                 storage_writer=ck.JuiceStorageWriter("/run/c1", volume=v))
    store.fail_always(False)
    out["small"].zero_()
    dcp.load(out, storage_reader=ck.JuiceStorageReader("/run/c1", volume=v))
    assert same(out, sd)


def _dcp_rank(rank: int, world: int, init: str, url: str, use_ours: bool) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        full = torch.arange(64 * 1024, dtype=torch.float32).reshape(256, 256)
        sd = {"w": distribute_tensor(full, mesh, [Shard(0)]), "bias": torch.ones(8),
              "step": 11}
        if use_ours:
            dcp.save(sd, storage_writer=ck.JuiceStorageWriter(url))
        else:
            dcp.save(sd, checkpoint_id=url)
        out = {"w": distribute_tensor(torch.zeros(256, 256), mesh, [Shard(0)]),
               "bias": torch.zeros(8), "step": 0}
        if use_ours:
            dcp.load(out, storage_reader=ck.JuiceStorageReader(url))
        else:
            dcp.load(out, checkpoint_id=url)
        rows = 256 // world
        assert torch.equal(out["w"].to_local(), full[rank * rows:(rank + 1) * rows])
        assert torch.equal(out["bias"], torch.ones(8)) and out["step"] == 11
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_dcp_two_ranks_sharded_round_trip(vol, tmp_path):
    import torch.multiprocessing as mp
    for use_ours, where in ((True, "ours"), (False, "fsspec")):
        init = f"file://{tmp_path}/pg-{where}"
        url = f"juice://ck/dist/{where}"
        mp.spawn(_dcp_rank, args=(2, init, url, use_ours), nprocs=2, join=True)
        names = vol.listdir(f"/dist/{where}")
        assert ".metadata" in names, names
        for r in (0, 1):
            assert any(n.startswith(f"__{r}_") and n.endswith(".distcp") for n in names), names
    # the checkpoint is whole: one process reads the full tensor back
    import torch.distributed.checkpoint as dcp
    out = {"w": torch.zeros(256, 256), "bias": torch.zeros(8), "step": 0}
    dcp.load(out, storage_reader=ck.JuiceStorageReader("juice://ck/dist/ours"))
    assert torch.equal(out["w"], torch.arange(64 * 1024, dtype=torch.float32).reshape(256, 256))
