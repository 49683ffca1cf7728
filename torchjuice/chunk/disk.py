"""The local disk cache of blocks.

Blocks are immutable, so a cached block never goes stale. Each block is one file under
``DIR/<volume uuid>/raw/<object key>`` holding the block's bytes followed by a checksum trailer:
one xxh3-64 per 16 KiB segment, one over the whole block, then a footer (magic, segment count).
A whole-block read is one ``preadv`` (data and trailer) and one hash; a partial read reads and
verifies only the segments it touches, so a 4 KiB random read hashes 16 KiB and a 100 KiB file
packed in a block reads 112-128 KiB (xxh3 runs at ~10 GiB/s per core and releases the GIL; the
kernel's copy out of the page cache costs more). A corrupt block is dropped and the caller
fetches it again: a corrupt block is never returned.

Shared by several processes on one host (DataLoader workers): files appear by atomic rename, a
reader holds its own fd (an eviction by another process does not disturb it), and the space
accounting lives in a small file updated under ``flock``, so the cache never exceeds ``capacity``
even with many writers. It survives restarts: nothing but the files is needed to find a block.

Write-back blocks (committed before they are uploaded) are staged under ``staging/`` and moved into
``raw/`` once uploaded; a restarted client uploads what is left there (see ``ChunkStore``).
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import struct
import threading
import time
import uuid as _uuid
import weakref
from collections import OrderedDict
from contextlib import contextmanager

import xxhash

log = logging.getLogger("torchjuice.cache")

SEGMENT = 16 << 10
_PIECE = 256 << 10                # read this much, then hash it while it is in the CPU cache
# A run of ranges whose checked span is at most this many bytes per piece it would take (its
# files, and the parts of its first and last segments around them) is read with one pread and
# its files sliced out of it: a copy of a few KiB costs less than a syscall and a hash call more.
_ONE_READ_PER_PIECE = 12 << 10
_MAGIC = b"TJC2"                  # TJC1: 64 KiB segments (an old cache: its files are misses)
DIRECT_MIN = 1 << 20              # blocks at least this big are written with O_DIRECT
_ALIGN = 4096
_FOOTER = struct.Struct("<4sI")           # magic, number of segments
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", None)


_caches: "weakref.WeakSet[DiskCache]" = weakref.WeakSet()


def _before_fork() -> None:
    # No thread may be inside _locked() while we fork: the child would inherit the descriptor
    # that holds the flock, never close it, and keep every process out of the cache for good.
    global _held
    _held = [c._tlock for c in list(_caches)]
    for lock in _held:
        lock.acquire()


def _after_fork_in_parent() -> None:
    global _held
    for lock in _held:
        lock.release()
    _held = []


def _after_fork_in_child() -> None:
    global _held
    _held = []
    for c in list(_caches):         # a parent's thread may have held these at fork time
        c._tlock = threading.Lock()
        c._fdlock = threading.Lock()


_held: list = []
os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)


def _max_open() -> int:
    """Cache files kept open per process: a quarter of the fd limit, 64 to 4096 (a dataset of
    small files packed into 4 MiB blocks, read in random order, touches every block)."""
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 256
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(64, min(4096, soft // 4))


class CacheMiss(Exception):
    """Not in the cache, or found corrupt (and dropped)."""


def _segments(n: int) -> int:
    return (n + SEGMENT - 1) // SEGMENT


def trailer_size(bsize: int) -> int:
    return (_segments(bsize) + 1) * 8 + _FOOTER.size


def trailer(data) -> bytes:
    """Segment checksums, the whole-block checksum, the footer."""
    mv = memoryview(data)
    segs = [xxhash.xxh3_64_digest(mv[i: i + SEGMENT]) for i in range(0, len(mv), SEGMENT)]
    return b"".join(segs) + xxhash.xxh3_64_digest(mv) + _FOOTER.pack(_MAGIC, len(segs))


class _SegmentHasher:
    """The checksums of the segments that pieces fed in order cover, laid end to end from a
    segment boundary (the last segment may be short: the block's end). Each piece is hashed as
    it is fed, right after its read, while its bytes are still in the CPU's cache: hashed after
    a whole batch's reads, they come back from memory at half the speed."""

    __slots__ = ("out", "h", "filled")

    def __init__(self):
        self.out: list[bytes] = []
        self.h = None               # the segment open across pieces, and its bytes so far
        self.filled = 0

    def feed(self, p) -> None:
        v = memoryview(p)
        n, pos = len(v), 0
        if self.h is not None:
            pos = min(SEGMENT - self.filled, n)
            self.h.update(v[:pos])
            self.filled += pos
            if self.filled < SEGMENT:
                return
            self.out.append(self.h.digest())
            self.h = None
        out, digest = self.out, xxhash.xxh3_64_digest
        while n - pos >= SEGMENT:
            out.append(digest(v[pos: pos + SEGMENT]))
            pos += SEGMENT
        if pos < n:
            self.h, self.filled = xxhash.xxh3_64(v[pos:]), n - pos

    def digest(self) -> bytes:
        if self.h is not None:
            self.out.append(self.h.digest())
            self.h = None
        return b"".join(self.out)


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
        self._acct: tuple[int, int, int] | None = None    # (pid, lock fd, usage fd)
        self._fdlock = threading.Lock()
        self._fds: OrderedDict[str, list] = OrderedDict()
        self._direct: bool | None = None if hasattr(os, "O_DIRECT") else False
        self._scratch: list[mmap.mmap] = []           # aligned buffers for O_DIRECT writes
        self._scratch_lock = threading.Lock()
        self._probe: bytearray | None = None          # a page for _in_page_cache's probe
        self.max_open = _max_open()
        _caches.add(self)
        self.hits = self.misses = self.corrupt = self.evictions = self.skipped = 0
        self.direct_reads = 0                           # whole blocks read with O_DIRECT
        self.hit_bytes = 0

    # -- paths -------------------------------------------------------------------------------------
    def path(self, key: str) -> str:
        return f"{self.raw}/{key}" if os.sep == "/" else os.path.join(self.raw, key)

    def staged_path(self, key: str) -> str:
        return f"{self.staging}/{key}" if os.sep == "/" else os.path.join(self.staging, key)

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
        entry = self._acquire(key)
        try:
            self._read_verified(entry[0], entry[1], bsize, off, out)
        except CacheMiss:
            self._release(key, entry, forget=True)
            raise
        self._release(key, entry)
        self.hits += 1
        self.hit_bytes += len(out)

    def read_bytes(self, key: str, bsize: int) -> bytes:
        """The whole cached block as a new ``bytes`` object, verified: the kernel copies the
        block straight into the object ``os.pread`` returns (no buffer in between), then one
        hash. Raises CacheMiss like :meth:`read_into`. A block read whole is usually read once
        (a small file), so its fd is not kept: opened, read, closed."""
        with self._fdlock:
            entry = self._fds.get(key)
            if entry is not None:
                entry[2] += 1
        own = None                                  # an fd of our own, not in the LRU
        if entry is None:
            path = self.path(key)
            try:
                own = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                entry = self._acquire(key)          # staged, or a miss
        if own is None:
            fd, path = entry[0], entry[1]
        else:
            fd = own
        try:
            data = self._read_whole_verified(fd, path, bsize)
        except CacheMiss:
            if own is None:
                self._release(key, entry, forget=True)
            raise
        finally:
            if own is not None:
                os.close(own)
        if own is None:
            self._release(key, entry)
        self.hits += 1
        self.hit_bytes += bsize
        return data

    def read_range_bytes(self, key: str, bsize: int, off: int, n: int) -> bytes:
        """Bytes ``[off, off+n)`` of the cached block as a new ``bytes`` object, verified (see
        :meth:`read_ranges_bytes`). Raises CacheMiss like :meth:`read_into`."""
        return self.read_ranges_bytes(key, bsize, [(off, n)])[0]

    def read_ranges_bytes(self, key: str, bsize: int, ranges: list[tuple[int, int]]) -> list:
        """Bytes ``[off, off+n)`` of the cached block for each ``(off, n)`` of ``ranges``, as new
        ``bytes`` objects, verified. The kernel copies each range straight into the object
        ``os.pread`` returns. Ranges that follow one another (files packed side by side, read by
        one sequential batch) are checked as one run: the parts of its first and last checksum
        segments outside it are read once, and each segment is hashed across the pieces (the
        block's checksums are kept with the open fd); a run of files of a few KiB is read with
        one ``pread`` and sliced. Raises CacheMiss like :meth:`read_into`."""
        entry = self._acquire(key)
        fd, path = entry[0], entry[1]
        out: list = [None] * len(ranges)
        try:
            sums = entry[4]
            if sums is None:
                sums = entry[4] = self._trailer(fd, path, bsize)
            order = sorted(range(len(ranges)), key=lambda i: ranges[i][0]) \
                if len(ranges) > 1 else [0]
            k = 0
            while k < len(order):
                start = end = ranges[order[k]][0]
                run = []
                while k < len(order) and ranges[order[k]][0] == end:
                    run.append(order[k])
                    end += ranges[order[k]][1]
                    k += 1
                s0, s1 = start // SEGMENT, _segments(end)
                a, b = s0 * SEGMENT, min(s1 * SEGMENT, bsize)
                # the reads it would take piece by piece: its files, and the parts of its first
                # and last segments around it
                npieces = len(run) + (start > a) + (b > end)
                if b - a <= _ONE_READ_PER_PIECE * npieces:
                    # files of a few KiB (side by side, or one alone in a shuffled batch): one
                    # read, the segments hashed from it, each file's bytes copied out
                    span = os.pread(fd, b - a, a)
                    got = len(span)
                    mv = memoryview(span)
                    digest = b"".join([xxhash.xxh3_64_digest(mv[x: x + SEGMENT])
                                       for x in range(0, got, SEGMENT)])
                    for i in run:
                        off, n = ranges[i]
                        out[i] = span[off - a: off - a + n]
                else:
                    pieces = [(i, *ranges[i]) for i in run]
                    if start > a:
                        pieces.insert(0, (None, a, start - a))
                    if b > end:
                        pieces.append((None, end, b - end))
                    hasher, got = _SegmentHasher(), 0
                    for i, off, n in pieces:
                        data = os.pread(fd, n, off)
                        hasher.feed(data)           # right after its read (see _SegmentHasher)
                        got += len(data)
                        if i is not None:
                            out[i] = data
                    digest = hasher.digest()
                if got != b - a:
                    self._drop(path, "short read")
                if digest != sums[s0 * 8: s1 * 8]:
                    self._drop(path, f"checksum mismatch in segments {s0}-{s1 - 1}")
        except CacheMiss:
            self._release(key, entry, forget=True)
            raise
        self._release(key, entry)
        self.hits += len(ranges)
        self.hit_bytes += sum(n for _, n in ranges)
        return out

    def _read_whole_verified(self, fd: int, path: str, bsize: int) -> bytes:
        nseg = _segments(bsize)
        tail = self._trailer(fd, path, bsize)
        data = self._whole_direct(fd, path, bsize, tail)
        if data is not None:
            return data
        data = os.pread(fd, bsize, 0)
        if len(data) != bsize:
            self._drop(path, "short read")
        if xxhash.xxh3_64_digest(data) != tail[nseg * 8: nseg * 8 + 8]:
            self._drop(path, "checksum mismatch")
        return data

    # A whole block that is not in the page cache -- written with O_DIRECT by the cache filler,
    # or evicted since -- is read with O_DIRECT too: into a reused aligned buffer, then copied
    # out. Through the page cache the same read costs this VM ~4 ms of CPU per 4 MiB (new pages
    # for the kernel to fill) and leaves a copy in memory that a pass over a large data set
    # evicts again before its next epoch; with O_DIRECT it is ~0.15 ms plus one copy (disk
    # bandwidth here: ~1.5 GB/s). Whether the block is in the page cache: a RWF_NOWAIT read of
    # its first page (no I/O; EAGAIN when it would need the disk). Its last page is no guide:
    # the unaligned end of a block is written through the page cache.

    def _whole_direct(self, fd: int, path: str, bsize: int, tail: bytes, out=None):
        """A whole block read with :meth:`_read_direct` when it is big and not in the page cache;
        None when it is not read so (read it the ordinary way)."""
        if bsize < DIRECT_MIN or self._in_page_cache(fd):
            return None
        nseg = _segments(bsize)
        return self._read_direct(path, bsize, tail[nseg * 8: nseg * 8 + 8], out)

    def _in_page_cache(self, fd: int) -> bool:
        if self._direct is False or _RWF_NOWAIT is None:
            return True                       # nothing better to do than an ordinary read
        probe = self._probe
        if probe is None:
            probe = self._probe = bytearray(_ALIGN)
        try:
            return os.preadv(fd, [probe], 0, _RWF_NOWAIT) > 0
        except BlockingIOError:
            return False
        except OSError:                       # RWF_NOWAIT unsupported here
            return True

    def _read_direct(self, path: str, bsize: int, digest: bytes, out: memoryview | None = None):
        """Block ``path``'s ``bsize`` bytes read with O_DIRECT and checked against ``digest``,
        copied into ``out`` (then True is returned) or returned as ``bytes``; None where O_DIRECT
        is refused or the file is gone (read it the ordinary way). A short read or a wrong
        checksum drops the block (CacheMiss)."""
        n = -(-bsize // _ALIGN) * _ALIGN
        try:
            dfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
        except OSError as e:
            if e.errno == errno.EINVAL:
                self._direct = False           # this file system refuses O_DIRECT (tmpfs)
            return None
        buf = self._take_scratch(n)
        view = memoryview(buf)
        try:
            got = 0
            try:
                while got < bsize:
                    k = os.preadv(dfd, [view[got:n]], got)
                    if k <= 0:
                        break
                    got += k
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._direct = False           # this file system refuses O_DIRECT reads
                return None
            if got < bsize:
                self._drop(path, "short read")
            if xxhash.xxh3_64_digest(view[:bsize]) != digest:
                self._drop(path, "checksum mismatch")
            self.direct_reads += 1
            if out is None:
                return bytes(view[:bsize])
            out[:] = view[:bsize]
            return True
        finally:
            view.release()
            os.close(dfd)
            self._give_scratch(buf)

    # Open files: a small LRU of read-only fds, because opening a file deep in the cache tree
    # costs as much as hashing the block. An fd stays valid, its bytes right, when another process
    # evicts or replaces the file (blocks are immutable). An entry is [fd, path, users, retired,
    # trailer]: it is closed only once retired and unused, so an fd number is never reused under
    # a reader.

    def _acquire(self, key: str) -> list:
        with self._fdlock:
            entry = self._fds.get(key)
            if entry is not None:
                self._fds.move_to_end(key)
                entry[2] += 1
                return entry
        for path in (self.path(key), self.staged_path(key)):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                break
            except FileNotFoundError:
                continue
        else:
            self.misses += 1
            raise CacheMiss(key)
        with self._fdlock:
            entry = self._fds.get(key)
            if entry is not None:                       # another thread opened it meanwhile
                os.close(fd)
                entry[2] += 1
                return entry
            entry = self._fds[key] = [fd, path, 1, False, None]     # [4]: its trailer, once read
            while len(self._fds) > self.max_open:
                _, old = self._fds.popitem(last=False)
                old[3] = True
                if old[2] == 0:
                    os.close(old[0])
            return entry

    def _release(self, key: str, entry: list, forget: bool = False) -> None:
        with self._fdlock:
            entry[2] -= 1
            if forget and self._fds.get(key) is entry:
                del self._fds[key]
                entry[3] = True
            if entry[3] and entry[2] == 0:
                os.close(entry[0])

    def _read_verified(self, fd: int, path: str, bsize: int, off: int, out: memoryview) -> None:
        """Read and verify. Bytes are hashed right after each 256 KiB read, while they are still
        in the CPU cache: on a memory-bound machine a second pass over the block would cost
        almost as much as the copy itself."""
        nseg = _segments(bsize)
        n = len(out)
        tail = self._trailer(fd, path, bsize)
        whole = off == 0 and n == bsize
        if whole and self._whole_direct(fd, path, bsize, tail, out):
            return
        s0, s1 = off // SEGMENT, _segments(off + n)
        a, b = s0 * SEGMENT, min(s1 * SEGMENT, bsize)
        view = out if (a == off and b == off + n) else memoryview(bytearray(b - a))
        hasher = xxhash.xxh3_64() if whole else None
        pos = 0
        while pos < b - a:
            piece = view[pos: pos + _PIECE]
            if os.preadv(fd, [piece], a + pos) != len(piece):
                self._drop(path, "short read")
            if whole:
                hasher.update(piece)
            else:
                for i in range((a + pos) // SEGMENT, _segments(a + pos + len(piece))):
                    lo = i * SEGMENT - a
                    if xxhash.xxh3_64_digest(view[lo: lo + SEGMENT]) != tail[i * 8: i * 8 + 8]:
                        self._drop(path, f"checksum mismatch in segment {i}")
            pos += len(piece)
        if whole and hasher.digest() != tail[nseg * 8: nseg * 8 + 8]:
            self._drop(path, "checksum mismatch")
        if view is not out:
            out[:] = view[off - a: off - a + n]

    def _trailer(self, fd: int, path: str, bsize: int) -> bytes:
        """The block's trailer (segment checksums, whole-block checksum, footer), checked."""
        tail = os.pread(fd, trailer_size(bsize), bsize)
        self._check_footer(path, tail, _segments(bsize))
        return tail

    def _check_footer(self, path: str, tail, nseg: int) -> None:
        if len(tail) != (nseg + 1) * 8 + _FOOTER.size or \
                _FOOTER.unpack_from(tail, (nseg + 1) * 8) != (_MAGIC, nseg):
            if tail[-_FOOTER.size:][:4] == b"TJC1":
                self._drop(path, "cached by an older version", corrupt=False)
            self._drop(path, "bad trailer")

    def _drop(self, path: str, why: str, corrupt: bool = True):
        if corrupt:
            self.corrupt += 1
            log.warning("dropping corrupt cache block %s: %s", path, why)
        else:
            log.debug("dropping cache block %s: %s", path, why)
        try:
            with self._locked():
                self._unlink_counted(path, os.stat(path).st_size)
        except OSError:
            pass
        raise CacheMiss(path)

    # -- writes ------------------------------------------------------------------------------------
    def put(self, key: str, data, staged: bool = False, direct: bool = True) -> bool:
        """Store a whole block (atomically). Returns False when it was not cached: no room under
        the cap or the free-space floor, or the disk is full. Never raises for a full disk (a
        staged write-back block does raise: it is the only copy). ``direct=False``: through the
        page cache even when big (warmup: the block is read soon, from memory)."""
        total = len(data) + trailer_size(len(data))
        final = self.staged_path(key) if staged else self.path(key)
        tmp = f"{final}.{_uuid.uuid4().hex[:8]}.{total}.tmp"   # reserved size in the name
        try:
            fd = self._start(final, tmp, total, staged)
        except OSError as e:
            if staged:
                raise
            return self._skip(key, e)
        if fd is None:
            self.skipped += 1
            return False
        try:
            try:
                self._write_block(fd, data, direct)
                if staged:
                    os.fsync(fd)          # write-back data is the only copy until uploaded
            finally:
                os.close(fd)
            with self._locked():
                try:
                    replaced = os.stat(final).st_size     # another process cached it meanwhile
                except FileNotFoundError:
                    replaced = 0
                os.replace(tmp, final)
                if replaced:
                    self._write_usage(self._read_usage() - replaced)
            return True
        except OSError as e:
            with self._locked():
                self._unlink_counted(tmp, total)
            if staged:
                raise
            return self._skip(key, e)

    def _start(self, final: str, tmp: str, total: int, staged: bool) -> int | None:
        """:meth:`_begin` in ``final``'s directory, made if missing; once more after
        :meth:`_remake` if the cache directory itself was removed meanwhile."""
        remade = False
        while True:
            try:
                self._ensure_dir(os.path.dirname(final))
                return self._begin(tmp, total, evictable=not staged)
            except FileNotFoundError:
                if remade or not self._remake():
                    raise
                remade = True

    def _remake(self) -> bool:
        """The cache directory was removed under a running client (someone cleared the cache):
        make it again, empty, and account for it from scratch (the lock and usage files went
        with it). False if it is still there. Blocks this process holds open stay readable:
        their content never changes."""
        with self._tlock:
            if os.path.isdir(self.raw) and os.path.isdir(self.staging):
                return False
            for d in (self.raw, self.staging):
                os.makedirs(d, exist_ok=True)
            self._dirs.clear()
            acct, self._acct = self._acct, None
            if acct is not None and acct[0] == os.getpid():
                for fd in acct[1:]:
                    os.close(fd)
        log.warning("disk cache %s was removed while in use: made again, empty", self.dir)
        return True

    # Writing a block through the page cache costs 1-3 ms of kernel CPU per 4 MiB here (fresh
    # pages, delayed allocation), as much as downloading it. With O_DIRECT the same write costs
    # ~0.2 ms of CPU plus one copy into an aligned buffer (without the GIL): the cache fills
    # without slowing the reader it runs beside. The unaligned tail and the trailer are written
    # the ordinary way. File systems without O_DIRECT (tmpfs) get ordinary writes.

    def _write_block(self, fd: int, data, direct: bool = True) -> None:
        view = memoryview(data)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        n = len(view)
        done = 0
        aligned = n - n % _ALIGN
        if direct and aligned >= DIRECT_MIN and self._direct is not False:
            done = self._write_direct(fd, view[:aligned])
        while done < n:
            done += os.pwrite(fd, view[done:], done)
        os.pwrite(fd, trailer(view), n)

    def _take_scratch(self, n: int) -> mmap.mmap:
        """A page-aligned buffer of at least ``n`` bytes for O_DIRECT (reused: give it back)."""
        with self._scratch_lock:
            buf = self._scratch.pop() if self._scratch else None
        if buf is None or len(buf) < n:
            buf = mmap.mmap(-1, max(n, 4 << 20))
        return buf

    def _give_scratch(self, buf: mmap.mmap) -> None:
        with self._scratch_lock:
            if len(self._scratch) < 4:
                self._scratch.append(buf)

    def _write_direct(self, fd: int, view: memoryview) -> int:
        """Write ``view`` (a multiple of 4 KiB) at offset 0 with O_DIRECT; returns the bytes
        written (0 where O_DIRECT is refused: the caller writes them the ordinary way)."""
        n = len(view)
        buf = self._take_scratch(n)
        try:
            dst = ctypes.addressof(ctypes.c_char.from_buffer(buf))
            if view.readonly:
                buf[:n] = view
            else:
                ctypes.memmove(dst, ctypes.addressof(ctypes.c_char.from_buffer(view)), n)
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            try:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
            except OSError:
                self._direct = False
                return 0
            try:
                src, done = memoryview(buf), 0
                while done < n:
                    done += os.pwrite(fd, src[done:n], done)
                self._direct = True
                return done
            except OSError as e:
                if e.errno != errno.EINVAL or self._direct:
                    raise
                self._direct = False                   # this file system refuses O_DIRECT
                return 0
            finally:
                src = None
                fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        finally:
            self._give_scratch(buf)

    def _skip(self, key: str, e: OSError) -> bool:
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
        with self._locked():
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
    # Every change to the set of files (reserving a temp file, renaming it into place, deleting)
    # happens under an flock shared by all processes, and a temp file carries its reserved size in
    # its name. So a scan under the lock sees exactly the bytes in use and reserved, and the usage
    # file (a fast path that avoids scanning) never falls behind what is on disk.

    # The lock file and the usage file stay open (one descriptor each per process: an flock
    # belongs to an open file description, so a forked child opens its own). The usage is a
    # fixed-width number rewritten in place under the lock: two syscalls per update, where a
    # temp file and a rename cost a dozen and a directory change. A torn or empty usage file
    # (a crash mid-write) reads as unknown and is rebuilt by a scan.

    def _acct_fds(self) -> tuple[int, int]:
        acct = self._acct
        if acct is None or acct[0] != os.getpid():
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
            acct = self._acct = (os.getpid(), os.open(self._lock_path, flags, 0o644),
                                 os.open(self._usage_path, flags, 0o644))
        return acct[1], acct[2]

    @contextmanager
    def _locked(self):
        with self._tlock:
            fd = self._acct_fds()[0]
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _read_usage(self) -> int:
        try:
            return int(os.pread(self._acct_fds()[1], 32, 0))
        except ValueError:
            n = self._scan_usage()
            self._write_usage(n)
            return n

    def _write_usage(self, n: int) -> None:
        os.pwrite(self._acct_fds()[1], b"%-20d" % max(0, n), 0)

    def _floor_ok(self, extra: int) -> bool:
        st = os.statvfs(self.dir)
        return (st.f_bavail * st.f_frsize - extra) >= self.free_ratio * st.f_blocks * st.f_frsize

    def _begin(self, tmp: str, n: int, evictable: bool) -> int | None:
        """Reserve ``n`` bytes and create the temp file, under the lock. For an ordinary block,
        first make room under the cap and the free-space floor by evicting the least recently
        used blocks (of every process sharing the cache); None when there is no room."""
        with self._locked():
            used = self._read_usage()
            if evictable:
                if n > self.capacity:
                    return None
                if used + n > self.capacity or not self._floor_ok(n):
                    used = self._evict(target=int(self.capacity * 0.9) - n, need=n)
                    if used + n > self.capacity or not self._floor_ok(n):
                        self._write_usage(used)
                        return None
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            self._write_usage(used + n)
            return fd

    def _unlink_counted(self, path: str, size: int) -> None:
        """Delete a file and its bytes from the usage (lock held)."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        self._write_usage(self._read_usage() - size)

    def _entries(self, top: str):
        """``(path, counted size, last use)`` of every file under ``top``; stale temp files of
        killed writers (an hour old) are removed on the way."""
        now = time.time()
        for root, _dirs, files in os.walk(top):
            for f in files:
                p = os.path.join(root, f)
                try:
                    st = os.stat(p)
                except FileNotFoundError:
                    continue
                if f.endswith(".tmp"):
                    if now - st.st_mtime > 3600:
                        os.unlink(p)
                        continue
                    try:
                        size = int(f.rsplit(".", 2)[1])
                    except (IndexError, ValueError):
                        size = st.st_size
                    yield p, size, None
                else:
                    yield p, st.st_size, max(st.st_atime, st.st_mtime)

    def _scan_usage(self) -> int:
        return sum(e[1] for top in (self.raw, self.staging) for e in self._entries(top))

    def _evict(self, target: int, need: int) -> int:
        """Delete least recently used blocks until usage <= target and the floor holds (lock
        held). Returns the usage after eviction, from a fresh scan."""
        entries = list(self._entries(self.raw))
        used = sum(e[1] for e in entries) + sum(e[1] for e in self._entries(self.staging))
        for p, size, last in sorted((e for e in entries if e[2] is not None), key=lambda e: e[2]):
            if used <= max(target, 0) and self._floor_ok(need):
                break
            try:
                os.unlink(p)
                used -= size
                self.evictions += 1
            except FileNotFoundError:
                pass
        return used

    def close(self) -> None:
        """Close the cached fds (those in use close when their reader is done)."""
        with self._tlock:
            acct, self._acct = self._acct, None
            if acct is not None and acct[0] == os.getpid():
                os.close(acct[1])
                os.close(acct[2])
        with self._fdlock:
            entries, self._fds = list(self._fds.values()), OrderedDict()
            for e in entries:
                e[3] = True
                if e[2] == 0:
                    os.close(e[0])

    def usage(self) -> int:
        with self._locked():
            return self._read_usage()

    def stats(self) -> dict:
        return {"cache_hits": self.hits, "cache_misses": self.misses,
                "cache_hit_bytes": self.hit_bytes, "cache_corrupt": self.corrupt,
                "cache_evictions": self.evictions, "cache_skipped": self.skipped,
                "cache_direct_reads": self.direct_reads}

    # -- local files for memory mapping (torchjuice.models) -------------------------------------------
    def unverified(self, key: str, bsize: int) -> "BlockCheck | None":
        """The cache file holding block ``key``, NOT yet verified: a :class:`BlockCheck` (its
        ``path``, and the digests of its trailer, read with one ``pread``), or None when the block
        is not cached (or its size or trailer is wrong: dropped, the caller fetches it again).

        For a caller that maps the file and then checks the block's bytes through its own mapping
        (``check(view, offset)``) before anyone uses them: the hash faults the pages in from the
        page cache, nothing is copied. A mapping stays valid because a cache file is never
        rewritten in place: eviction and ``_drop`` unlink it, ``put`` and ``promote`` rename a new
        file over it, and a mapping keeps the old inode, bytes unchanged (its disk space is freed
        when the mapping goes). Whichever inode the caller maps, it is checked against these
        digests: another file for the same key holds the same bytes and the same trailer (blocks
        are immutable), a corrupt one fails the check."""
        for path in (self.path(key), self.staged_path(key)):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                break
            except FileNotFoundError:
                continue
        else:
            return None
        nseg = _segments(bsize)
        try:
            try:
                size = os.fstat(fd).st_size
                if size != bsize + trailer_size(bsize):
                    self._drop(path, f"size {size}, not {bsize} bytes and a trailer")
                tail = self._trailer(fd, path, bsize)
            finally:
                os.close(fd)
        except (CacheMiss, OSError):
            return None
        return BlockCheck(self, path, bsize, tail[:(nseg + 1) * 8])


class BlockCheck:
    """A cache file found by :meth:`DiskCache.unverified`: ``path``, and ``check(view, offset)``
    to verify bytes of it that the caller holds (typically through a mapping of ``path``)."""

    __slots__ = ("cache", "path", "bsize", "digests")

    def __init__(self, cache: DiskCache, path: str, bsize: int, digests: bytes):
        self.cache, self.path, self.bsize, self.digests = cache, path, bsize, digests

    def check(self, view: memoryview, offset: int = 0) -> bool:
        """Whether ``view`` -- bytes ``[offset, offset+len(view))`` of the block, as the caller
        holds them -- are the block's. Hashed in place (xxh3 releases the GIL: call it from
        several threads at once). The whole block is checked against the whole-block digest; a
        part, against the digests of every 64 KiB segment it touches (the rest of a segment at its
        edges is read from the file). False: a mismatch (the file is dropped, counted in
        ``cache_corrupt``; the caller must read the block the usual way, which fetches it again)
        or the file could not be read (not dropped)."""
        n, bsize, d = len(view), self.bsize, self.digests
        nseg = _segments(bsize)
        why = None
        if offset == 0 and n == bsize:
            if xxhash.xxh3_64_digest(view) != d[nseg * 8: nseg * 8 + 8]:
                why = "checksum mismatch"
        else:
            fd = None
            try:
                for i in range(offset // SEGMENT, _segments(offset + n)):
                    a, b = i * SEGMENT, min((i + 1) * SEGMENT, bsize)
                    if a >= offset and b <= offset + n:
                        h = xxhash.xxh3_64_digest(view[a - offset: b - offset])
                    else:                              # a segment at an edge: the rest from the file
                        if fd is None:
                            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                        hasher = xxhash.xxh3_64()
                        if a < offset:
                            pre = os.pread(fd, offset - a, a)
                            if len(pre) != offset - a:
                                raise OSError(errno.EIO, "short read")
                            hasher.update(pre)
                        hasher.update(view[max(a, offset) - offset: min(b, offset + n) - offset])
                        if b > offset + n:
                            post = os.pread(fd, b - offset - n, offset + n)
                            if len(post) != b - offset - n:
                                raise OSError(errno.EIO, "short read")
                            hasher.update(post)
                        h = hasher.digest()
                    if h != d[i * 8: i * 8 + 8]:
                        why = f"checksum mismatch in segment {i}"
                        break
            except OSError:
                return False
            finally:
                if fd is not None:
                    os.close(fd)
        return self._verdict(why, n)

    def check_file(self) -> bool:
        """:meth:`check` of the whole block as the file holds it: read in 256 KiB pieces into a
        small per-thread buffer, each hashed while it is in the CPU cache. (Hashing through a
        mapping of its own is a little faster alone, but each ``munmap`` takes the process's
        mapping lock and interrupts every CPU that runs one of its threads: a cost paid by the
        loader's other threads.)"""
        bsize, nseg = self.bsize, _segments(self.bsize)
        scratch = getattr(_scratch, "buf", None)
        if scratch is None:
            scratch = _scratch.buf = memoryview(bytearray(_PIECE))
        why = None
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            hasher, pos = xxhash.xxh3_64(), 0
            while pos < bsize:
                got = os.preadv(fd, [scratch[:min(_PIECE, bsize - pos)]], pos)
                if got <= 0:
                    why = "short read"
                    break
                hasher.update(scratch[:got])
                pos += got
        except OSError:
            return False
        finally:
            os.close(fd)
        if why is None and hasher.digest() != self.digests[nseg * 8: nseg * 8 + 8]:
            why = "checksum mismatch"
        return self._verdict(why, bsize)

    def _verdict(self, why: str | None, n: int) -> bool:
        """A failed check (``why``) drops the file (counted in ``cache_corrupt``); a passed one
        counts a hit of ``n`` bytes."""
        if why is not None:
            try:
                self.cache._drop(self.path, why)
            except CacheMiss:
                pass
            return False
        self.cache.hits += 1
        self.cache.hit_bytes += n
        return True


_scratch = threading.local()        # BlockCheck.check_file's read buffer, one per thread
