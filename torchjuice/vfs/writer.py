"""Writing a file: buffer writes as slices, upload their blocks in the background, then commit
each slice to the metadata engine in the order the writes happened.

Upload first, commit second: a crash leaves only unreferenced objects (for ``gc``), never a file
pointing at missing data. Memory is bounded: a slice keeps at most one partial block; full blocks
go to the upload pool, which blocks writers while too many bytes are in flight.

Writes are copied into a reused block buffer, except large immutable ones (``bytes`` of at least
``PIECE_MIN``, e.g. a FUSE mount's requests): those are kept by reference and a block is shipped
as the list of them (see ``ChunkStore.put_block``), so the writer's thread does no copy. (A kept
piece holds its whole ``bytes`` object alive until its block is uploaded.)
"""
from __future__ import annotations

from ..chunk.store import ChunkStore, join_into
from ..meta import CHUNK_SIZE, Meta, Slice

MAX_PENDING_SLICES = 64     # more uncommitted slices than this (random writes): commit the oldest
PIECE_MIN = 64 << 10        # immutable writes of at least this size are kept, not copied


class SliceBuffer:
    """One slice being written: bytes placed at ``pos`` inside chunk ``index``."""

    def __init__(self, chunks: ChunkStore, sid: int, index: int, pos: int):
        self.chunks = chunks
        self.sid = sid
        self.index = index
        self.pos = pos
        self.length = 0
        self.frozen = False
        self._cur: bytearray | None = None     # the block being filled (block_size bytes)
        self._pieces: list = []                # or: the immutable buffers that fill it so far
        self._n = 0                            # bytes used in it
        self._nblocks = 0
        self._futures = []

    @property
    def end(self) -> int:
        return self.pos + self.length

    def room(self) -> int:
        return CHUNK_SIZE - self.end

    def append(self, data: memoryview) -> None:
        bs = self.chunks.block_size
        while data:
            if self._n == 0 and len(data) >= bs and isinstance(data.obj, bytes):
                # a whole block of an immutable buffer: upload it without copying
                k = bs
                self._futures.append(self.chunks.put_block(self.sid, self._nblocks, data[:k]))
                self._nblocks += 1
            elif self._cur is None and len(data) >= PIECE_MIN and isinstance(data.obj, bytes):
                # large writes of immutable bytes (a mount's requests): kept by reference, the
                # block is their concatenation -- no copy on the writer's thread
                k = min(len(data), bs - self._n)
                self._pieces.append(data[:k])
                self._n += k
                if self._n == bs:
                    self._ship()
            else:
                if self._cur is None:
                    self._cur = self.chunks.alloc_block()     # reused: no fresh pages to fault in
                    join_into(self._cur, self._pieces)        # what was kept, copied in
                    self._pieces = []
                k = min(len(data), bs - self._n)
                self._cur[self._n: self._n + k] = data[:k]
                self._n += k
                if self._n == bs:
                    self._ship()
            self.length += k
            data = data[k:]

    def _ship(self) -> None:
        if self._pieces:
            pieces, self._pieces, self._n = self._pieces, [], 0
            self._futures.append(self.chunks.put_block(self.sid, self._nblocks, pieces))
            self._nblocks += 1
            return
        buf, n = self._cur, self._n
        self._cur, self._n = None, 0
        view = buf if n == len(buf) else memoryview(buf)[:n]
        self._futures.append(self.chunks.put_block(self.sid, self._nblocks, view, owner=buf))
        self._nblocks += 1

    def freeze(self) -> None:
        if not self.frozen:
            self.frozen = True
            if self._n:
                self._ship()

    def uploaded(self) -> bool:
        return self.frozen and all(f.done() for f in self._futures)

    def wait(self) -> None:
        """Wait for every upload of this slice, then raise the first failure (so no upload of a
        failed slice is still running when the caller moves on)."""
        errors = [f.exception() for f in self._futures]
        for e in errors:
            if e is not None:
                raise e

    def as_slice(self) -> Slice:
        return Slice(self.pos, self.sid, self.length, 0, self.length)


class FileWriter:
    """The write side of one open file."""

    def __init__(self, meta: Meta, chunks: ChunkStore, inode: int):
        self.meta = meta
        self.chunks = chunks
        self.inode = inode
        self._open: dict[int, SliceBuffer] = {}     # chunk index -> slice still accepting writes
        self._queue: list[SliceBuffer] = []         # uncommitted slices, oldest first
        self.pending_end = 0                        # end of the furthest uncommitted write
        self._error: BaseException | None = None

    @property
    def dirty(self) -> bool:
        return bool(self._queue)

    def write(self, off: int, data: memoryview) -> None:
        if self._error is not None:
            raise self._error
        self.pending_end = max(self.pending_end, off + len(data))
        while data:
            index, coff = divmod(off, CHUNK_SIZE)
            k = min(len(data), CHUNK_SIZE - coff)
            self._slice_at(index, coff).append(data[:k])
            s = self._open[index]
            if s.room() == 0:
                s.freeze()
                del self._open[index]
            off += k
            data = data[k:]
        self._commit(wait=len(self._queue) > MAX_PENDING_SLICES)

    def _slice_at(self, index: int, coff: int) -> SliceBuffer:
        s = self._open.get(index)
        if s is not None and s.end == coff:
            return s
        if s is not None:
            s.freeze()
        s = SliceBuffer(self.chunks, self.meta.new_slice_id(), index, coff)
        self._open[index] = s
        self._queue.append(s)
        return s

    def _commit(self, wait: bool) -> set[int]:
        """Commit uploaded slices in order; with ``wait``, the oldest at least (back-pressure)."""
        committed = set()
        try:
            while self._queue:
                s = self._queue[0]
                if wait:
                    s.freeze()
                    s.wait()
                elif not s.uploaded():
                    break
                else:
                    s.wait()     # raises the upload's error, if any
                try:
                    self.meta.write_chunk(self.inode, s.index, s.as_slice())
                except FileNotFoundError:
                    # the file was freed meanwhile (removed by another client): nothing will
                    # ever refer to these blocks, so they go now rather than wait for gc
                    self.chunks.delete_slices([(s.sid, s.length)])
                    raise
                self._queue.pop(0)
                if self._open.get(s.index) is s:
                    del self._open[s.index]
                committed.add(s.index)
                wait = False
        except BaseException as e:
            self._error = e
            raise
        return committed

    def flush(self) -> set[int]:
        """Upload and commit everything written so far; returns the chunk indexes changed."""
        if self._error is not None:
            raise self._error
        for s in self._queue:
            s.freeze()
        committed = set()
        while self._queue:
            committed |= self._commit(wait=True)
        self._open.clear()
        return committed

    def discard(self) -> None:
        """Drop what was not committed (after a failure, or a truncate that supersedes it)."""
        for s in self._queue:
            s.freeze()
        for s in self._queue:
            try:
                s.wait()
            except BaseException:
                pass
        self._queue.clear()
        self._open.clear()


class PackWriter:
    """Many small files packed into shared slices of one block each.

    Each file's bytes are appended to the current pack; a full pack (the next file would not fit
    in a block) is uploaded as one object, and once it has landed one metadata transaction
    (:meth:`Meta.write_shared`) makes each file's range of it that file's content, the slice
    counting one reference per file. So 40 files of 100 KiB cost one PUT, one GET to read back,
    and one cache file. Files are visible once their pack is committed (at the latest by
    :meth:`flush`); a failure before that leaves them empty and the pack's object for ``gc``.
    """

    MAX_PENDING = 8         # packs uploading at once (each one block of memory)

    def __init__(self, meta: Meta, chunks: ChunkStore):
        self.meta = meta
        self.chunks = chunks
        self._buf: bytearray | None = None
        self._n = 0
        self._parts: list[tuple[int, int, int]] = []        # (inode, off, length) in _buf
        self._pending: list[tuple] = []             # (future, sid, size, parts), oldest first
        self.waiting: set[int] = set()                     # inodes whose content is not committed

    def add(self, inode: int, data) -> None:
        """Append one file's whole content (at most a block) to the current pack."""
        n = len(data)
        bs = self.chunks.block_size
        if not 0 < n <= bs:
            raise ValueError(f"a packed file holds 1 to {bs} bytes, not {n}")
        if self._n + n > bs:
            self._seal()
        if self._buf is None:
            self._buf = self.chunks.alloc_block()
        self._buf[self._n: self._n + n] = data
        self._parts.append((inode, self._n, n))
        self.waiting.add(inode)
        self._n += n

    def _seal(self) -> None:
        if not self._parts:
            return
        buf, n, parts = self._buf, self._n, self._parts
        self._buf, self._n, self._parts = None, 0, []
        sid = self.meta.new_slice_id()
        view = buf if n == len(buf) else memoryview(buf)[:n]
        self._pending.append((self.chunks.put_block(sid, 0, view, owner=buf), sid, n, parts))
        while self._pending and (self._pending[0][0].done() or
                                 len(self._pending) > self.MAX_PENDING):
            self._commit_oldest()

    def _commit_oldest(self) -> None:
        fut, sid, n, parts = self._pending.pop(0)
        fut.result()                                   # the upload's error, if any
        self.meta.write_shared(sid, n, parts)

    def flush(self) -> None:
        """Upload and commit every pack; on failure, the packs not committed are waited for."""
        try:
            self._seal()
            while self._pending:
                self._commit_oldest()
        finally:
            for fut, *_ in self._pending:
                fut.exception()                        # let no upload run on unseen
            self._pending.clear()
            self.waiting.clear()
