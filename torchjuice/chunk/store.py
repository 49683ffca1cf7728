"""The block layer: slices cut into immutable blocks in the object store, with caches.

A slice of ``size`` bytes is stored as blocks ``0..n-1`` of at most ``block_size`` bytes each, under
``NAME/chunks/{id//1_000_000}/{id//1000}/{id}_{index}_{bsize}`` (the JuiceFS layout).

Writes: uploads run on a thread pool with a bound on the bytes in flight (writers block when it is
reached: back-pressure). In write-back mode a block is made durable in the local disk cache and
the upload happens in the background (the slice is committed at once); a restarted client uploads
what a killed one left staged.

Reads, fastest first: the memory buffer (blocks prefetched by readahead), a download already in
flight for the same block (single-flight: one GET however many readers want it), the local disk
cache (checksummed), then the object store — straight into the caller's buffer where possible.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import queue
import random
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from .._pages import page_in
from ..errors import CorruptBlockError
from ..object import ObjectStore
from .compress import new_compressor
from .disk import CacheMiss, DiskCache

log = logging.getLogger("torchjuice.chunk")

PARALLEL_READ_MIN = 1 << 20      # below this a read runs inline: thread hand-off costs more

# Transient object-store errors (a dropped connection, a throttle, EIO) are retried this many
# times with jittered exponential backoff (about 0.05 + 0.1 + 0.2 + 0.4 s), then raised. Errors that
# cannot get better are raised at once. A store that retries on its own (S3Store: max_attempts)
# is not retried again here.
STORE_RETRIES = 4
_NO_RETRY = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
             CorruptBlockError, ValueError)
_NO_RETRY_ERRNO = frozenset({errno.ENOSPC, errno.EROFS, errno.EINVAL, errno.ENAMETOOLONG})


# The cache filler's nice value: 19 starved it on a busy machine (a DataLoader's second epoch then
# found most blocks uncached), 0 took CPU from cold readers; 10 measured best for both here.
FILL_NICE = 10
# Filler threads. Measured here (2 cores, the S3 server on the same machine): with one, a
# DataLoader reading tar shards skips a fifth of the blocks (its second epoch is partly cold:
# 0.77x a local directory, the third 1.30x); with two, none (second epoch 1.09x), but a single
# cold reader drops from ~0.95x to ~0.80-0.85x of raw GETs. One it is; on a machine whose CPU is
# not shared with the S3 server, two would cost the reader little.
FILL_THREADS = 1
FILL_WAIT_MAX = 5.0             # cache_fill="wait": how long a read waits for the filler at most
COPY_NOGIL_MIN = 256 << 10      # copies at least this big run with the GIL released
MAPS_KEPT = 8                   # block files kept mapped by map_block


def nbytes(data) -> int:
    """The size of a block given as one buffer or as a list of pieces (see ``put_block``)."""
    return sum(len(p) for p in data) if isinstance(data, list) else len(data)


def join_into(buf, pieces: list) -> int:
    """Copy ``pieces`` into ``buf`` one after the other; returns the bytes copied."""
    view, pos = memoryview(buf), 0
    for p in pieces:
        view[pos:pos + len(p)] = p
        pos += len(p)
    return pos


def copy_into(out: memoryview, src, off: int = 0) -> None:
    """``out[:] = src[off:off+len(out)]``. A big copy goes through ``ctypes.memmove``, which runs
    without the GIL, so the download threads keep receiving while a reader copies a block out of
    the memory buffer (a slice assignment would hold the GIL for the whole copy). Read-only
    sources fall back to the slice assignment."""
    n = len(out)
    if n >= COPY_NOGIL_MIN and not out.readonly:
        try:
            src_mv = memoryview(src)
            if not src_mv.readonly and src_mv.contiguous and out.contiguous:
                ctypes.memmove(ctypes.addressof(ctypes.c_char.from_buffer(out)),
                               ctypes.addressof(ctypes.c_char.from_buffer(src_mv)) + off, n)
                return
        except (TypeError, ValueError):
            pass
    out[:] = memoryview(src)[off: off + n]


def _map_file(path: str, n: int, exact: bool) -> memoryview | None:
    """The first ``n`` bytes of ``path``, mapped read-only; None if it cannot be opened or is
    shorter (``exact``: not exactly ``n`` bytes long)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except (OSError, ValueError):
        return None
    try:
        size = os.fstat(fd).st_size
        if size < n or (exact and size != n):
            return None
        return memoryview(mmap.mmap(fd, n, access=mmap.ACCESS_READ))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


class Metrics:
    """Counters of this client's block traffic (``Volume.metrics()``, ``torchjuice stats``)."""

    __slots__ = ("get_count", "get_bytes", "get_seconds", "put_count", "put_bytes", "put_seconds",
                 "delete_count", "buffer_hits", "buffer_hit_bytes", "prefetch_count",
                 "singleflight_waits", "store_read_bytes", "store_retries", "fill_helped")

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}


class ChunkStore:
    def __init__(self, store: ObjectStore, name: str, block_size: int, compression: str | None = None,
                 upload_threads: int = 16, download_threads: int = 16,
                 max_inflight: int = 256 << 20, cache: DiskCache | None = None,
                 buffer_size: int = 256 << 20, cache_writes: bool = True, writeback: bool = False,
                 cache_fill_buffer: int = 64 << 20):
        self.store = store
        self.prefix = f"{name}/chunks/"
        self.block_size = block_size
        self.compressor = new_compressor(compression)
        self.upload_threads = upload_threads
        self.download_threads = download_threads
        self.max_inflight = max(max_inflight, block_size)
        self.cache = cache
        self.buffer_size = buffer_size
        self.cache_writes = cache_writes and cache is not None
        self.writeback = writeback
        self.cache_fill_buffer = cache_fill_buffer
        self.cache_fill_direct = cache_fill_buffer // 4
        # what a read does when the filler is `cache_fill_buffer` behind: "skip" (the block is not
        # cached this time; a single pass is not slowed) or "wait"/"adaptive"/"direct" (for
        # room, at most FILL_WAIT_MAX seconds: a pass that will be read again -- a DataLoader's
        # epochs -- runs at the speed the cache fills and leaves it whole); how blocks are
        # written: "wait" through the page cache, "direct" with O_DIRECT, "skip" and "adaptive"
        # through the page cache while the filler keeps up and with O_DIRECT once it is
        # `cache_fill_direct` behind (see Volume.cache_fill)
        self.cache_fill = "skip"
        if writeback and cache is None:
            raise ValueError("write-back needs a disk cache (cache_dir)")
        self.metrics = Metrics()
        self.retries = 0 if hasattr(store, "max_attempts") else STORE_RETRIES
        self._reset()
        os.register_at_fork(after_in_child=self._reset)
        if writeback:
            self._resume_staged()

    def _reset(self) -> None:
        """Fresh pools and locks (also in a forked child: a parent's threads do not exist there)."""
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._inflight = 0
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._buffer: OrderedDict[str, bytearray] = OrderedDict()   # whole blocks, LRU
        self._buffered = 0
        self._pins: dict[int, int] = {}          # id(block buffer) -> users
        self._retired: set[int] = set()          # out of the LRU, freed when the last pin goes
        self._free: list[bytearray] = []         # block buffers to reuse
        self._fetching: dict[str, Future] = {}
        self._maps: OrderedDict[str, memoryview] = OrderedDict()    # map_block's, LRU
        self._staged_pending: set[Future] = set()
        self._stop = threading.Event()
        self._fill: queue.Queue | None = None       # blocks waiting to be written to the cache
        self._fill_bytes = 0
        self._fill_keys: dict[str, int] = {}       # blocks queued for the cache -> how many times
        self._fill_room = threading.Condition(self._lock)   # a filler wrote a block

    def _pool(self, kind: str) -> ThreadPoolExecutor:
        with self._lock:
            pool = self._pools.get(kind)
            if pool is None:
                n = self.upload_threads if kind in ("up", "writeback") else self.download_threads
                pool = self._pools[kind] = ThreadPoolExecutor(n, f"tj-{kind}")
            return pool

    # -- layout ------------------------------------------------------------------------------------
    def key(self, sid: int, index: int, bsize: int) -> str:
        return f"{self.prefix}{sid // 1_000_000}/{sid // 1000}/{sid}_{index}_{bsize}"

    def blocks(self, sid: int, size: int) -> list[tuple[str, int]]:
        """``(key, bsize)`` of every block of a slice of ``size`` bytes."""
        bs = self.block_size
        return [(self.key(sid, i, min(bs, size - i * bs)), min(bs, size - i * bs))
                for i in range((size + bs - 1) // bs)]

    # -- writes ------------------------------------------------------------------------------------
    def put_block(self, sid: int, index: int, data: bytes | bytearray | memoryview,
                  owner: bytearray | None = None) -> Future:
        """Upload one block in the background; blocks the caller while too many bytes are in flight.
        ``data`` must not change until the future is done. ``owner``: a buffer from
        :meth:`alloc_block` behind ``data``, reused once the upload (and any cache write) is done.
        In write-back mode the block is staged durably on local disk first and the returned future
        is already done. ``data`` may also be a list of immutable buffers (``bytes`` or views of
        them) that make the block in order: the pieces are written as they are where the store
        can (a ``file://`` store's ``writev``), else joined (on the upload thread) into a reused
        block buffer."""
        n = nbytes(data)
        if isinstance(data, list) and self.writeback:
            data, owner = self._joined(data, n)
        if self.writeback:
            key = self.key(sid, index, n)
            self.cache.put(key, data, staged=True)
            if owner is not None:
                self._recycle(owner)
            self._upload_staged(key, n)
            done: Future = Future()
            done.set_result(None)
            return done
        with self._room:
            while self._inflight > 0 and self._inflight + n > self.max_inflight:
                self._room.wait()
            self._inflight += n
        try:
            return self._pool("up").submit(self._upload, sid, index, data, owner)
        except BaseException:
            self._release(n)
            raise

    def _release(self, n: int) -> None:
        with self._room:
            self._inflight -= n
            self._room.notify_all()

    def _retry(self, fn, *args):
        """``fn(*args)``, retried on transient store errors (see STORE_RETRIES)."""
        attempt = 0
        while True:
            try:
                return fn(*args)
            except _NO_RETRY:
                raise
            except OSError as e:            # ConnectionError and TimeoutError are OSErrors
                if attempt >= self.retries or e.errno in _NO_RETRY_ERRNO or self._stop.is_set():
                    raise
                attempt += 1
                self.metrics.store_retries += 1
                delay = 0.05 * (2 ** (attempt - 1)) * (0.5 + random.random())
                log.debug("%s failed (%s); retry %d in %.2fs", getattr(fn, "__name__", fn), e,
                          attempt, delay)
                time.sleep(delay)

    def _put(self, key: str, data, pieces: bool = False) -> None:
        """Compress and upload a block; ``pieces``: ``data`` is a list of buffers, stored as
        they are (no compression)."""
        t = time.perf_counter()
        if pieces:
            body = data
            self._retry(self.store.put_pieces, key, data)
        else:
            body = self.compressor.compress(data)
            self._retry(self.store.put, key, body)
        m = self.metrics
        m.put_seconds += time.perf_counter() - t
        m.put_count += 1
        m.put_bytes += nbytes(body)

    def _upload(self, sid: int, index: int, data, owner) -> None:
        n = nbytes(data)
        try:
            key = self.key(sid, index, n)
            if isinstance(data, list):
                if self.compressor.name == "none" and not self.cache_writes and \
                        hasattr(self.store, "put_pieces"):
                    self._put(key, data, pieces=True)
                    return
                data, owner = self._joined(data, n)
            self._put(key, data)
            if self.cache_writes:
                self._cache_later(key, data, owner, may_wait=False)   # "wait" is for reads
        finally:
            self._release(n)
            if owner is not None:
                with self._lock:
                    self._retire(owner)         # reused once the cache filler is done with it

    def _joined(self, pieces: list, n: int) -> tuple[memoryview, bytearray]:
        """``pieces`` (``n`` bytes) copied into one buffer (reused: see :meth:`alloc_block`);
        ``(view of the bytes, buffer)``."""
        buf = self._alloc(n)
        join_into(buf, pieces)
        return memoryview(buf)[:n], buf

    def _upload_staged(self, key: str, bsize: int) -> None:
        fut = self._pool("writeback").submit(self._upload_staged_now, key, bsize)
        with self._lock:
            self._staged_pending.add(fut)
        fut.add_done_callback(lambda f: self._staged_pending.discard(f))

    def _upload_staged_now(self, key: str, bsize: int) -> None:
        """Upload a staged block, retrying with backoff until it lands (the data is safe on disk)."""
        delay = 0.2
        while True:
            try:
                self._put(key, self.cache.read_staged(key, bsize))
                self.cache.promote(key)
                return
            except FileNotFoundError:
                return                                  # uploaded by another process meanwhile
            except CacheMiss:
                log.error("staged block %s is corrupt on local disk; it cannot be uploaded", key)
                return
            except Exception as e:
                log.warning("write-back upload of %s failed (%s); retrying in %.1fs", key, e, delay)
                if self._stop.wait(delay):
                    return              # closing: the staged block is uploaded by the next client
                delay = min(delay * 2, 30)

    def _resume_staged(self) -> None:
        """Upload blocks a previous (killed) client staged but did not upload."""
        for key in self.cache.staged_keys():
            try:
                bsize = int(key.rsplit("_", 1)[1])
            except (IndexError, ValueError):
                continue
            self._upload_staged(key, bsize)

    def wait_writeback(self, timeout: float | None = None) -> bool:
        """Wait for background write-back uploads; True when none is left."""
        deadline = None if timeout is None else time.time() + timeout
        while True:
            with self._lock:
                pending = list(self._staged_pending)
            if not pending:
                return True
            for f in pending:
                left = None if deadline is None else max(0.0, deadline - time.time())
                try:
                    f.result(left)
                except Exception:
                    return False

    # -- reads -------------------------------------------------------------------------------------
    def _in_memory(self, key: str) -> bool:
        """The block is in the memory buffer, or being fetched into it."""
        with self._lock:
            return key in self._buffer or key in self._fetching

    def read_block(self, key: str, bsize: int, off: int, out: memoryview) -> None:
        """Fill ``out`` with bytes ``[off, off+len(out))`` of one block."""
        n = len(out)
        if not self._in_memory(key):
            if self.cache is not None:
                try:
                    self.cache.read_into(key, bsize, off, out)
                    return
                except CacheMiss:
                    pass
            if self.compressor.name == "none" and (n == bsize or self.cache is None):
                self._get_into(key, bsize, off, out)             # straight into the caller
                if n == bsize and self.cache is not None:
                    copy = self._alloc(bsize)                   # the caller may reuse `out`
                    copy_into(memoryview(copy), out)
                    self._cache_later(key, copy, copy)
                    with self._lock:
                        self._retire(copy)          # reused once the cache filler is done with it
                return
        data = self._pinned(key, bsize)
        try:
            copy_into(out, data, off)
        finally:
            self._unpin(key, data, consumed=off + n >= bsize)
        self.metrics.buffer_hits += 1
        self.metrics.buffer_hit_bytes += n

    def read_block_bytes(self, key: str, bsize: int) -> bytes:
        """A whole block as a new ``bytes`` object, moved once: the disk cache's ``pread`` or
        the store's response body become the result itself (and, blocks being immutable, the
        same object is queued for the disk cache without a copy). Only a block held in the
        memory buffer (or being fetched into it) is copied out of it."""
        if self._in_memory(key):
            return self.fetch(key, bsize)
        if self.cache is not None:
            try:
                return self.cache.read_bytes(key, bsize)
            except CacheMiss:
                pass
        data = self._get_whole(key, bsize)
        if type(data) is not bytes:
            data = bytes(data)
        if self.cache is not None:
            self._cache_later(key, data)
        return data

    def read_range_bytes(self, key: str, bsize: int, off: int, n: int) -> bytes:
        """Bytes ``[off, off+n)`` of one block as a new ``bytes`` object (a file packed with
        others into a block: see ``Volume.write_many``); a whole block goes to
        :meth:`read_block_bytes`. A cached block is read with only the checksum segments the
        range touches."""
        if off == 0 and n == bsize:
            return self.read_block_bytes(key, bsize)
        if not self._in_memory(key):
            if self.cache is not None:
                try:
                    return self.cache.read_range_bytes(key, bsize, off, n)
                except CacheMiss:
                    pass
            elif self.compressor.name == "none":
                return self._get_range(key, bsize, off, n)   # the store's bytes are the result
        buf = bytearray(n)
        self.read_block(key, bsize, off, memoryview(buf))
        return bytes(buf)

    def read_ranges_bytes(self, key: str, bsize: int, ranges: list[tuple[int, int]]) -> list:
        """:meth:`read_range_bytes` of each ``(off, n)`` of one block: from the disk cache in
        one go (the files a sequential batch reads from one packed block), else one by one."""
        if self.cache is not None and not self._in_memory(key) and \
                all(off or n != bsize for off, n in ranges):
            try:
                return self.cache.read_ranges_bytes(key, bsize, ranges)
            except CacheMiss:
                pass
        return [self.read_range_bytes(key, bsize, off, n) for off, n in ranges]

    def _counted_get(self, t: float, nbytes: int) -> None:
        """A GET that began at ``t`` and brought ``nbytes`` (uncompressed) bytes, in the metrics."""
        m = self.metrics
        m.get_seconds += time.perf_counter() - t
        m.get_count += 1
        m.get_bytes += nbytes
        m.store_read_bytes += nbytes

    def _get_into(self, key: str, bsize: int, off: int, out: memoryview) -> None:
        t = time.perf_counter()
        got = self._retry(self.store.get_into, key, out, off)
        self._counted_get(t, got)
        if got != len(out):
            raise CorruptBlockError(f"block {key} is shorter than its {bsize} bytes")

    def _get_range(self, key: str, bsize: int, off: int, n: int) -> bytes:
        """Bytes ``[off, off+n)`` of an uncompressed object, as the store returns them."""
        t = time.perf_counter()
        data = self._retry(self.store.get, key, off, n)
        self._counted_get(t, len(data))
        if len(data) != n:
            raise CorruptBlockError(f"block {key} is shorter than its {bsize} bytes")
        return data

    def _get_whole(self, key: str, bsize: int):
        """One GET of a whole object, decompressed and checked against its size."""
        t = time.perf_counter()
        body = self._retry(self.store.get, key)
        m = self.metrics
        m.get_seconds += time.perf_counter() - t
        m.get_count += 1
        m.get_bytes += len(body)
        data = body if self.compressor.name == "none" else self.compressor.decompress(body, bsize)
        m.store_read_bytes += len(data)
        if len(data) != bsize:
            raise CorruptBlockError(f"block {key} holds {len(data)} bytes, not {bsize}")
        return data

    def _download(self, key: str, bsize: int, cache: bool = True):
        """A whole block, decompressed, from the store; queued for the disk cache when enabled."""
        if self.compressor.name == "none":
            data = self._alloc(bsize)
            try:
                self._get_into(key, bsize, 0, memoryview(data))
            except BaseException:
                self._recycle(data)
                raise
        else:
            data = self._get_whole(key, bsize)
        if cache and self.cache is not None:
            self._cache_later(key, data)
        return data

    # -- filling the disk cache ----------------------------------------------------------------------
    # A new 4 MiB file costs milliseconds of kernel time (fresh pages), as much as the GET itself
    # on a busy machine. So blocks are cached by background threads at a low CPU priority
    # (FILL_NICE), never on the reader's path; when it falls behind by more than
    # `cache_fill_buffer` bytes, the block is not cached this time (counted in cache_skipped;
    # `warmup` fills synchronously). In the "wait" and "direct" modes a read waits for room
    # instead, and while it waits it writes queued blocks itself (_help_fill, counted in
    # fill_helped): a low-priority filler on a busy machine would otherwise hold every read back
    # -- an epoch of 1.5 GiB of shards went from 20.6 s to 6.8 s with two CPU-bound processes
    # beside it, 3.3 s to 3.1 s without.

    def _cache_later(self, key: str, data, owner=None, may_wait: bool = True) -> None:
        """Queue a block for the disk cache; ``owner`` is the reusable buffer behind ``data``.
        ``may_wait``: a read's block, which waits for room in "wait" mode (see cache_fill)."""
        n = len(data)
        holder = data if owner is None else owner
        with self._lock:
            if self._fill_bytes + n > self.cache_fill_buffer and may_wait and \
                    self.cache_fill != "skip":
                deadline = time.monotonic() + FILL_WAIT_MAX
                while self._fill_bytes and self._fill_bytes + n > self.cache_fill_buffer:
                    left = deadline - time.monotonic()
                    if left <= 0 or self._fill is None:
                        break                           # a stuck disk: skip, as "skip" would
                    if not self._help_fill():           # nothing queued: a filler is writing
                        self._fill_room.wait(left)
            if self._fill_bytes + n > self.cache_fill_buffer:
                self.cache.skipped += 1
                return
            self._fill_bytes += n
            self._fill_keys[key] = self._fill_keys.get(key, 0) + 1
            self._pins[id(holder)] = self._pins.get(id(holder), 0) + 1   # not reused until written
            if self._fill is None:
                self._fill = queue.Queue()
                for _ in range(FILL_THREADS):
                    threading.Thread(target=self._fill_loop, args=(self._fill,), daemon=True,
                                     name="tj-cache-fill").start()
            self._fill.put((key, data, holder))

    def _fill_loop(self, q: queue.Queue) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), FILL_NICE)
        except (AttributeError, OSError):
            pass
        while True:
            item = q.get()
            if item is None:
                q.task_done()
                return
            try:
                self._fill_one(*item)
            finally:
                q.task_done()

    def _fill_one(self, key: str, data, holder) -> None:
        try:
            # "wait", or "skip"/"adaptive" keeping up: through the page cache (later reads copy
            # out of it fastest); "skip"/"adaptive" falling behind, or "direct": O_DIRECT, a
            # fraction of the CPU (see DiskCache._write_block); later whole-block reads of such
            # a block use O_DIRECT too
            mode = self.cache_fill
            self.cache.put(key, data, direct=mode == "direct" or (
                mode != "wait" and self._fill_bytes > self.cache_fill_direct))
        finally:
            with self._lock:
                self._fill_bytes -= len(data)
                left = self._fill_keys.pop(key) - 1
                if left:
                    self._fill_keys[key] = left
                self._fill_room.notify_all()
            self._unpin(None, holder)

    def _help_fill(self) -> bool:
        """A read waiting for room in the fill queue ("wait", "direct") writes the oldest queued
        block itself (lock held on entry and on return; released while writing). The fillers
        run at a low priority (FILL_NICE) so that a pass that does not wait is not slowed by
        them; a read that waits for them would inherit that priority on a busy machine -- it
        does the work at its own instead. False when nothing is queued (a filler holds the
        last block: wait for it). The queue holds no stop mark here: ``close`` puts those only
        after it has set ``_fill`` to None under the lock, and the caller checked it is not."""
        q = self._fill
        try:
            item = q.get_nowait()
        except queue.Empty:
            return False
        self._lock.release()
        try:
            self._fill_one(*item)
        finally:
            q.task_done()
            self._lock.acquire()
        self.metrics.fill_helped += 1
        return True

    def drain_cache_fill(self) -> None:
        """Wait until every block queued for the disk cache is written."""
        q = self._fill
        if q is not None:
            q.join()

    # -- the memory buffer ----------------------------------------------------------------------------
    # Whole blocks downloaded by readahead (or by partial reads that need the whole block) live in
    # an LRU buffer of at most `buffer_size` bytes. A block is downloaded once however many threads
    # want it (single-flight): the first becomes the owner, the others wait and then find it in the
    # buffer. Block buffers are reused: fresh memory costs more to touch here (page faults) than
    # the copy out of it. So a user of a block pins it while copying, and a buffer goes back to the
    # free list only once it has left the LRU and nobody holds a pin (readers, the cache filler).

    def _pinned(self, key: str, bsize: int, cache: bool = True):
        """A whole block, decompressed, pinned: call :meth:`_unpin` when done with it."""
        while True:
            with self._lock:
                data = self._buffer.get(key)
                if data is not None:
                    self._buffer.move_to_end(key)
                    self._pins[id(data)] = self._pins.get(id(data), 0) + 1
                    return data
                fut = self._fetching.get(key)
                if fut is None:
                    fut = self._fetching[key] = Future()
                    break
            self.metrics.singleflight_waits += 1
            fut.result()            # raises the owner's error; else the block is in the buffer now
        try:
            data = self._download(key, bsize, cache)
        except BaseException as e:
            with self._lock:
                del self._fetching[key]
            fut.set_exception(e)
            raise
        with self._lock:
            del self._fetching[key]
            self._pins[id(data)] = self._pins.get(id(data), 0) + 1
            self._buffer[key] = data
            self._buffered += len(data)
            while self._buffered > self.buffer_size and len(self._buffer) > 1:
                _, old = self._buffer.popitem(last=False)
                self._buffered -= len(old)
                self._retire(old)
        fut.set_result(None)
        return data

    def _unpin(self, key: str | None, data, consumed: bool = False) -> None:
        """Done with a pinned block; ``consumed``: read to its end, so it may leave the buffer."""
        with self._lock:
            if consumed and self._buffer.get(key) is data:
                del self._buffer[key]
                self._buffered -= len(data)
                self._retired.add(id(data))
            left = self._pins[id(data)] - 1
            if left:
                self._pins[id(data)] = left
            else:
                del self._pins[id(data)]
                if id(data) in self._retired:
                    self._retired.discard(id(data))
                    self._to_free(data)

    def _retire(self, data) -> None:
        """``data`` left the buffer (lock held): free it now, or when its last pin goes."""
        if id(data) in self._pins:
            self._retired.add(id(data))
        else:
            self._to_free(data)

    def _to_free(self, data) -> None:
        if type(data) is bytearray and len(data) == self.block_size and len(self._free) < 32:
            self._free.append(data)

    def _alloc(self, n: int) -> bytearray:
        with self._lock:
            if n == self.block_size and self._free:
                return self._free.pop()
        return bytearray(n)

    def alloc_block(self) -> bytearray:
        """A ``block_size`` buffer, reused when one is free (hand it back via ``put_block``)."""
        return self._alloc(self.block_size)

    def _recycle(self, data) -> None:
        with self._lock:
            self._to_free(data)

    def fetch(self, key: str, bsize: int, cache: bool = True) -> bytes:
        """A copy of a whole block (single-flight download; see :meth:`_pinned`)."""
        data = self._pinned(key, bsize, cache)
        try:
            return bytes(data)
        finally:
            self._unpin(key, data)

    def prefetch(self, blocks: list[tuple[str, int]]) -> int:
        """Start background downloads of blocks a reader will want soon (readahead); returns
        how many were started (blocks in memory or in the disk cache already are not). Blocks
        stored as files on this machine, uncompressed, are only advised to the kernel
        (:meth:`ObjectStore.advise`): it reads them into the page cache, from which the reader
        copies straight into its buffer; a copy in the memory buffer would be one copy more."""
        pool = None
        started = 0
        advise = self.compressor.name == "none"
        for key, bsize in blocks:
            if advise and self.store.advise(key):
                self.metrics.prefetch_count += 1
                continue
            advise = False                   # not such a store: stop asking
            with self._lock:
                # fetched, being fetched, or on its way to the disk cache (a reader that passed
                # the readahead may have read it to its end, out of the buffer, already)
                if key in self._buffer or key in self._fetching or key in self._fill_keys:
                    continue
            if self.cache is not None and self.cache.contains(key):
                continue
            pool = pool or self._pool("prefetch")
            self.metrics.prefetch_count += 1
            pool.submit(self._prefetch_one, key, bsize)
            started += 1
        return started

    def _prefetch_one(self, key: str, bsize: int) -> None:
        try:
            self._unpin(key, self._pinned(key, bsize))
        except Exception as e:            # the reader will fetch it again and see the error
            log.debug("prefetch of %s failed: %s", key, e)

    def under_pressure(self) -> bool:
        """The memory buffer is nearly full: readers should shrink their readahead."""
        return self._buffered > self.buffer_size * 0.8

    def read_slice(self, sid: int, size: int, off: int, out: memoryview) -> list[tuple]:
        """The block reads that fill ``out`` with bytes ``[off, off+len(out))`` of a slice, as
        ``(key, bsize, block_off, view)`` tuples (run them with :meth:`run_reads`)."""
        bs = self.block_size
        reads = []
        pos, end, filled = off, off + len(out), 0
        while pos < end:
            index, boff = divmod(pos, bs)
            bsize = min(bs, size - index * bs)
            n = min(bsize - boff, end - pos)
            reads.append((self.key(sid, index, bsize), bsize, boff, out[filled: filled + n]))
            pos += n
            filled += n
        return reads

    def run_reads(self, reads: list[tuple]) -> None:
        """Run block reads, in parallel when there are several and they are large."""
        if len(reads) == 1 or sum(len(r[3]) for r in reads) < PARALLEL_READ_MIN:
            for r in reads:
                self.read_block(*r)
            return
        pool = self._pool("down")
        futures = [pool.submit(self.read_block, *r) for r in reads[1:]]
        try:
            self.read_block(*reads[0])
        finally:
            errors = [f.exception() for f in futures]
        for e in errors:
            if e is not None:
                raise e

    def warm(self, blocks: list[tuple[str, int]], progress=None) -> tuple[int, int]:
        """Make sure blocks are local and in the page cache, in parallel; returns ``(blocks
        downloaded, bytes downloaded)``. ``progress(nbytes)`` is called per block.

        Local: in the disk cache (downloaded if missing), or, with no cache, a ``file://``
        store's own objects of uncompressed blocks. Then each block's local file is paged in
        asking for huge pages (:func:`torchjuice._pages.page_in`): what was not in the page cache
        comes in as 2 MiB folios, which a model load that maps the blocks maps one fault per
        2 MiB."""
        if not self.has_local_blocks():
            raise ValueError("warmup needs a disk cache: connect with cache_dir= or set "
                             "TORCHJUICE_CACHE_DIR (only a file:// store of uncompressed blocks "
                             "is local without one)")
        pool = self._pool("down")
        linux = sys.platform.startswith("linux")
        # the file a model load maps (local_blocks' first choice), by name: not checked here
        direct = self._objects_are_local_blocks()

        def one(kb):
            key, bsize = kb
            got = 0
            if self.cache is not None and not self.cache.contains(key):
                data = self._pinned(key, bsize, cache=False)
                try:
                    self.cache.put(key, data, direct=False)     # now, and into the page cache
                finally:
                    self._unpin(key, data, consumed=True)
                got = bsize
            if linux:
                if direct:
                    page_in(self.store.local_path(key), bsize)
                elif not page_in(self.cache.path(key), bsize):
                    page_in(self.cache.staged_path(key), bsize)
            if progress is not None:
                progress(bsize)
            return got

        fetched = [n for n in pool.map(one, blocks) if n]
        return len(fetched), sum(fetched)

    # -- deletes -----------------------------------------------------------------------------------
    def delete_slices(self, slices: list[tuple[int, int]]) -> None:
        """Remove the blocks of slices nothing refers to any more (best effort: a failure leaves
        an unreferenced object for ``gc``)."""
        for sid, size in slices:
            for key, _ in self.blocks(sid, size):
                try:
                    self.store.delete(key)
                    self.metrics.delete_count += 1
                except OSError:
                    pass

    def stats(self) -> dict:
        out = self.metrics.as_dict()
        out["buffer_bytes"] = self._buffered
        if self.cache is not None:
            out.update(self.cache.stats())
            out["cache_usage_bytes"] = self.cache.usage()
        return out

    def close(self, writeback_timeout: float = 60.0) -> None:
        if self.writeback and not self.wait_writeback(writeback_timeout):
            left = len(self.cache.staged_keys())
            log.warning("closing with %d write-back block(s) not uploaded yet: they stay staged in "
                        "%s and the next client using this cache uploads them", left, self.cache.dir)
        self._stop.set()
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
            fill, self._fill = self._fill, None
            self._maps.clear()                 # unmapped as soon as no reply holds a view
        if fill is not None:
            for _ in range(FILL_THREADS):  # the fillers finish what is queued, then stop
                fill.put(None)
            fill.join()
        if self.cache is not None:
            self.cache.close()
        for p in pools:
            p.shutdown(wait=True)

    # -- local files (the mmap path of torchjuice.models and the mount) -----------------------------
    def map_block(self, key: str, bsize: int) -> memoryview | None:
        """A read-only view of block ``key``'s own file, memory-mapped, when the store keeps
        objects as local files and blocks are uncompressed; else of its disk-cache file, checked
        (the whole block hashed through the mapping); None otherwise, or when no such file holds
        the block (read the block the usual way). The last MAPS_KEPT
        mappings are kept, so a reader going through a block in several requests maps it once.
        A mapping stays valid, its bytes unchanged, after the file is deleted or replaced
        (neither objects nor cache files are rewritten in place; see ``FileStore.local_path``
        and ``DiskCache.unverified``)."""
        with self._lock:
            mv = self._maps.get(key)
            if mv is not None:
                self._maps.move_to_end(key)
                return mv
        found = self._local_unverified([(key, bsize)], sized=False)[0]
        if found is None:
            return None
        path, check = found
        # a store's object is exactly the block; a disk-cache file is the block and its trailer,
        # its bytes checked once, through the mapping, against the block's digest (a mismatch
        # drops the file; the caller reads the usual way)
        mv = _map_file(path, bsize, exact=check is None)
        if mv is None or (check is not None and not check.check(mv)):
            return None
        with self._lock:
            self._maps[key] = mv
            while len(self._maps) > MAPS_KEPT:
                self._maps.popitem(last=False)      # unmapped once no reply holds a view of it
        return mv

    def _objects_are_local_blocks(self) -> bool:
        """The store keeps objects as local files (``file://``) and blocks are not compressed:
        an object's file holds its block's bytes as they are."""
        return self.compressor.name == "none" and hasattr(self.store, "local_path")

    def has_local_blocks(self) -> bool:
        """Whether :meth:`local_blocks` can ever find a block in a local file."""
        return self.cache is not None or self._objects_are_local_blocks()

    def local_blocks(self, blocks: list[tuple[str, int]], verify: bool = True) -> list:
        """For each ``(key, bsize)``: a local file whose bytes ``[0, bsize)`` are the block's,
        uncompressed and trustworthy, or None (read it the usual way). First choice: the object
        itself when the store keeps objects as local files (``file://``) and blocks are not
        compressed; then the disk cache, whose checksum is checked here (a corrupt block is
        dropped, and so fetched again by the caller's read). Neither kind of file is ever
        rewritten in place, so a memory mapping of one stays valid (same bytes) after the block
        is evicted, deleted or replaced. Cache checks run in parallel on the download pool.

        ``verify=False``: ``(path, check)`` or None for each block, nothing hashed here. ``check``
        is None for a store's own object (no checksum to check; not even its size is: the caller
        checks the size of the file it opens, which may be shorter or gone), else a cache file's
        :class:`~torchjuice.chunk.disk.BlockCheck`: its bytes are the block's only once
        ``check.check(view, offset)`` said so of the bytes the caller holds (a mapping of the
        file); a False from it dropped the file, and the caller reads the block as usual."""
        found = self._local_unverified(blocks, sized=verify)
        if not verify:
            return found
        out = [None if f is None else f[0] for f in found]
        todo = [i for i, f in enumerate(found) if f is not None and f[1] is not None]
        if len(todo) <= 1:
            good = [found[i][1].check_file() for i in todo]
        else:
            good = list(self._pool("down").map(lambda i: found[i][1].check_file(), todo))
        for i, ok in zip(todo, good):
            if not ok:
                out[i] = None
        return out

    def _local_unverified(self, blocks: list[tuple[str, int]], sized: bool = True) -> list:
        # sized=False: a store's object is taken without a stat (the unverified caller checks
        # the size of the file it opens, as it must anyway: it could be replaced meanwhile)
        out: list = [None] * len(blocks)
        direct = self._objects_are_local_blocks()
        for i, (key, bsize) in enumerate(blocks):
            if direct:
                path = self.store.local_path(key)
                if not sized:
                    out[i] = (path, None)
                    continue
                try:
                    if os.stat(path).st_size == bsize:
                        out[i] = (path, None)
                        continue
                except OSError:
                    pass
            if self.cache is not None:
                check = self.cache.unverified(key, bsize)
                if check is not None:
                    out[i] = (check.path, check)
        return out
