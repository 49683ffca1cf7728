"""Reading a file: merge the slices of each chunk (newest on top, gaps are zeros), then fetch the
blocks behind the requested range straight into the caller's buffer."""
from __future__ import annotations

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

    def __init__(self, meta: Meta, chunks: ChunkStore, inode: int):
        self.meta = meta
        self.chunks = chunks
        self.inode = inode
        self._views: dict[int, list] = {}

    def invalidate(self, indexes=None) -> None:
        if indexes is None:
            self._views.clear()
        else:
            for i in indexes:
                self._views.pop(i, None)

    def _view(self, index: int) -> list:
        view = self._views.get(index)
        if view is None:
            view = self._views[index] = merge_slices(self.meta.read_chunk(self.inode, index))
        return view

    def read_into(self, off: int, out: memoryview, length: int) -> int:
        """Fill ``out`` from file offset ``off``; stops at ``length`` (the file size). Returns the
        number of bytes read."""
        n = max(0, min(len(out), length - off))
        reads = []
        done = 0
        while done < n:
            index, coff = divmod(off + done, CHUNK_SIZE)
            k = min(n - done, CHUNK_SIZE - coff)
            self._plan(index, coff, out[done: done + k], reads)
            done += k
        if reads:
            self.chunks.run_reads(reads)
        return n

    def _plan(self, index: int, coff: int, out: memoryview, reads: list) -> None:
        end = coff + len(out)
        pos = coff
        for start, stop, sid, size, soff in self._view(index):
            if stop <= pos:
                continue
            if start >= end:
                break
            if start > pos:
                zero_fill(out[pos - coff: start - coff])
                pos = start
            upto = min(stop, end)
            if sid == 0:
                zero_fill(out[pos - coff: upto - coff])
            else:
                reads.extend(self.chunks.read_slice(sid, size, soff + (pos - start),
                                                    out[pos - coff: upto - coff]))
            pos = upto
        if pos < end:
            zero_fill(out[pos - coff:])
