"""Checkpoints on torchjuice volumes: ``save``/``load`` (``torch.save``/``torch.load`` for
``juice://`` URLs), ``async_save``, crash-safe commits, leftovers and retention, and a
``torch.distributed.checkpoint`` storage writer/reader pair.

    import torchjuice as tj
    tj.save(model.state_dict(), "juice://vol/ckpt/step-100.pt")      # atomic
    sd = tj.load("juice://vol/ckpt/step-100.pt", map_location="cpu")
    fut = tj.async_save(model.state_dict(), "juice://vol/ckpt/step-200.pt")
    ...                                                                # training goes on
    fut.result()                                                       # durable (or raises)
    tj.checkpoint.retain("juice://vol/ckpt", keep=3, pattern="step-*.pt")

**Atomic commit.** The bytes go to a hidden temporary file in the target's directory,
``.NAME.tj-tmp-<pid>-<hex>``; closing it uploads every block and commits the file's slices to the
metadata engine; only then is it renamed over ``NAME`` in one metadata transaction. A reader opening
``NAME`` sees the old checkpoint or the new one, never a part. A process killed in the middle leaves
the old checkpoint untouched and the temporary file behind: :func:`find_leftovers` lists such files,
:func:`cleanup_leftovers` removes those whose writer is gone (the blocks of a temporary file that was
never committed are unreferenced objects: ``torchjuice gc`` reclaims them).

A target is a ``juice://VOLUME/path`` URL (the volume found as for every ``juice://`` URL: ``meta=``,
``$TORCHJUICE_META``, the registry), a ``(Volume, "/path")`` pair, or a path inside ``volume=``.
Anything else (a local path, a file object) goes to ``torch.save``/``torch.load`` unchanged; an
``fsspec.open(...)`` object is opened for you (a ``juice://`` one takes the atomic path).

This module uses only :class:`~torchjuice.volume.Volume` and the ``juice://`` helpers.
"""
from __future__ import annotations

import copy
import errno
import fnmatch
import io
import os
import pickle
import posixpath
import re
import socket
import threading
import time
import uuid
import weakref
import zlib
from collections import namedtuple
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch
from torch.serialization import DEFAULT_PROTOCOL

from .errors import VolumeMismatchError, oserror
from .volume import Volume, split_url, volume_for

__all__ = ["save", "load", "async_save", "wait_async", "AsyncSaver", "CheckpointError",
           "find_leftovers", "cleanup_leftovers", "Leftover", "retain",
           "JuiceStorageWriter", "JuiceStorageReader"]

TMP_MARK = ".tj-tmp-"
#: ``.NAME.tj-tmp-<pid>-<host><random>``: the temporary name a checkpoint is written under; the
#: writer's process id and a hash of its host name are in the name itself, so a leftover can be
#: told from a save in progress from the moment it exists.
TMP_RE = re.compile(r"^\.(?P<name>.*)\.tj-tmp-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})[0-9a-f]{8}$")
READ_BUFFER = 4 << 20                     # tj.load: torch reads small zip headers between tensors
DCP_READ_BUFFER = 1 << 20                 # DCP streams: many small items, read out of order
DCP_WHOLE_ITEM = 64 << 20                 # DCP items up to this size are fetched in one read
MAX_NAME = 255


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded: truncated, corrupt, or not a torch checkpoint.
    The message names the file; ``__cause__`` is torch's own error."""

    def __init__(self, message: str, url: str | None = None):
        super().__init__(message)
        self.url = url


# -- where a checkpoint goes -----------------------------------------------------------------------
def _url(vol: Volume, path: str) -> str:
    return f"juice://{vol.name}{path}"


def _fsspec_juice(f):
    """``(url, meta)`` for an ``fsspec.open("juice://...")`` object, else None."""
    fs = getattr(f, "fs", None)
    if fs is None or not hasattr(f, "path") or getattr(fs, "protocol", None) != "juice":
        return None
    return "juice://" + f.path.lstrip("/"), getattr(fs, "meta", None)


def _target(f, volume: Volume | None, meta: str | None) -> tuple[Volume, str] | None:
    """``(volume, normalised inner path)`` for a juice target; None for anything torch handles."""
    if isinstance(f, tuple) and len(f) == 2 and isinstance(f[0], Volume):
        vol, path = f
        return vol, vol.norm(path)
    if isinstance(f, os.PathLike):
        f = os.fspath(f)
    if volume is not None:
        if isinstance(f, str) and f.startswith("juice://"):
            name, path = split_url(f)
            if name != volume.name:
                raise VolumeMismatchError(f"URL {f!r} names volume {name!r}, but volume= is "
                                          f"volume {volume.name!r}")
        elif isinstance(f, str):
            path = f
        else:
            raise TypeError(f"with volume=, the target must be a path inside it, not "
                            f"{type(f).__name__}")
        return volume, volume.norm(path)
    if isinstance(f, str) and f.startswith("juice://"):
        name, path = split_url(f)
        vol = volume_for(name, meta)
        return vol, vol.norm(path)
    return None


def _host_tag() -> str:
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def _tmp_name(name: str) -> str:
    tail = f"{TMP_MARK}{os.getpid()}-{_host_tag()}{uuid.uuid4().hex[:8]}"
    raw = name.encode()
    room = MAX_NAME - 1 - len(tail.encode())
    if len(raw) > room:                                   # keep the whole name within NAME_MAX
        name = raw[:room].decode("utf-8", "ignore")
    return f".{name}{tail}"


def _named(e: OSError, url: str) -> OSError:
    """The same built-in OSError naming ``url`` (torchjuice's own errors already say enough)."""
    if type(e).__module__ != "builtins" or e.errno is None:
        return e
    return type(e)(e.errno, e.strerror, url)


def _create_tmp(vol: Volume, path: str):
    """Open a fresh temporary file next to ``path`` (parents made when missing); returns
    ``(file, tmp path)``."""
    parent, name = posixpath.split(path)
    url = _url(vol, path)
    if not name or vol.isdir(path):
        raise oserror(errno.EISDIR, url)
    tmp = posixpath.join(parent, _tmp_name(name))
    try:
        try:
            f = vol.open(tmp, "xb")
        except FileNotFoundError:
            vol.makedirs(parent, exist_ok=True)
            f = vol.open(tmp, "xb")
    except OSError as e:
        new = _named(e, url)
        if new is e:
            raise
        raise new from None
    return f, tmp


def _discard(vol: Volume, f, tmp: str) -> None:
    """Close and remove a temporary file after a failure (best effort: the caller's error wins)."""
    try:
        f.close()
    except BaseException:
        pass
    try:
        vol.remove(tmp)
    except OSError:
        pass


class _ErrorTap:
    """Forwards to a file and remembers the first error raised by its ``write``/``flush``/``close``.
    torch.save answers a failed write with a follow-up error of its own ("unexpected pos ..." from
    its zip writer) and that is what would reach the caller; the store's error is the one to
    raise."""

    def __init__(self, f):
        self._f = f
        self.error: BaseException | None = None

    def _call(self, name: str, *args):
        try:
            return getattr(self._f, name)(*args)
        except BaseException as e:
            if self.error is None:
                self.error = e
            raise

    def write(self, b):
        return self._call("write", b)

    def flush(self):
        return self._call("flush")

    def close(self):
        return self._call("close")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def reraise(self, e: BaseException) -> None:
        """Raise the file's own error instead of ``e`` when ``e`` merely followed it."""
        err = self.error
        if err is not None and err is not e:
            raise err.with_traceback(err.__traceback__)


@contextmanager
def atomic_open(vol: Volume, path: str):
    """A binary file whose content replaces ``path`` atomically when the ``with`` block ends
    without error (after every byte is uploaded and committed); on error nothing changes at
    ``path`` and the temporary file is removed."""
    path = vol.norm(path)
    f, tmp = _create_tmp(vol, path)
    ok = False
    try:
        yield f
        f.close()                   # uploads the rest and commits; raises if any upload failed
        vol.rename(tmp, path)       # one metadata transaction: old or new, never a part
        ok = True
    finally:
        if not ok:
            _discard(vol, f, tmp)


# -- save / load -----------------------------------------------------------------------------------
def save(obj: Any, f, pickle_module=pickle, pickle_protocol: int = DEFAULT_PROTOCOL,
         _use_new_zipfile_serialization: bool = True, _disable_byteorder_record: bool = False, *,
         volume: Volume | None = None, meta: str | None = None) -> None:
    """``torch.save`` to a ``juice://`` URL (or ``(Volume, path)``, or a path in ``volume=``),
    committed atomically: written under a temporary name in the same directory and renamed over
    the target once every byte is durable. Missing parent directories are created. On any error
    (an unpicklable object, a failing store) the error is raised, the previous file at the target
    is untouched and the temporary file is removed.

    Other targets (local paths, file objects) go to ``torch.save`` unchanged."""
    kw = dict(pickle_module=pickle_module, pickle_protocol=pickle_protocol,
              _use_new_zipfile_serialization=_use_new_zipfile_serialization,
              _disable_byteorder_record=_disable_byteorder_record)
    if volume is None and meta is None and not isinstance(f, (str, os.PathLike, tuple)):
        spec = _fsspec_juice(f)
        if spec is not None:
            f, meta = spec
        elif hasattr(f, "fs") and hasattr(f, "__enter__") and not hasattr(f, "write"):
            with f as fh:                      # another fsspec.open(...): plain torch.save
                return torch.save(obj, fh, **kw)
    target = _target(f, volume, meta)
    if target is None:
        return torch.save(obj, f, **kw)
    vol, path = target
    with atomic_open(vol, path) as fh:
        tap = _ErrorTap(fh)
        try:
            torch.save(obj, tap, **kw)
        except BaseException as e:
            tap.reraise(e)
            raise


def _corrupt(e: BaseException) -> bool:
    """Whether torch.load's error means the bytes are not a loadable checkpoint (rather than a
    refused global under weights_only, or an I/O error that already names what failed)."""
    if isinstance(e, (OSError, MemoryError)) or not isinstance(e, Exception):
        return False
    if isinstance(e, pickle.UnpicklingError) and "weights_only" in str(e).lower() \
            and "unsupported global" in str(e).lower():
        return False
    return True


def load(f, map_location=None, pickle_module=None, *, weights_only: bool | None = None,
         mmap: bool | None = None, volume: Volume | None = None, meta: str | None = None,
         **pickle_load_args) -> Any:
    """``torch.load`` from a ``juice://`` URL (or ``(Volume, path)``, or a path in ``volume=``).
    A truncated or corrupt file raises :class:`CheckpointError` naming it; a global refused by
    ``weights_only`` raises torch's ``pickle.UnpicklingError`` with the file named. ``mmap=True``
    needs a local file and is refused for volume files.

    Other sources (local paths, file objects) go to ``torch.load`` unchanged."""
    kw = dict(map_location=map_location, pickle_module=pickle_module, weights_only=weights_only,
              mmap=mmap, **pickle_load_args)
    if volume is None and meta is None and not isinstance(f, (str, os.PathLike, tuple)):
        spec = _fsspec_juice(f)
        if spec is not None:
            f, meta = spec
        elif hasattr(f, "fs") and hasattr(f, "__enter__") and not hasattr(f, "read"):
            with f as fh:
                return torch.load(fh, **kw)
    target = _target(f, volume, meta)
    if target is None:
        return torch.load(f, **kw)
    if mmap:
        raise ValueError("mmap=True needs a local file; torchjuice volume files are read into "
                         "memory (copy the file to a local disk to memory-map it)")
    kw.pop("mmap")
    vol, path = target
    url = _url(vol, path)
    try:
        size = vol.stat(path).st_size
        fh = vol.open(path, "rb", buffering=max(io.DEFAULT_BUFFER_SIZE, min(READ_BUFFER, size)))
    except OSError as e:
        new = _named(e, url)
        if new is e:
            raise
        raise new from None
    with fh:
        try:
            return torch.load(fh, **kw)
        except BaseException as e:
            if not _corrupt(e):
                if isinstance(e, pickle.UnpicklingError):
                    raise pickle.UnpicklingError(f"{url}: {e}") from e
                raise
            raise CheckpointError(f"cannot load checkpoint {url} ({size} bytes): it is truncated, "
                                  f"corrupt or not a torch checkpoint: {type(e).__name__}: {e}",
                                  url) from e


# -- async save ------------------------------------------------------------------------------------
_IMMUTABLE = (int, float, complex, bool, str, bytes, type(None), torch.dtype, torch.device,
              torch.Size, torch.layout, torch.memory_format, type, range, slice)

_locations: dict[int, str] = {}          # data_ptr of a staged CPU buffer -> its source's location
_locations_lock = threading.Lock()
_tagger_registered = False


def _staged_tag(storage) -> str | None:
    """torch.serialization tagger: a storage staged from a device tensor saves with that device's
    location (``cuda:0``...), so the file loads as a ``torch.save`` of the original would."""
    if not _locations:
        return None
    try:
        return _locations.get(storage.data_ptr())
    except Exception:
        return None


def _no_deserialize(obj, location):
    return None


def _register_tagger() -> None:
    global _tagger_registered
    with _locations_lock:
        if not _tagger_registered:
            torch.serialization.register_package(1, _staged_tag, _no_deserialize)
            _tagger_registered = True


class _Stager:
    """Copies the tensors of an object into CPU buffers (pinned when they come from CUDA), reused
    from one snapshot to the next when their sizes match: no fresh memory, no page faults."""

    def __init__(self, reuse: bool):
        self.reuse = reuse
        self._free: dict[tuple[int, bool], list] = {}
        self._used: list = []           # (nbytes, pinned, storage) of the last snapshot

    def release(self) -> None:
        self._free.clear()
        self._forget(self._used)
        self._used = []

    @staticmethod
    def _forget(used) -> None:
        with _locations_lock:
            for _, _, st in used:
                _locations.pop(st.data_ptr(), None)

    def snapshot(self, obj):
        free: dict[tuple[int, bool], list] = {}
        if self.reuse:
            for n, pinned, st in self._used:
                free.setdefault((n, pinned), []).append(st)
        self._forget(self._used)
        self._used = []
        storages: dict[tuple, Any] = {}
        devices: set = set()
        memo: dict[int, Any] = {}

        def buffer(n: int, pinned: bool):
            pool = free.get((n, pinned))
            st = pool.pop() if pool else torch.empty(n, dtype=torch.uint8,
                                                     pin_memory=pinned).untyped_storage()
            self._used.append((n, pinned, st))
            return st

        def tensor(t: torch.Tensor):
            plain = type(t) in (torch.Tensor, torch.nn.Parameter)
            if (not plain or t.layout != torch.strided or t.is_quantized or t.is_conj()
                    or t.is_neg() or t.device.type == "meta" or getattr(t, "is_nested", False)):
                return copy.deepcopy(t.detach()) if t.device.type == "meta" else \
                    _wrap(t, t.detach().to("cpu", copy=True))
            src = t.untyped_storage()
            dev = src.device
            key = (str(dev), src.data_ptr(), src.nbytes())
            st = storages.get(key)
            if st is None:
                on_device = dev.type != "cpu"
                st = buffer(src.nbytes(), on_device and dev.type == "cuda")
                st.copy_(src, non_blocking=on_device)
                if on_device:
                    devices.add(dev)
                    _register_tagger()
                    with _locations_lock:
                        _locations[st.data_ptr()] = torch.serialization.location_tag(src)
                storages[key] = st
            out = torch.empty((0,), dtype=t.dtype).set_(st, t.storage_offset(), t.size(), t.stride())
            return _wrap(t, out)

        def walk(x):
            if isinstance(x, _IMMUTABLE):
                return x
            k = id(x)
            if k in memo:
                return memo[k]
            if isinstance(x, torch.Tensor):
                out = tensor(x)
            elif isinstance(x, dict):
                out = copy.copy(x)
                out.clear()
                if hasattr(x, "__dict__"):
                    out.__dict__.update(copy.deepcopy(x.__dict__))   # state_dict()._metadata
                for key, v in x.items():
                    out[key] = walk(v)
            elif type(x) is list:
                out = [walk(v) for v in x]
            elif type(x) is tuple:
                out = tuple(walk(v) for v in x)
            elif isinstance(x, tuple) and hasattr(x, "_fields"):
                out = type(x)(*(walk(v) for v in x))
            else:
                out = copy.deepcopy(x)
            memo[k] = out
            return out

        try:
            snap = walk(obj)
            for dev in devices:                   # every device-to-host copy has landed
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                else:
                    mod = getattr(torch, dev.type, None)
                    if mod is not None and hasattr(mod, "synchronize"):
                        mod.synchronize()
        except BaseException:
            self.release()
            raise
        if not self.reuse:
            used, self._used = self._used, []
            return snap, used
        return snap, None


def _wrap(t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if isinstance(t, torch.nn.Parameter):
        return torch.nn.Parameter(out, requires_grad=t.requires_grad)
    if t.requires_grad and (out.is_floating_point() or out.is_complex()):
        out.requires_grad_(True)
    return out


_savers: "weakref.WeakSet[AsyncSaver]" = weakref.WeakSet()


class AsyncSaver:
    """Background checkpoint saves, one at a time.

    :meth:`save` takes a snapshot of the object's tensors in CPU memory (pinned, with
    ``non_blocking`` copies, when they live on CUDA), returns a :class:`concurrent.futures.Future`,
    and writes the snapshot on a background thread with :func:`save`'s atomic commit.
    ``future.result()`` returns None once the checkpoint is durable and raises if the save failed.

    A save called while the previous one is still being written **waits** for it to finish before
    taking its snapshot: at most one snapshot exists, so memory stays bounded. With
    ``reuse_buffers=True`` (the default) the snapshot buffers are kept and reused by the next save
    of tensors of the same sizes (no fresh memory to fault in: the snapshot is a plain memory copy);
    :meth:`close` frees them.
    """

    def __init__(self, reuse_buffers: bool = True):
        self._stager = _Stager(reuse_buffers)
        self._reset()
        _savers.add(self)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: Future | None = None

    def save(self, obj: Any, f, *, volume: Volume | None = None, meta: str | None = None,
             **save_kwargs) -> Future:
        if isinstance(f, os.PathLike):
            f = os.fspath(f)
        target = _target(f, volume, meta)           # a bad URL fails here, not in the future
        with self._lock:
            prev = self._inflight
            if prev is not None:
                try:
                    prev.result()
                except BaseException:
                    pass                            # its own future reports it
            snap, owned = self._stager.snapshot(obj)
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, "tj-async-save")
            fut = self._executor.submit(self._write, snap, owned, target if target else f,
                                        save_kwargs)
            self._inflight = fut
            del snap
            return fut

    def _write(self, snap, owned, where, kw) -> None:
        try:
            save(snap, where, **kw)
        finally:
            del snap
            if owned is not None:
                _Stager._forget(owned)

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the save in flight, if any; raises its error."""
        fut = self._inflight
        if fut is not None:
            fut.result(timeout)

    def close(self) -> None:
        """Wait for the save in flight and free the snapshot buffers."""
        with self._lock:
            ex, self._executor = self._executor, None
            if ex is not None:
                ex.shutdown(wait=True)
            self._stager.release()


def _after_fork_in_child() -> None:
    for s in list(_savers):
        s._reset()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _finish_at_exit() -> None:
    """Finish the saves in flight when the interpreter exits. This runs before
    concurrent.futures' own exit hook (registered earlier, run later), after which no thread pool
    (the volume's uploads included) accepts work."""
    for s in list(_savers):
        fut = s._inflight
        if fut is None or fut.done():
            continue
        try:
            fut.result()
        except BaseException as e:                   # nobody is left to call result()
            import sys
            print(f"torchjuice: async checkpoint save failed: {type(e).__name__}: {e}",
                  file=sys.stderr)


if hasattr(threading, "_register_atexit"):
    threading._register_atexit(_finish_at_exit)
else:                                                # pragma: no cover - older Pythons
    import atexit
    atexit.register(_finish_at_exit)

_default_saver: AsyncSaver | None = None
_default_lock = threading.Lock()


def _default() -> AsyncSaver:
    global _default_saver
    with _default_lock:
        if _default_saver is None:
            _default_saver = AsyncSaver()
        return _default_saver


def async_save(obj: Any, f, *, volume: Volume | None = None, meta: str | None = None,
               **save_kwargs) -> Future:
    """Snapshot ``obj``'s tensors to CPU memory, return a ``Future`` at once, and write the
    snapshot in the background with :func:`save`'s atomic commit. ``future.result()`` is None
    once the checkpoint is durable and raises if the save failed. A second call while a save is
    in flight waits for that save to finish first (see :class:`AsyncSaver`)."""
    return _default().save(obj, f, volume=volume, meta=meta, **save_kwargs)


def wait_async(timeout: float | None = None) -> None:
    """Wait for the :func:`async_save` in flight, if any; raises its error."""
    if _default_saver is not None:
        _default_saver.wait(timeout)


# -- leftovers and retention -----------------------------------------------------------------------
Leftover = namedtuple("Leftover", "url path target pid local mtime size alive")
Leftover.__doc__ = """A temporary file of a save that is running or did not finish. ``target`` is
the name it was to replace; ``local`` whether it was written from this host; ``alive`` is
True/False when the writing process is (not) running on this host, None for another host."""


def _dir_target(dir_url, volume: Volume | None, meta: str | None) -> tuple[Volume, str]:
    t = _target(dir_url, volume, meta)
    if t is None:
        raise ValueError(f"not a juice:// directory: {dir_url!r} (expected juice://VOLUME/dir, a "
                         "(Volume, path) pair, or a path with volume=)")
    return t


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def find_leftovers(dir_url, *, volume: Volume | None = None, meta: str | None = None,
                   recursive: bool = False) -> list[Leftover]:
    """The temporary files (``.NAME.tj-tmp-<pid>-<hex>``, see :data:`TMP_RE`) of saves that are running or were
    interrupted, in a directory (and below it with ``recursive=True``), oldest first."""
    vol, top = _dir_target(dir_url, volume, meta)
    dirs = [top]
    if recursive:
        dirs = [d for d, _, _ in vol.walk(top)]
    host = _host_tag()
    out = []
    for d in dirs:
        for name, attr in vol.scandir(d):
            m = TMP_RE.match(name)
            if m is None or attr.is_dir:
                continue
            path = posixpath.join(d, name)
            pid, local = int(m.group("pid")), m.group("host") == host
            alive = _pid_alive(pid) if local else None
            out.append(Leftover(_url(vol, path), path, m.group("name"), pid, local, attr.mtime,
                                attr.length, alive))
    out.sort(key=lambda x: x.mtime)
    return out


def cleanup_leftovers(dir_url, *, min_age: float = 3600.0, volume: Volume | None = None,
                      meta: str | None = None, recursive: bool = False,
                      dry_run: bool = False) -> list[Leftover]:
    """Remove leftovers whose writer is known to be gone (same host, process not running), and
    those whose writer cannot be checked (written from another host) once not modified for
    ``min_age`` seconds (a save in progress commits at least every 64 MiB, which moves its mtime).
    A leftover whose writer is running on this host is never removed. Returns what was removed
    (or would be, with ``dry_run``). Their committed blocks go with them; blocks uploaded but never
    committed are reclaimed by ``torchjuice gc``."""
    vol, _ = _dir_target(dir_url, volume, meta)
    now = time.time()
    gone = []
    for lo in find_leftovers(dir_url, volume=volume, meta=meta, recursive=recursive):
        if lo.alive is False or (lo.alive is None and now - lo.mtime >= min_age):
            if not dry_run:
                try:
                    vol.remove(lo.path)
                except FileNotFoundError:
                    continue
            gone.append(lo)
    return gone


def _natural(name: str):
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]


def retain(dir_url, keep: int, pattern: str = "*", *, key: str = "mtime",
           volume: Volume | None = None, meta: str | None = None,
           dry_run: bool = False) -> list[str]:
    """Keep the newest ``keep`` checkpoints in a directory and delete the older ones.

    Checkpoints are the entries whose name matches ``pattern`` (fnmatch): files, and directories
    holding a ``.metadata`` file (``torch.distributed.checkpoint``). Hidden names (temporary files
    of saves in progress, see :func:`find_leftovers`) and directories without ``.metadata`` (a
    distributed save in progress or interrupted) are never touched. "Newest" is by modification
    time (``key="mtime"``) or by natural name order (``key="name"``: ``step-9`` before
    ``step-10``). ``keep`` must be at least 1, so the newest always stays. Returns the URLs
    deleted (or that would be, with ``dry_run``)."""
    if not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an int >= 1, not {keep!r}")
    if key not in ("mtime", "name"):
        raise ValueError(f"key must be 'mtime' or 'name', not {key!r}")
    vol, top = _dir_target(dir_url, volume, meta)
    found = []
    for name, attr in vol.scandir(top):
        if name.startswith(".") or not fnmatch.fnmatchcase(name, pattern):
            continue
        path = posixpath.join(top, name)
        mtime = attr.mtime
        if attr.is_dir:
            try:
                mtime = vol.getattr(posixpath.join(path, ".metadata")).mtime
            except (FileNotFoundError, NotADirectoryError):
                continue                          # not a complete distributed checkpoint
        elif not attr.is_file:
            continue
        found.append((mtime, name, path, attr.is_dir))
    if key == "name":
        found.sort(key=lambda x: _natural(x[1]))
    else:
        found.sort(key=lambda x: (x[0], _natural(x[1])))
    doomed = found[:-keep]
    removed = []
    for _, _, path, is_dir in doomed:
        if not dry_run:
            try:
                if is_dir:
                    vol.rmtree(path)
                else:
                    vol.remove(path)
            except FileNotFoundError:
                continue
        removed.append(_url(vol, path))
    return removed


class _MemoryFile(io.RawIOBase):
    """A read-only, seekable file over a memoryview (``readinto`` copies straight out of it)."""

    def __init__(self, view: memoryview):
        super().__init__()
        self._view = view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        out = memoryview(b).cast("B")
        n = max(0, min(len(out), len(self._view) - self._pos))
        out[:n] = self._view[self._pos:self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos


# -- torch.distributed.checkpoint ----------------------------------------------------------------
# Built on first use: importing torch.distributed.checkpoint takes most of a second, which a plain
# tj.save/tj.load (or a forked DataLoader worker) should not pay.
_DCP_NAMES = ("JuiceStorageWriter", "JuiceStorageReader")
_dcp_ns: dict | None = None
_dcp_lock = threading.Lock()
_DCP_METADATA_RE = re.compile(r"^(__\d+)?\.metadata$")
_DCP_DATA_RE = re.compile(r"^__\d+_.*\.distcp$")


def __getattr__(name: str):
    if name in _DCP_NAMES or name == "_VolumeFileSystem":
        return _dcp()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _dcp() -> dict:
    global _dcp_ns
    with _dcp_lock:
        if _dcp_ns is None:
            ns = _build_dcp()
            for name, cls in ns.items():
                cls.__qualname__ = name         # picklable by name, through __getattr__
                cls.__module__ = __name__
            _dcp_ns = ns
        return _dcp_ns


def _build_dcp() -> dict:
    import dataclasses

    from torch.distributed.checkpoint.filesystem import (FileSystemBase, FileSystemReader,
                                                         FileSystemWriter, _StoragePrefix)
    from torch.distributed.checkpoint.planner import LoadPlan

    class _VolumeFileSystem(FileSystemBase):
        """torch.distributed.checkpoint's file-system interface over a Volume: paths are
        ``juice://VOLUME/...`` URLs (or inner paths of ``volume=``); streams are volume files."""

        def __init__(self, volume: Volume | None = None, meta: str | None = None):
            self.volume = volume
            self.meta = meta

        def _resolve(self, path) -> tuple[Volume, str]:
            t = _target(os.fspath(path), self.volume, self.meta)
            if t is None:
                raise ValueError(f"not a juice:// checkpoint path: {path!r}")
            return t

        def _show(self, path) -> str:
            vol, inner = self._resolve(path)
            return _url(vol, inner)

        @contextmanager
        def create_stream(self, path, mode: str):
            vol, inner = self._resolve(path)
            if "r" in mode:
                with vol.open(inner, "rb", buffering=DCP_READ_BUFFER) as f:
                    yield f
                return
            # each file is committed atomically under its name: a reader sees it whole or not at all
            with atomic_open(vol, inner) as f:
                tap = _ErrorTap(f)
                try:
                    yield tap
                except BaseException as e:
                    tap.reraise(e)
                    raise

        def concat_path(self, path, suffix: str) -> str:
            return os.fspath(path).rstrip("/") + "/" + suffix

        def init_path(self, path, **kwargs) -> str:
            path = os.fspath(path)
            self._resolve(path)
            return path

        def rename(self, path, new_path) -> None:
            vol, a = self._resolve(path)
            vol2, b = self._resolve(new_path)
            if vol2 is not vol:
                raise OSError(errno.EXDEV, "rename across volumes", os.fspath(new_path))
            vol.rename(a, b)                 # replaces an existing target atomically

        def mkdir(self, path) -> None:
            vol, inner = self._resolve(path)
            vol.makedirs(inner, exist_ok=True)

        @classmethod
        def validate_checkpoint_id(cls, checkpoint_id) -> bool:
            return isinstance(checkpoint_id, str) and checkpoint_id.startswith("juice://")

        def exists(self, path) -> bool:
            vol, inner = self._resolve(path)
            return vol.exists(inner)

        def rm_file(self, path) -> None:
            # torch removes the old metadata file before renaming the new one over it; a volume's
            # rename replaces atomically, so keep the old one until then (no moment without one)
            if _DCP_METADATA_RE.match(posixpath.basename(os.fspath(path))):
                return
            vol, inner = self._resolve(path)
            vol.remove(inner)

        def ls(self, path) -> list[str]:
            vol, inner = self._resolve(path)
            base = os.fspath(path).rstrip("/")
            return [f"{base}/{n}" for n in vol.listdir(inner)]


    class JuiceStorageWriter(FileSystemWriter):
        """``torch.distributed.checkpoint`` writer for ``juice://`` checkpoints.

            dcp.save(state_dict, storage_writer=JuiceStorageWriter("juice://vol/ckpt/step-100"))

        Each file is written through a volume file (no ``fsync`` detour: closing a volume file is
        what makes it durable, so ``sync_files`` is not used) and committed under its name atomically;
        ``thread_count`` files per rank are written in parallel (default 2). ``volume=`` writes to an
        open :class:`Volume` (the path is then inside it); ``meta=`` picks the metadata engine.
        """

        def __init__(self, path, single_file_per_rank: bool = True, sync_files: bool = False,
                     thread_count: int = 2, per_thread_copy_ahead: int = 10_000_000,
                     cache_staged_state_dict: bool = False, overwrite: bool = True, *,
                     volume: Volume | None = None, meta: str | None = None, **kwargs):
            super().__init__(os.fspath(path), single_file_per_rank,
                             False, thread_count, per_thread_copy_ahead,
                             cache_staged_state_dict=cache_staged_state_dict, overwrite=overwrite,
                             **kwargs)
            self.fs = _VolumeFileSystem(volume, meta)
            self.path = self.fs.init_path(path)

        @classmethod
        def validate_checkpoint_id(cls, checkpoint_id) -> bool:
            return _VolumeFileSystem.validate_checkpoint_id(checkpoint_id)

        # Data files get names of their own in every save (``__RANK_TAG_N.distcp``), so saving over an
        # existing checkpoint never rewrites a file its metadata points into: until the new
        # ``.metadata`` is renamed into place the old checkpoint loads whole; after, the files only
        # the old one used are removed.
        def _tagged(self, plan, tag: str):
            prefix = plan.storage_data.prefix if isinstance(plan.storage_data, _StoragePrefix) else None
            if prefix is None:
                return plan
            return dataclasses.replace(plan, storage_data=_StoragePrefix(f"{prefix}{tag}_"))

        def prepare_local_plan(self, plan):
            plan = super().prepare_local_plan(plan)
            return self._tagged(plan, uuid.uuid4().hex[:8])        # rank-local prefix (no collectives)

        def prepare_global_plan(self, plans):
            plans = super().prepare_global_plan(plans)
            tag = uuid.uuid4().hex[:8]
            return [self._tagged(p, tag) if isinstance(p.storage_data, _StoragePrefix)
                    and re.fullmatch(r"__\d+_", p.storage_data.prefix) else p for p in plans]

        def finish(self, metadata, results) -> None:
            super().finish(metadata, results)
            if not self.use_collectives and self.rank is not None:
                return                              # each rank sees only its own files
            keep = {getattr(v, "relative_path", None) for v in (metadata.storage_data or {}).values()}
            vol, inner = self.fs._resolve(self.path)
            for name in vol.listdir(inner):
                if _DCP_DATA_RE.match(name) and name not in keep:
                    try:
                        vol.remove(posixpath.join(inner, name))
                    except FileNotFoundError:
                        pass


    class JuiceStorageReader(FileSystemReader):
        """``torch.distributed.checkpoint`` reader for ``juice://`` checkpoints.

            dcp.load(state_dict, storage_reader=JuiceStorageReader("juice://vol/ckpt/step-100"))

        Reads the files of a checkpoint on ``thread_count`` threads (default 4), each file's items
        in offset order; an item of up to 64 MiB is fetched with one read (its blocks in parallel)
        rather than torch's several small reads of the zip around it; larger ones stream."""

        def __init__(self, path, thread_count: int = 4, *, volume: Volume | None = None,
                     meta: str | None = None, **kwargs):
            super().__init__(os.fspath(path), **kwargs)
            self.fs = _VolumeFileSystem(volume, meta)
            self.path = self.fs.init_path(path)
            self.thread_count = max(1, int(thread_count))

        def read_data(self, plan: LoadPlan, planner) -> Any:
            per_file: dict[str, list] = {}
            for item in plan.items:
                per_file.setdefault(self.storage_data[item.storage_index].relative_path,
                                    []).append(item)
            plans = [LoadPlan(sorted(items, key=lambda r: self.storage_data[r.storage_index].offset))
                     for items in per_file.values()]
            base = super().read_data
            if len(plans) <= 1 or self.thread_count == 1:
                for p in plans:
                    base(p, planner).wait()
            else:
                with ThreadPoolExecutor(min(self.thread_count, len(plans)), "tj-dcp-read") as pool:
                    for fut in [pool.submit(base, p, planner) for p in plans]:
                        fut.result().wait()
            done: torch.futures.Future = torch.futures.Future()
            done.set_result(None)
            return done

        def _slice_file(self, file, sinfo):
            if sinfo.length > DCP_WHOLE_ITEM:
                return super()._slice_file(file, sinfo)
            buf = bytearray(sinfo.length)
            view = memoryview(buf)
            file.seek(sinfo.offset)
            got = 0
            while got < len(buf):
                n = file.readinto(view[got:])
                if not n:
                    raise CheckpointError(f"{getattr(file, 'name', 'a checkpoint file')} ends "
                                          f"before its item at {sinfo.offset}+{sinfo.length}")
                got += n
            return _MemoryFile(view)

        @classmethod
        def validate_checkpoint_id(cls, checkpoint_id) -> bool:
            return _VolumeFileSystem.validate_checkpoint_id(checkpoint_id)

    return {"_VolumeFileSystem": _VolumeFileSystem, "JuiceStorageWriter": JuiceStorageWriter,
            "JuiceStorageReader": JuiceStorageReader}
