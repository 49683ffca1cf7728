"""``mem://[name]``: objects in a dict, for tests.

Stores with the same name in one process share their content (a module-level registry), so two
volumes connected to ``mem://x`` see the same objects. A forked child gets a copy of the parent's
objects as they were at the fork; a spawned process starts empty.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Iterator

from ._url import check_key, check_range, not_found, split_url
from .interface import ObjectInfo, ObjectStore

__all__ = ["MemStore", "clear_mem_stores"]


class _Bucket:
    __slots__ = ("lock", "objects")

    def __init__(self):
        self.lock = threading.Lock()
        self.objects: dict[str, tuple[bytes, float]] = {}


_registry: dict[str, _Bucket] = {}
_registry_lock = threading.Lock()


def _bucket(name: str) -> _Bucket:
    with _registry_lock:
        b = _registry.get(name)
        if b is None:
            b = _registry[name] = _Bucket()
        return b


def clear_mem_stores() -> None:
    """Forget every ``mem://`` store of this process (tests)."""
    with _registry_lock:
        _registry.clear()


def _after_fork_in_child() -> None:
    # a lock held by another thread at fork time would never be released in the child
    global _registry_lock
    _registry_lock = threading.Lock()
    for b in _registry.values():
        b.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class MemStore(ObjectStore):
    def __init__(self, url: str = "mem://"):
        netloc, path, _query = split_url(url, "mem")
        self.url = url
        self.name = (netloc + path).rstrip("/")
        self._b = _bucket(self.name)

    def create(self) -> None:
        pass

    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        check_key(key)
        blob = bytes(data)
        b = self._b
        with b.lock:
            b.objects[key] = (blob, time.time())

    def _blob(self, key: str) -> bytes:
        check_key(key)
        b = self._b
        with b.lock:
            item = b.objects.get(key)
        if item is None:
            raise not_found(key)
        return item[0]

    def get(self, key: str, off: int = 0, limit: int = -1) -> bytes:
        check_range(off, limit)
        blob = self._blob(key)
        if off == 0 and (limit < 0 or limit >= len(blob)):
            return blob
        end = len(blob) if limit < 0 else off + limit
        return blob[off:end]

    def get_into(self, key: str, buf: memoryview, off: int = 0) -> int:
        check_range(off, 0)
        blob = self._blob(key)
        view = memoryview(buf)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        n = max(0, min(len(view), len(blob) - off))
        if n:
            view[:n] = memoryview(blob)[off:off + n]
        return n

    def delete(self, key: str) -> None:
        check_key(key)
        b = self._b
        with b.lock:
            b.objects.pop(key, None)

    def head(self, key: str) -> ObjectInfo:
        check_key(key)
        b = self._b
        with b.lock:
            item = b.objects.get(key)
        if item is None:
            raise not_found(key)
        return ObjectInfo(key, len(item[0]), item[1])

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        b = self._b
        with b.lock:
            items = [(k, len(v), t) for k, (v, t) in b.objects.items() if k.startswith(prefix)]
        items.sort()
        return (ObjectInfo(k, n, t) for k, n, t in items)

    def __reduce__(self):
        return (type(self), (self.url,))
