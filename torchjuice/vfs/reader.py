"""Reading a file: merge the slices of each chunk (newest on top, gaps are zeros), fetch the blocks
behind the requested range straight into the caller's buffer, and read ahead for sequential
readers.

Readahead: a read that starts where the previous one ended is sequential; the window then grows
(doubling, at least twice the read size) up to ``max_readahead``, and the blocks in the window
past the read are prefetched in the background. A random read resets the window; a nearly full
memory buffer halves it.
"""
from __future__ import annotations

from typing import Iterator

from ..chunk.store import ChunkStore
from ..meta import CHUNK_SIZE, Meta, Slice

_ZEROS = bytes(1 << 20)


def merge_slices(slices: list[Slice]) -> list[tuple[int, int, int, int, int]]:
    """Overlay slices (oldest first) into non-overlapping segments ``(start, end, id, size, off)``
    sorted by start, where ``off`` is the slice-object offset of ``start``. Id 0 is a hole; ranges
    covered by no segment are holes too."""
    segs: list[tuple[int, int, int, int, int]] = []
    for s in slices:
        if s.len <= 0:
            continue
        a, b = s.pos, s.pos + s.len
        out = []
        for seg in segs:
            start, end, sid, size, off = seg
            if end <= a or start >= b:
                out.append(seg)
                continue
            if start < a:
                out.append((start, a, sid, size, off))
            if end > b:
                out.append((b, end, sid, size, off + (b - start)))
        out.append((a, b, s.id, s.size, s.off))
        out.sort()
        segs = out
    return segs


def zero_fill(view: memoryview) -> None:
    pos, n = 0, len(view)
    while pos < n:
        k = min(n - pos, len(_ZEROS))
        view[pos: pos + k] = _ZEROS[:k]
        pos += k


class FileReader:
    """Reads one inode; keeps the merged view of each chunk until told that it changed."""

    def __init__(self, meta: Meta, chunks: ChunkStore, inode: int, max_readahead: int = 64 << 20):
        self.meta = meta
        self.chunks = chunks
        self.inode = inode
        self.max_readahead = max_readahead
        self._views: dict[int, list] = {}
        self._next = 0            # where a sequential reader reads next
        self._window = 0
        self._ahead = 0           # prefetch was issued up to here

    def invalidate(self, indexes=None) -> None:
        if indexes is None:
            self._views.clear()
        else:
            for i in indexes:
                self._views.pop(i, None)

    def set_slices(self, index: int, slices: list[Slice]) -> None:
        """Use ``slices`` for chunk ``index`` (read by the caller together with the length, e.g.
        ``Meta.resolve_slices``) instead of reading them again."""
        self._views[index] = merge_slices(slices)

    def _view(self, index: int) -> list:
        view = self._views.get(index)
        if view is None:
            view = self._views[index] = merge_slices(self.meta.read_chunk(self.inode, index))
        return view

    def _pieces(self, off: int, n: int) -> Iterator[tuple[int, int, int, int, int]]:
        """``(file_off, len, slice_id, slice_size, slice_off)`` covering ``[off, off+n)``;
        id 0 means zeros."""
        end = off + n
        while off < end:
            index, coff = divmod(off, CHUNK_SIZE)
            cend = min(CHUNK_SIZE, coff + end - off)
            base = index * CHUNK_SIZE
            pos = coff
            for start, stop, sid, size, soff in self._view(index):
                if stop <= pos:
                    continue
                if start >= cend:
                    break
                if start > pos:
                    yield base + pos, start - pos, 0, 0, 0
                    pos = start
                upto = min(stop, cend)
                yield base + pos, upto - pos, sid, size, soff + (pos - start)
                pos = upto
            if pos < cend:
                yield base + pos, cend - pos, 0, 0, 0
            off = base + cend

    def blocks(self, off: int, n: int) -> list[tuple[str, int]] | None:
        """``(key, bsize)`` of the blocks behind ``[off, off+n)`` (holes have none), or None when
        a chunk's slice list is not loaded yet: this never calls the metadata engine (the FUSE
        mount asks, on its event loop, whether a read will be served by the local disk cache)."""
        if n <= 0:
            return []
        last = (off + n - 1) // CHUNK_SIZE
        if any(i not in self._views for i in range(off // CHUNK_SIZE, last + 1)):
            return None
        bs = self.chunks.block_size
        out = []
        for _foff, k, sid, size, soff in self._pieces(off, n):
            if sid:
                for i in range(soff // bs, (soff + k - 1) // bs + 1):
                    bsize = min(bs, size - i * bs)
                    out.append((self.chunks.key(sid, i, bsize), bsize))
        return out

    def read_mapped(self, off: int, n: int, length: int) -> memoryview | None:
        """Bytes ``[off, off+n)`` (up to ``length``, the file size) as a read-only view of a
        memory mapping of the file that holds their block, when they lie in one block that the
        chunk store can map (:meth:`ChunkStore.map_block`: the object of a ``file://`` store,
        uncompressed, or a checked disk-cache file); else None, and the caller reads the usual
        way. No copy: the FUSE mount replies from it.
        Readahead runs as for :meth:`read_into`. Never calls the metadata engine (None while a
        chunk's slice list is not loaded)."""
        n = max(0, min(n, length - off))
        if n == 0 or (off // CHUNK_SIZE) not in self._views or \
                (off + n - 1) // CHUNK_SIZE != off // CHUNK_SIZE:
            return None
        pieces = list(self._pieces(off, n))
        if len(pieces) != 1 or not pieces[0][2]:
            return None
        _foff, _k, sid, size, soff = pieces[0]
        bs = self.chunks.block_size
        i, boff = divmod(soff, bs)
        if boff + n > bs:
            return None
        mm = self.chunks.map_block(self.chunks.key(sid, i, min(bs, size - i * bs)),
                                   min(bs, size - i * bs))
        if mm is None:
            return None
        if self.max_readahead > 0:
            self._readahead(off, n, length)
        return mm[boff: boff + n]

    def read_into(self, off: int, out: memoryview, length: int) -> int:
        """Fill ``out`` from file offset ``off``; stops at ``length`` (the file size). Returns the
        number of bytes read."""
        n = max(0, min(len(out), length - off))
        if self.max_readahead > 0:
            self._readahead(off, n, length)
        try:
            self._read(off, n, out)
        except FileNotFoundError:
            # A block this handle's (cached) slice list points at is gone: compaction replaced
            # it a while ago. Read the chunks' slice lists again and retry once.
            self.invalidate()
            self._read(off, n, out)
        return n

    def _read(self, off: int, n: int, out: memoryview) -> None:
        reads = []
        for foff, k, sid, size, soff in self._pieces(off, n):
            view = out[foff - off: foff - off + k]
            if sid == 0:
                zero_fill(view)
            else:
                reads.extend(self.chunks.read_slice(sid, size, soff, view))
        if reads:
            self.chunks.run_reads(reads)

    def _readahead(self, off: int, n: int, length: int) -> None:
        if off != self._next or n == 0:
            self._window = self._ahead = 0
            self._next = off + n
            return
        self._next = off + n
        w = min(max(self._window * 2, 2 * n, self.chunks.block_size), self.max_readahead)
        if self.chunks.under_pressure():
            w //= 2
        self._window = w
        start = max(off + n, self._ahead)
        end = min(off + n + w, length)
        if end <= start:
            return
        bs = self.chunks.block_size
        blocks = []
        for _foff, k, sid, size, soff in self._pieces(start, end - start):
            if sid:
                for i in range(soff // bs, (soff + k - 1) // bs + 1):
                    blocks.append((self.chunks.key(sid, i, min(bs, size - i * bs)),
                                   min(bs, size - i * bs)))
        self._ahead = end
        self.chunks.prefetch(blocks)
