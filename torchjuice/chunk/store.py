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

import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from ..errors import CorruptBlockError
from ..object import ObjectStore
from .compress import new_compressor
from .disk import CacheMiss, DiskCache

log = logging.getLogger("torchjuice.chunk")

PARALLEL_READ_MIN = 1 << 20      # below this a read runs inline: thread hand-off costs more


class Metrics:
    """Counters of this client's block traffic (``Volume.metrics()``, ``torchjuice stats``)."""

    __slots__ = ("get_count", "get_bytes", "get_seconds", "put_count", "put_bytes", "put_seconds",
                 "delete_count", "buffer_hits", "buffer_hit_bytes", "prefetch_count",
                 "singleflight_waits", "store_read_bytes")

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}


class ChunkStore:
    def __init__(self, store: ObjectStore, name: str, block_size: int, compression: str | None = None,
                 upload_threads: int = 16, download_threads: int = 16,
                 max_inflight: int = 256 << 20, cache: DiskCache | None = None,
                 buffer_size: int = 256 << 20, cache_writes: bool = True, writeback: bool = False):
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
        if writeback and cache is None:
            raise ValueError("write-back needs a disk cache (cache_dir)")
        self.metrics = Metrics()
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
        self._buffer: OrderedDict[str, bytes] = OrderedDict()   # prefetched whole blocks
        self._buffered = 0
        self._fetching: dict[str, Future] = {}
        self._staged_pending: set[Future] = set()
        self._stop = threading.Event()

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
    def put_block(self, sid: int, index: int, data: bytes | bytearray | memoryview) -> Future:
        """Upload one block in the background; blocks the caller while too many bytes are in flight.
        ``data`` must not change until the future is done. In write-back mode the block is
        staged durably on local disk first and the returned future is already done."""
        n = len(data)
        if self.writeback:
            key = self.key(sid, index, n)
            self.cache.put(key, data, staged=True)
            self._upload_staged(key, n)
            done: Future = Future()
            done.set_result(None)
            return done
        with self._room:
            while self._inflight > 0 and self._inflight + n > self.max_inflight:
                self._room.wait()
            self._inflight += n
        try:
            return self._pool("up").submit(self._upload, sid, index, data)
        except BaseException:
            self._release(n)
            raise

    def _release(self, n: int) -> None:
        with self._room:
            self._inflight -= n
            self._room.notify_all()

    def _put(self, key: str, data) -> None:
        t = time.perf_counter()
        body = self.compressor.compress(data)
        self.store.put(key, body)
        m = self.metrics
        m.put_seconds += time.perf_counter() - t
        m.put_count += 1
        m.put_bytes += len(body)

    def _upload(self, sid: int, index: int, data) -> None:
        n = len(data)
        try:
            key = self.key(sid, index, n)
            self._put(key, data)
            if self.cache_writes:
                self.cache.put(key, data)
        finally:
            self._release(n)

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
    def read_block(self, key: str, bsize: int, off: int, out: memoryview) -> None:
        """Fill ``out`` with bytes ``[off, off+len(out))`` of one block."""
        n = len(out)
        m = self.metrics
        with self._lock:
            data = self._buffer.get(key)
            if data is not None and off + n >= bsize:     # consumed to its end: free it
                del self._buffer[key]
                self._buffered -= len(data)
            fut = self._fetching.get(key) if data is None else None
        if data is None and fut is not None:
            m.singleflight_waits += 1
            data = fut.result()
        if data is not None:
            m.buffer_hits += 1
            m.buffer_hit_bytes += n
            out[:] = memoryview(data)[off: off + n]
            return
        if self.cache is not None:
            try:
                self.cache.read_into(key, bsize, off, out)
                return
            except CacheMiss:
                pass
        if self.compressor.name == "none" and (n == bsize or self.cache is None):
            self._get_into(key, bsize, off, out)                 # straight into the caller
            if n == bsize and self.cache is not None:
                self.cache.put(key, out)
            return
        data = self.fetch(key, bsize)
        out[:] = memoryview(data)[off: off + n]

    def _get_into(self, key: str, bsize: int, off: int, out: memoryview) -> None:
        t = time.perf_counter()
        got = self.store.get_into(key, out, off)
        m = self.metrics
        m.get_seconds += time.perf_counter() - t
        m.get_count += 1
        m.get_bytes += got
        m.store_read_bytes += got
        if got != len(out):
            raise CorruptBlockError(f"block {key} is shorter than its {bsize} bytes")

    def _download(self, key: str, bsize: int):
        """A whole block, decompressed, from the store; cached on local disk when enabled."""
        if self.compressor.name == "none":
            buf = bytearray(bsize)
            self._get_into(key, bsize, 0, memoryview(buf))
            data = buf
        else:
            t = time.perf_counter()
            body = self.store.get(key)
            m = self.metrics
            m.get_seconds += time.perf_counter() - t
            m.get_count += 1
            m.get_bytes += len(body)
            data = self.compressor.decompress(body, bsize)
            m.store_read_bytes += len(data)
            if len(data) != bsize:
                raise CorruptBlockError(f"block {key} holds {len(data)} bytes, not {bsize}")
        if self.cache is not None:
            self.cache.put(key, data)
        return data

    def fetch(self, key: str, bsize: int, keep: bool = False):
        """A whole block, downloaded once however many threads ask at the same time
        (single-flight). ``keep``: hold it in the memory buffer for a reader coming soon."""
        with self._lock:
            fut = self._fetching.get(key)
            owner = fut is None
            if owner:
                fut = self._fetching[key] = Future()
        if not owner:
            self.metrics.singleflight_waits += 1
            return fut.result()
        try:
            data = self._download(key, bsize)
        except BaseException as e:
            with self._lock:
                del self._fetching[key]
            fut.set_exception(e)
            raise
        with self._lock:
            del self._fetching[key]
            if keep and key not in self._buffer:
                self._buffer[key] = data
                self._buffered += len(data)
                while self._buffered > self.buffer_size and self._buffer:
                    _, old = self._buffer.popitem(last=False)
                    self._buffered -= len(old)
        fut.set_result(data)
        return data

    def prefetch(self, blocks: list[tuple[str, int]]) -> None:
        """Start background downloads of blocks a reader will want soon (readahead)."""
        pool = None
        for key, bsize in blocks:
            with self._lock:
                if key in self._buffer or key in self._fetching:
                    continue
            if self.cache is not None and self.cache.contains(key):
                continue
            pool = pool or self._pool("prefetch")
            self.metrics.prefetch_count += 1
            pool.submit(self._prefetch_one, key, bsize)

    def _prefetch_one(self, key: str, bsize: int) -> None:
        try:
            self.fetch(key, bsize, keep=True)
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
        """Make sure blocks are in the disk cache, downloading in parallel; returns
        ``(blocks downloaded, bytes downloaded)``. ``progress(nbytes)`` is called per block."""
        if self.cache is None:
            raise ValueError("warmup needs a disk cache: connect with cache_dir= or set "
                             "TORCHJUICE_CACHE_DIR")
        pool = self._pool("down")

        def one(kb):
            key, bsize = kb
            got = 0
            if not self.cache.contains(key):
                self.fetch(key, bsize)
                got = bsize
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
        for p in pools:
            p.shutdown(wait=True)
