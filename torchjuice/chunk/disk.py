"""The local disk cache of blocks.

Blocks are immutable, so a cached block never goes stale. Each block is one file under
``DIR/<volume uuid>/raw/<object key>`` holding the block's bytes followed by a checksum trailer:
one xxh3-64 per 64 KiB segment, then a footer (magic, segment count). A read verifies only the
segments it touches, so a 4 KiB random read hashes 64 KiB, and a whole-block read hashes the block
(xxh3 runs at ~10 GiB/s per core and releases the GIL). A corrupt segment drops the file and the
caller fetches the block again: a corrupt block is never returned.

Shared by several processes on one host (DataLoader workers): files appear by atomic rename, a
reader holds its own fd (an eviction by another process does not disturb it), and the space
accounting lives in a small file updated under ``flock``, so the cache never exceeds ``capacity``
even with many writers. It survives restarts: nothing but the files is needed to find a block.

Write-back blocks (committed before they are uploaded) are staged under ``staging/`` and moved into
``raw/`` once uploaded; a restarted client uploads what is left there (see ``ChunkStore``).
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import threading
import time
import uuid as _uuid

import xxhash

log = logging.getLogger("torchjuice.cache")

SEGMENT = 64 << 10
_MAGIC = b"TJC1"
_FOOTER = struct.Struct("<4sI")           # magic, number of segments


class CacheMiss(Exception):
    """Not in the cache, or found corrupt (and dropped)."""


def _segments(n: int) -> int:
    return (n + SEGMENT - 1) // SEGMENT


def trailer_size(bsize: int) -> int:
    return _segments(bsize) * 8 + _FOOTER.size


def checksums(data) -> bytes:
    mv = memoryview(data)
    return b"".join(xxhash.xxh3_64_digest(mv[i: i + SEGMENT]) for i in range(0, len(mv), SEGMENT))


class DiskCache:
    def __init__(self, root: str, volume_uuid: str, capacity: int, free_ratio: float = 0.1):
        self.dir = os.path.join(os.path.abspath(os.path.expanduser(root)), volume_uuid)
        self.raw = os.path.join(self.dir, "raw")
        self.staging = os.path.join(self.dir, "staging")
        self.capacity = int(capacity)
        self.free_ratio = free_ratio
        for d in (self.raw, self.staging):
            os.makedirs(d, exist_ok=True)
        self._usage_path = os.path.join(self.dir, "usage")
        self._lock_path = os.path.join(self.dir, ".lock")
        self._dirs: set[str] = set()
        self._tlock = threading.Lock()
        self.hits = self.misses = self.corrupt = self.evictions = self.skipped = 0
        self.hit_bytes = 0

    # -- paths -------------------------------------------------------------------------------------
    def path(self, key: str) -> str:
        return os.path.join(self.raw, key)

    def staged_path(self, key: str) -> str:
        return os.path.join(self.staging, key)

    def _ensure_dir(self, d: str) -> None:
        if d not in self._dirs:
            os.makedirs(d, exist_ok=True)
            self._dirs.add(d)

    # -- reads -------------------------------------------------------------------------------------
    def contains(self, key: str) -> bool:
        return os.path.exists(self.path(key)) or os.path.exists(self.staged_path(key))

    def read_into(self, key: str, bsize: int, off: int, out: memoryview) -> None:
        """Fill ``out`` with bytes ``[off, off+len(out))`` of the cached block, verifying every
        segment it touches. Raises CacheMiss when absent or corrupt (the file is then dropped)."""
        path = self.path(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            try:
                path = self.staged_path(key)
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                self.misses += 1
                raise CacheMiss(key) from None
        try:
            self._read_verified(fd, path, bsize, off, out)
        finally:
            os.close(fd)
        self.hits += 1
        self.hit_bytes += len(out)

    def _read_verified(self, fd: int, path: str, bsize: int, off: int, out: memoryview) -> None:
        nseg = _segments(bsize)
        tail = os.pread(fd, nseg * 8 + _FOOTER.size, bsize)
        if len(tail) != nseg * 8 + _FOOTER.size or _FOOTER.unpack_from(tail, nseg * 8) != (_MAGIC, nseg):
            self._drop(path, "bad trailer")
        n = len(out)
        s0, s1 = off // SEGMENT, _segments(off + n)
        a, b = s0 * SEGMENT, min(s1 * SEGMENT, bsize)
        if a == off and b == off + n:                       # aligned: straight into the caller
            view = out
            if os.preadv(fd, [view], a) != n:
                self._drop(path, "short read")
        else:
            view = memoryview(bytearray(b - a))
            if os.preadv(fd, [view], a) != b - a:
                self._drop(path, "short read")
        for i in range(s0, s1):
            lo = i * SEGMENT - a
            if xxhash.xxh3_64_digest(view[lo: lo + SEGMENT]) != tail[i * 8: i * 8 + 8]:
                self._drop(path, f"checksum mismatch in segment {i}")
        if view is not out:
            out[:] = view[off - a: off - a + n]

    def _drop(self, path: str, why: str):
        self.corrupt += 1
        log.warning("dropping corrupt cache block %s: %s", path, why)
        try:
            size = os.stat(path).st_size
            os.unlink(path)
            self._account(-size)
        except OSError:
            pass
        raise CacheMiss(path)

    # -- writes ------------------------------------------------------------------------------------
    def put(self, key: str, data, staged: bool = False) -> bool:
        """Store a whole block (atomically). Returns False when it was not cached: no room under
        the cap or the free-space floor, or the disk is full. Never raises for a full disk."""
        total = len(data) + trailer_size(len(data))
        final = self.staged_path(key) if staged else self.path(key)
        if not staged and not self._reserve(total):
            self.skipped += 1
            return False
        if staged:
            self._account(total)
        tmp = f"{final}.{_uuid.uuid4().hex[:8]}.tmp"
        try:
            self._ensure_dir(os.path.dirname(final))
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                trailer = checksums(data) + _FOOTER.pack(_MAGIC, _segments(len(data)))
                view, done = memoryview(data), 0
                while done < len(view):
                    done += os.write(fd, view[done:])
                os.write(fd, trailer)
                if staged:
                    os.fsync(fd)          # write-back data is the only copy until uploaded
            finally:
                os.close(fd)
            os.replace(tmp, final)
            return True
        except OSError as e:
            self._account(-total)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if staged:
                raise
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                log.warning("disk cache %s is full: not caching (%s)", self.dir, e)
            else:
                log.warning("could not cache block %s: %s", key, e)
            self.skipped += 1
            return False

    def promote(self, key: str) -> None:
        """A staged (write-back) block was uploaded: move it to the ordinary cache."""
        final = self.path(key)
        self._ensure_dir(os.path.dirname(final))
        try:
            os.replace(self.staged_path(key), final)
        except FileNotFoundError:
            pass

    def staged_keys(self) -> list[str]:
        out = []
        for root, _dirs, files in os.walk(self.staging):
            for f in files:
                if not f.endswith(".tmp"):
                    out.append(os.path.relpath(os.path.join(root, f), self.staging))
        return sorted(out)

    def read_staged(self, key: str, bsize: int) -> bytes:
        out = memoryview(bytearray(bsize))
        path = self.staged_path(key)
        fd = os.open(path, os.O_RDONLY)
        try:
            self._read_verified(fd, path, bsize, 0, out)
        finally:
            os.close(fd)
        return out.obj

    # -- space -------------------------------------------------------------------------------------
    def _locked(self):
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def _unlock(self, fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def _read_usage(self) -> int | None:
        try:
            with open(self._usage_path) as f:
                return int(f.read() or 0)
        except (FileNotFoundError, ValueError):
            return None

    def _write_usage(self, n: int) -> None:
        tmp = f"{self._usage_path}.{os.getpid()}.{threading.get_ident()}"
        with open(tmp, "w") as f:
            f.write(str(max(0, n)))
        os.replace(tmp, self._usage_path)

    def _account(self, delta: int) -> None:
        with self._tlock:
            fd = self._locked()
            try:
                used = self._read_usage()
                self._write_usage((self._scan_usage() if used is None else used) + delta)
            finally:
                self._unlock(fd)

    def _floor_ok(self, extra: int) -> bool:
        st = os.statvfs(self.dir)
        return (st.f_bavail * st.f_frsize - extra) >= self.free_ratio * st.f_blocks * st.f_frsize

    def _reserve(self, n: int) -> bool:
        """Make room for ``n`` bytes under the cap and the free-space floor, evicting the least
        recently used blocks (across every process sharing the cache); then count them."""
        if n > self.capacity:
            return False
        with self._tlock:
            fd = self._locked()
            try:
                used = self._read_usage()
                if used is None:
                    used = self._scan_usage()
                if used + n > self.capacity or not self._floor_ok(n):
                    used = self._evict(target=int(self.capacity * 0.9) - n, need=n)
                    if used + n > self.capacity or not self._floor_ok(n):
                        self._write_usage(used)
                        return False
                self._write_usage(used + n)
                return True
            finally:
                self._unlock(fd)

    def _files(self):
        for root, _dirs, files in os.walk(self.raw):
            for f in files:
                p = os.path.join(root, f)
                try:
                    st = os.stat(p)
                except FileNotFoundError:
                    continue
                yield p, st

    def _scan_usage(self) -> int:
        used = sum(st.st_size for _, st in self._files())
        for root, _dirs, files in os.walk(self.staging):
            for f in files:
                try:
                    used += os.stat(os.path.join(root, f)).st_size
                except FileNotFoundError:
                    pass
        return used

    def _evict(self, target: int, need: int) -> int:
        """Delete least recently used blocks until usage <= target (and the floor holds).
        Called with the lock held; returns the usage after eviction (from a fresh scan)."""
        entries = sorted(self._files(), key=lambda e: max(e[1].st_atime, e[1].st_mtime))
        used = self._scan_usage()
        for p, st in entries:
            if used <= max(target, 0) and self._floor_ok(need):
                break
            try:
                os.unlink(p)
                used -= st.st_size
                self.evictions += 1
            except FileNotFoundError:
                pass
        return used

    def usage(self) -> int:
        used = self._read_usage()
        return self._scan_usage() if used is None else used

    def stats(self) -> dict:
        return {"cache_hits": self.hits, "cache_misses": self.misses,
                "cache_hit_bytes": self.hit_bytes, "cache_corrupt": self.corrupt,
                "cache_evictions": self.evictions, "cache_skipped": self.skipped}
