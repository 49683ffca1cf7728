"""Compaction: a chunk written as many slices (small appends, random writes) is rewritten as one
slice per contiguous run of data, its content unchanged.

Read the chunk's merged view, upload it as new slices, then commit with
:meth:`~torchjuice.meta.base.BaseMeta.replace_chunk`: one metadata transaction that swaps the slice
list only if it is still exactly the list that was read. If anything wrote to the chunk meanwhile
the commit is refused, the new blocks are deleted and the chunk is compacted again the next time
it passes the threshold. The replaced slices are not deleted at once: readers that opened the file
before may still read them, so the engine keeps them ``slice_delay`` seconds (gc counts them as
referenced) and a background job deletes them afterwards.

Holes stay holes: data runs separated by more than one block of zeros become separate slices, so a
sparse chunk does not turn into megabytes of stored zeros.
"""
from __future__ import annotations

import logging
import os
import posixpath
import threading
import weakref
from typing import TYPE_CHECKING

from ..meta import CHUNK_SIZE, Slice
from ..vfs.reader import merge_slices

if TYPE_CHECKING:
    from ..chunk.store import ChunkStore
    from ..meta import Meta

log = logging.getLogger("torchjuice.compact")


def _runs(segs: list[tuple], gap: int) -> list[tuple[int, int]]:
    """``(start, end)`` of the data runs of a merged chunk view; gaps up to ``gap`` bytes are
    kept inside a run (as zeros)."""
    runs: list[list[int]] = []
    for start, end, sid, _size, _off in segs:
        if sid == 0:
            continue
        if runs and start - runs[-1][1] <= gap:
            runs[-1][1] = end
        else:
            runs.append([start, end])
    return [(a, b) for a, b in runs]


def _fill(chunks: "ChunkStore", segs: list[tuple], off: int, view: memoryview) -> None:
    """Fill ``view`` (zeroed) with chunk bytes ``[off, off+len(view))`` of the merged view."""
    end = off + len(view)
    reads = []
    for start, stop, sid, size, soff in segs:
        lo, hi = max(start, off), min(stop, end)
        if sid == 0 or lo >= hi:
            continue
        reads.extend(chunks.read_slice(sid, size, soff + (lo - start), view[lo - off: hi - off]))
    if reads:
        chunks.run_reads(reads)


def compact_chunk(meta: "Meta", chunks: "ChunkStore", inode: int, index: int,
                  min_slices: int = 2) -> bool | None:
    """Compact chunk ``index`` of ``inode``. Returns True when compacted, False when something
    wrote to the chunk meanwhile (nothing changed), None when there was nothing to do."""
    slices = meta.read_chunk(inode, index)
    if len(slices) < min_slices:
        return None
    segs = merge_slices(slices)
    runs = _runs(segs, chunks.block_size)
    if len(slices) <= len(runs):
        return None
    new: list[Slice] = []
    futures = []
    bs = chunks.block_size
    try:
        for a, b in runs:
            sid = meta.new_slice_id()
            new.append(Slice(a, sid, b - a, 0, b - a))
            for i, off in enumerate(range(a, b, bs)):
                buf = bytearray(min(bs, b - off))
                _fill(chunks, segs, off, memoryview(buf))
                futures.append(chunks.put_block(sid, i, buf))
        for f in futures:
            f.result()
    except BaseException:
        for f in futures:
            try:
                f.result()
            except BaseException:
                pass
        chunks.delete_slices([(s.id, s.size) for s in new])
        raise
    if meta.replace_chunk(inode, index, slices, new):
        return True
    chunks.delete_slices([(s.id, s.size) for s in new])
    return False


def compact_inode(meta: "Meta", chunks: "ChunkStore", inode: int, min_slices: int = 2) -> dict:
    """Compact every chunk of one file; ``{"chunks", "compacted", "conflicts"}``."""
    a = meta.getattr(inode)
    out = {"chunks": 0, "compacted": 0, "conflicts": 0}
    if not a.is_file:
        return out
    for index in range((a.length + CHUNK_SIZE - 1) // CHUNK_SIZE):
        out["chunks"] += 1
        r = compact_chunk(meta, chunks, inode, index, min_slices)
        if r is True:
            out["compacted"] += 1
        elif r is False:
            out["conflicts"] += 1
    return out


def compact_path(vol, path: str = "/", min_slices: int = 2) -> dict:
    """Compact every file at or under ``path`` of a volume (``Volume.compact``)."""
    total = {"files": 0, "chunks": 0, "compacted": 0, "conflicts": 0}
    a = vol.getattr(path, follow_symlinks=False)
    todo = [(vol.norm(path), a)]
    while todo:
        p, a = todo.pop()
        if a.is_dir:
            todo.extend((posixpath.join(p, n), c) for n, c in vol.meta.readdir(a.inode))
        elif a.is_file:
            total["files"] += 1
            for k, v in compact_inode(vol.meta, vol.chunks, a.inode, min_slices).items():
                total[k] += v
    return total


_compactors: "weakref.WeakSet[Compactor]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for c in list(_compactors):
        c._reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Compactor:
    """Compacts chunks in one background thread, started when there is work and gone when there
    is none. ``request`` is what a Volume sets as ``meta.on_compact``."""

    def __init__(self, meta: "Meta", chunks: "ChunkStore"):
        self.meta = meta
        self.chunks = chunks
        self.compacted = 0
        self.conflicts = 0
        self.failed = 0
        self._reset()
        _compactors.add(self)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending: dict[tuple[int, int], None] = {}
        self._thread: threading.Thread | None = None
        self._busy = False
        self._closed = False

    def request(self, inode: int, index: int, nslices: int = 0) -> None:
        with self._lock:
            if self._closed or (inode, index) in self._pending:
                return
            self._pending[(inode, index)] = None
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name="torchjuice-compact")
                self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                if not self._pending or self._closed:
                    self._thread = None
                    self._idle.notify_all()
                    return
                key = next(iter(self._pending))
                del self._pending[key]
                self._busy = True
            try:
                r = compact_chunk(self.meta, self.chunks, *key)
                if r is True:
                    self.compacted += 1
                elif r is False:
                    self.conflicts += 1
            except Exception as e:         # a missing inode, a store error: try again later
                self.failed += 1
                log.debug("compaction of chunk %s failed: %s", key, e)
            finally:
                with self._lock:
                    self._busy = False
                    self._idle.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no compaction is queued or running; True if so."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._pending and not self._busy, timeout)

    def close(self, timeout: float = 60.0) -> None:
        """Drop queued work and wait for the compaction in progress."""
        with self._lock:
            self._closed = True
            self._pending.clear()
            t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)

    def stats(self) -> dict:
        return {"compactions": self.compacted, "compaction_conflicts": self.conflicts,
                "compaction_failures": self.failed}


__all__ = ["Compactor", "compact_chunk", "compact_inode", "compact_path"]
