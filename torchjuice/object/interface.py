"""The object-store interface: immutable blobs addressed by key.

Blocks are written once with one ``put`` and never changed, so a store needs no multipart uploads
and a cached block never goes stale. A missing key raises ``FileNotFoundError``; a store that cannot
be reached raises ``ConnectionError`` naming the endpoint.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float      # seconds since the epoch


class ObjectStore(ABC):
    """A flat namespace of immutable objects. Implementations are thread-safe and fork-safe
    (a child process rebuilds its connections on first use)."""

    url: str

    @abstractmethod
    def create(self) -> None:
        """Create the bucket/directory if missing (idempotent)."""

    @abstractmethod
    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` under ``key``; a reader sees the whole object or none of it. (A store
        that can write a list of buffers without joining them -- a local file, with ``writev``
        -- also has ``put_pieces(key, pieces)``.)"""

    @abstractmethod
    def get(self, key: str, off: int = 0, limit: int = -1) -> bytes:
        """Bytes ``[off, off+limit)`` of the object (to its end when ``limit < 0``)."""

    def get_into(self, key: str, buf: memoryview, off: int = 0) -> int:
        """Fill ``buf`` with bytes from ``off``; returns how many were read (fewer at the end).
        Stores override this to read straight into ``buf`` without an intermediate ``bytes``."""
        data = self.get(key, off, len(buf))
        buf[: len(data)] = data
        return len(data)

    def advise(self, key: str) -> bool:
        """A hint that ``key`` will be read soon. A store whose objects are files on this machine
        has the kernel start reading it into the page cache, and returns True: the reader then
        needs no copy of its own read ahead. False (the default): nothing done."""
        return False

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""

    @abstractmethod
    def head(self, key: str) -> ObjectInfo: ...

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in key order."""

    def close(self) -> None:
        """Release connections and pools."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def create_store(url: str) -> ObjectStore:
    """A store for ``file:///abs/dir``, ``s3://bucket[/prefix]?endpoint=...&region=...`` or
    ``mem://[name]`` (tests only)."""
    from ..errors import InvalidURLError

    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "file":
        from .file import FileStore
        return FileStore(url)
    if scheme == "s3":
        from .s3 import S3Store
        return S3Store(url)
    if scheme == "mem":
        from .mem import MemStore
        return MemStore(url)
    raise InvalidURLError(
        f"unknown object storage URL {url!r}: use file:///abs/dir, "
        "s3://bucket[/prefix]?endpoint=http://host:port or mem://")
