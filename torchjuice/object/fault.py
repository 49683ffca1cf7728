"""A store wrapper for tests that fails, delays, throttles or corrupts, on purpose.

    store = FaultyStore(MemStore("mem://x"), fail_rate=0.1, seed=1)
    store.fail_next(2)            # the next two calls (of any operation) raise OSError(EIO)
    store.fail_next(1, op="put")  # the next put raises
    store.fail_always()           # every call raises until fail_always(False)
    store.calls["get"], store.faults["fail"]   # counters

Random faults (``fail_rate``, ``throttle_rate``, ``conn_rate``, ``delay``) apply to the operations
in ``fail_ops``; ``corrupt_rate`` flips one byte of what ``get``/``get_into`` return. ``get_into``
counts as a ``get``. With a ``seed`` the sequence of decisions is reproducible (for one thread).
"""
from __future__ import annotations

import errno
import os
import random
import threading
import time
import weakref
from collections import Counter
from typing import Iterable, Iterator

from .interface import ObjectInfo, ObjectStore

__all__ = ["FaultyStore", "InjectedFault", "InjectedThrottle", "InjectedConnectionError", "OPS"]

OPS = ("create", "put", "get", "delete", "head", "list")


_stores: "weakref.WeakSet[FaultyStore]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for s in list(_stores):
        s._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class InjectedFault(OSError):
    """An injected I/O error (errno EIO)."""


class InjectedThrottle(OSError):
    """An injected throttling reply (errno EAGAIN), like S3's 503 SlowDown."""


class InjectedConnectionError(ConnectionError):
    """An injected unreachable endpoint / dropped connection."""


class FaultyStore(ObjectStore):
    def __init__(self, inner: ObjectStore, fail_rate: float = 0.0, delay: float = 0.0,
                 corrupt_rate: float = 0.0, throttle_rate: float = 0.0, seed: int | None = None,
                 fail_ops: Iterable[str] = ("put", "get"), conn_rate: float = 0.0):
        self.inner = inner
        self.url = inner.url
        self.fail_rate = fail_rate
        self.delay = delay
        self.corrupt_rate = corrupt_rate
        self.throttle_rate = throttle_rate
        self.conn_rate = conn_rate
        self.fail_ops = frozenset(fail_ops)
        unknown = self.fail_ops - set(OPS)
        if unknown:
            raise ValueError(f"unknown operation(s) {sorted(unknown)}; known: {OPS}")
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._next: list[list] = []          # [[remaining, op or None, exception or None], ...]
        self._always: frozenset[str] | None = None
        self.calls: Counter[str] = Counter()   # calls per operation
        self.faults: Counter[str] = Counter()  # injected: fail, throttle, connection, corrupt, delay
        _stores.add(self)

    # ---- control ----
    def fail_next(self, n: int = 1, op: str | None = None, exc: BaseException | type | None = None) -> None:
        """Make the next ``n`` calls of ``op`` (any operation when None) raise ``exc`` (OSError EIO)."""
        if op is not None and op not in OPS:
            raise ValueError(f"unknown operation {op!r}; known: {OPS}")
        with self._lock:
            self._next.append([n, op, exc])

    def fail_always(self, flag: bool = True, ops: Iterable[str] | None = None) -> None:
        """Make every call (of ``ops``, or of any operation) raise OSError(EIO) until turned off."""
        with self._lock:
            self._always = (frozenset(ops) if ops is not None else frozenset(OPS)) if flag else None

    def reset(self) -> None:
        """Clear pending deterministic failures and the counters."""
        with self._lock:
            self._next.clear()
            self._always = None
            self.calls.clear()
            self.faults.clear()

    # ---- injection ----
    def _before(self, op: str, key: str | None) -> None:
        with self._lock:
            self.calls[op] += 1
            err: BaseException | None = None
            for item in self._next:
                if item[1] is None or item[1] == op:
                    item[0] -= 1
                    exc = item[2]
                    if item[0] <= 0:
                        self._next.remove(item)
                    err = _make(exc, op, key)
                    self.faults["fail"] += 1
                    break
            if err is None and self._always is not None and op in self._always:
                self.faults["fail"] += 1
                err = InjectedFault(errno.EIO, f"injected failure of {op}", key)
            delay = 0.0
            if err is None and op in self.fail_ops:
                if self.delay > 0:
                    delay = self.delay
                    self.faults["delay"] += 1
                r = self._rng.random()
                if r < self.fail_rate:
                    self.faults["fail"] += 1
                    err = InjectedFault(errno.EIO, f"injected failure of {op}", key)
                elif r < self.fail_rate + self.throttle_rate:
                    self.faults["throttle"] += 1
                    err = InjectedThrottle(errno.EAGAIN, f"injected throttling (SlowDown) of {op}", key)
                elif r < self.fail_rate + self.throttle_rate + self.conn_rate:
                    self.faults["connection"] += 1
                    err = InjectedConnectionError(errno.ECONNRESET,
                                                  f"injected connection failure of {op} at {self.url}")
        if delay:
            time.sleep(delay)
        if err is not None:
            raise err

    def _corrupt_pos(self, n: int) -> int:
        """Where to flip a byte of an ``n``-byte read, or -1 to leave it alone."""
        if n <= 0 or self.corrupt_rate <= 0:
            return -1
        with self._lock:
            if self._rng.random() >= self.corrupt_rate:
                return -1
            self.faults["corrupt"] += 1
            return self._rng.randrange(n)

    # ---- interface ----
    def create(self) -> None:
        self._before("create", None)
        self.inner.create()

    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        self._before("put", key)
        self.inner.put(key, data)

    def get(self, key: str, off: int = 0, limit: int = -1) -> bytes:
        self._before("get", key)
        data = self.inner.get(key, off, limit)
        pos = self._corrupt_pos(len(data))
        if pos >= 0:
            b = bytearray(data)
            b[pos] ^= 0xFF
            data = bytes(b)
        return data

    def get_into(self, key: str, buf: memoryview, off: int = 0) -> int:
        self._before("get", key)
        n = self.inner.get_into(key, buf, off)
        pos = self._corrupt_pos(n)
        if pos >= 0:
            view = memoryview(buf).cast("B")
            view[pos] ^= 0xFF
        return n

    def delete(self, key: str) -> None:
        self._before("delete", key)
        self.inner.delete(key)

    def head(self, key: str) -> ObjectInfo:
        self._before("head", key)
        return self.inner.head(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self._before("list", prefix)
        return self.inner.list(prefix)

    def close(self) -> None:
        self.inner.close()

    def __repr__(self) -> str:
        return f"FaultyStore({self.inner!r})"

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_lock")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
        _stores.add(self)


def _make(exc: BaseException | type | None, op: str, key: str | None) -> BaseException:
    if exc is None:
        return InjectedFault(errno.EIO, f"injected failure of {op}", key)
    if isinstance(exc, type):
        try:
            return exc(errno.EIO, f"injected failure of {op}")
        except TypeError:
            return exc()
    return exc
