"""Garbage collection: objects in the store that no slice refers to.

They leak when a client dies between uploading a slice's blocks and committing the slice (writes
upload first, commit second), when a delete fails, or when compaction is interrupted. gc lists
``NAME/chunks/`` in the store, then reads every reference from the metadata engine (the slices of
every chunk, the trash included since trashed files keep their chunks, plus the slices compaction
replaced and still keeps for a while), and reports the objects nothing refers to. With ``delete``
it removes those older than ``min_age``: a younger object may belong to a write in progress whose
slice is not committed yet, so the safety window must be longer than any upload-to-commit gap.

The store is listed *before* the references are read, so an object uploaded and committed while gc
runs is seen as referenced. Keys that do not parse as a block of this volume are reported as
unknown and never deleted. On a ``file://`` store, the temporary files of uploads cut short by a
crash (invisible to ``list``) are swept the same way, after the same safety window.
"""
from __future__ import annotations

import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from ..object.interface import ObjectInfo
from ..units import human

_KEY = re.compile(r"^(\d+)/(\d+)/(\d+)_(\d+)_(\d+)$")


def parse_block_key(rest: str) -> tuple[int, int, int] | None:
    """``{id//1e6}/{id//1000}/{id}_{index}_{bsize}`` (the part after ``NAME/chunks/``) ->
    ``(id, index, bsize)``, or None when it is not a block key of this layout."""
    m = _KEY.match(rest)
    if not m:
        return None
    a, b, sid, index, bsize = (int(g) for g in m.groups())
    if a != sid // 1_000_000 or b != sid // 1000:
        return None
    return sid, index, bsize


@dataclass
class GCReport:
    objects: int = 0                 # objects listed under NAME/chunks/
    bytes: int = 0
    live: int = 0                    # referenced
    live_bytes: int = 0
    leaked: list[ObjectInfo] = field(default_factory=list)     # unreferenced, old enough
    young: list[ObjectInfo] = field(default_factory=list)      # unreferenced, younger: kept
    unknown: list[str] = field(default_factory=list)           # not a block key: kept
    missing: int = 0                 # referenced blocks the listing did not show (see fsck)
    deleted: int = 0
    deleted_bytes: int = 0
    failed: int = 0                  # deletes that raised
    temp: list[str] = field(default_factory=list)   # file:// temporaries of cut-short uploads

    @property
    def leaked_bytes(self) -> int:
        return sum(o.size for o in self.leaked)

    def summary(self, delete: bool) -> str:
        lines = [f"listed {self.objects} objects ({human(self.bytes)}): {self.live} referenced "
                 f"({human(self.live_bytes)}), {len(self.leaked) + len(self.young)} leaked"]
        lines.append(f"  leaked and older than the safety window: {len(self.leaked)} "
                     f"({human(self.leaked_bytes)})" +
                     (f", deleted {self.deleted} ({human(self.deleted_bytes)})" if delete else
                      " (run with --delete to remove them)"))
        if self.young:
            lines.append(f"  leaked but younger than the safety window (kept): {len(self.young)} "
                         f"({human(sum(o.size for o in self.young))})")
        if self.temp:
            lines.append(f"  temporary files of interrupted uploads: {len(self.temp)}" +
                         (" (deleted)" if delete else ""))
        if self.unknown:
            lines.append(f"  not block keys (kept): {len(self.unknown)}")
        if self.missing:
            lines.append(f"  referenced blocks not found in the listing: {self.missing} "
                         "(run `torchjuice fsck`)")
        if self.failed:
            lines.append(f"  deletes that failed: {self.failed}")
        return "\n".join(lines)


def _temp_files(store, prefix: str, cutoff: float) -> list[str]:
    """Paths of the temporary files a ``file://`` store's interrupted puts left, older than
    ``cutoff`` (epoch seconds)."""
    from ..object.file import TEMP_PREFIX, FileStore
    inner = store
    while not isinstance(inner, FileStore) and hasattr(inner, "inner"):
        inner = inner.inner                     # through wrappers (FaultyStore)
    if not isinstance(inner, FileStore):
        return []
    out = []
    for dirpath, _dirs, files in os.walk(os.path.join(inner.root, *prefix.strip("/").split("/"))):
        for f in files:
            if f.startswith(TEMP_PREFIX):
                p = os.path.join(dirpath, f)
                try:
                    if os.stat(p).st_mtime < cutoff:
                        out.append(p)
                except FileNotFoundError:
                    pass
    return out


def referenced_blocks(vol) -> dict[str, int]:
    """Every block key the metadata refers to -> its size (chunks, trash, delayed slices)."""
    out: dict[str, int] = {}
    slices = list(vol.meta.list_slices()) + list(vol.meta.list_delayed_slices())
    for sid, size in slices:
        for key, bsize in vol.chunks.blocks(sid, size):
            out[key] = bsize
    return out


def gc(vol, delete: bool = False, min_age: float = 3600.0,
       progress: Callable[[int], None] | None = None, threads: int = 8) -> GCReport:
    """Find (and with ``delete``, remove) the objects of ``vol`` nothing refers to. ``progress(n)``
    is called as objects are listed and deleted."""
    prefix = vol.chunks.prefix
    listed: list[ObjectInfo] = []
    for info in vol.store.list(prefix):
        listed.append(info)
        if progress is not None:
            progress(1)
    refs = referenced_blocks(vol)          # after the listing: see the module docstring
    now = time.time()
    r = GCReport()
    seen = set()
    for info in listed:
        r.objects += 1
        r.bytes += info.size
        rest = info.key[len(prefix):]
        if parse_block_key(rest) is None:
            r.unknown.append(info.key)
            continue
        if info.key in refs:
            r.live += 1
            r.live_bytes += info.size
            seen.add(info.key)
        elif now - info.mtime >= min_age:
            r.leaked.append(info)
        else:
            r.young.append(info)
    r.missing = sum(1 for k in refs if k not in seen)
    r.temp = _temp_files(vol.store, prefix, now - min_age)
    if delete:
        for p in r.temp:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
    if delete and r.leaked:
        def rm(info: ObjectInfo) -> bool:
            try:
                vol.store.delete(info.key)
                return True
            except OSError:
                return False
            finally:
                if progress is not None:
                    progress(1)
        with ThreadPoolExecutor(max(1, threads)) as pool:
            for info, ok in zip(r.leaked, pool.map(rm, r.leaked)):
                if ok:
                    r.deleted += 1
                    r.deleted_bytes += info.size
                else:
                    r.failed += 1
    return r


__all__ = ["GCReport", "gc", "parse_block_key", "referenced_blocks"]
