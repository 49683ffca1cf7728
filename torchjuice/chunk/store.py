"""The block layer: slices cut into immutable blocks in the object store.

A slice of ``size`` bytes is stored as blocks ``0..n-1`` of at most ``block_size`` bytes each, under
``NAME/chunks/{id//1_000_000}/{id//1000}/{id}_{index}_{bsize}`` (the JuiceFS layout). Uploads run on
a thread pool with a bound on the bytes in flight (writers block when it is reached: back-pressure);
reads of several blocks run in parallel straight into the caller's buffer.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from ..errors import CorruptBlockError
from ..object import ObjectStore
from .compress import new_compressor

PARALLEL_READ_MIN = 1 << 20      # below this a read runs inline: thread hand-off costs more


class Metrics:
    """Counters of object traffic, readable from Python (``Volume.metrics()``)."""

    __slots__ = ("get_count", "get_bytes", "put_count", "put_bytes", "delete_count")

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}


class ChunkStore:
    def __init__(self, store: ObjectStore, name: str, block_size: int, compression: str | None = None,
                 upload_threads: int = 16, download_threads: int = 16,
                 max_inflight: int = 256 << 20):
        self.store = store
        self.prefix = f"{name}/chunks/"
        self.block_size = block_size
        self.compressor = new_compressor(compression)
        self.upload_threads = upload_threads
        self.download_threads = download_threads
        self.max_inflight = max(max_inflight, block_size)
        self.metrics = Metrics()
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        """Fresh pools and locks (also in a forked child: a parent's threads do not exist there)."""
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._inflight = 0
        self._uploads: ThreadPoolExecutor | None = None
        self._downloads: ThreadPoolExecutor | None = None

    def _pool(self, kind: str) -> ThreadPoolExecutor:
        with self._lock:
            if kind == "up":
                if self._uploads is None:
                    self._uploads = ThreadPoolExecutor(self.upload_threads, "tj-upload")
                return self._uploads
            if self._downloads is None:
                self._downloads = ThreadPoolExecutor(self.download_threads, "tj-download")
            return self._downloads

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
        ``data`` must not change until the future is done."""
        n = len(data)
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

    def _upload(self, sid: int, index: int, data) -> None:
        n = len(data)
        try:
            body = self.compressor.compress(data)
            self.store.put(self.key(sid, index, n), body)
            self.metrics.put_count += 1
            self.metrics.put_bytes += len(body)
        finally:
            self._release(n)

    # -- reads -------------------------------------------------------------------------------------
    def read_block(self, key: str, bsize: int, off: int, out: memoryview) -> None:
        """Fill ``out`` with bytes ``[off, off+len(out))`` of one block."""
        if self.compressor.name == "none":
            n = self.store.get_into(key, out, off)
            self.metrics.get_count += 1
            self.metrics.get_bytes += n
            if n != len(out):
                raise CorruptBlockError(f"block {key} is shorter than its {bsize} bytes")
            return
        body = self.store.get(key)
        self.metrics.get_count += 1
        self.metrics.get_bytes += len(body)
        raw = self.compressor.decompress(body, bsize)
        if len(raw) != bsize:
            raise CorruptBlockError(f"block {key} holds {len(raw)} bytes, not {bsize}")
        out[:] = memoryview(raw)[off: off + len(out)]

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

    def close(self) -> None:
        with self._lock:
            pools, self._uploads, self._downloads = (self._uploads, self._downloads), None, None
        for p in pools:
            if p is not None:
                p.shutdown(wait=True)
