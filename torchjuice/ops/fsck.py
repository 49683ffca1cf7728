"""fsck: is every file whole, and is the namespace consistent?

Checks, on a quiet volume:

* the namespace (:meth:`~torchjuice.meta.base.BaseMeta.check`): entries pointing at missing inodes
  or at inodes of another type, orphaned inodes, nlink counts, parent fields, the usage counters;
* every block every file refers to (the trash included): it exists (HEAD) and, for uncompressed
  volumes, has its size; with ``verify`` it is also read and decompressed;
* sessions whose heartbeat stopped more than ``session_timeout`` seconds ago.

``repair`` fixes the namespace (see :meth:`~torchjuice.meta.base.BaseMeta.repair`: dangling
entries removed, counts and parents set from the tree, orphans linked into ``/lost+found``),
drops stale sessions (freeing the open-but-deleted files they held), and marks each file with
missing or corrupt blocks with the xattr ``user.torchjuice.fsck`` (a JSON list of the bad
blocks). Lost data cannot be repaired: a broken file stays a problem (and ``fsck`` keeps failing)
until it is removed or rewritten. Blocks staged by a write-back client that has not uploaded
them yet are reported missing: run fsck once write-back clients have drained.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from ..meta import ROOT_INODE, TRASH_INODE, TRASH_NAME, TYPE_FILE

XATTR = "user.torchjuice.fsck"


@dataclass
class FsckReport:
    problems: list[str] = field(default_factory=list)         # namespace problems remaining
    repaired: list[str] = field(default_factory=list)         # what repair did
    broken: dict[str, list[str]] = field(default_factory=dict)   # path -> bad blocks
    stale_sessions: list[int] = field(default_factory=list)
    files: int = 0
    blocks: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems and not self.broken and not self.stale_sessions

    def summary(self) -> str:
        lines = [f"checked {self.files} files, {self.blocks} blocks"]
        for p in self.problems:
            lines.append(f"  namespace: {p}")
        for path, bad in sorted(self.broken.items()):
            more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
            lines.append(f"  broken file {path}: {'; '.join(bad[:3])}{more}")
        if self.stale_sessions:
            lines.append(f"  stale sessions: {self.stale_sessions}")
        for r in self.repaired:
            lines.append(f"  repair: {r}")
        lines.append("OK" if self.ok else
                     f"{len(self.problems)} namespace problem(s), {len(self.broken)} broken "
                     f"file(s), {len(self.stale_sessions)} stale session(s)")
        return "\n".join(lines)


def _path_of(ino: int, parents: dict[int, tuple[int, str]]) -> str:
    parts = []
    cur = ino
    for _ in range(10_000):
        if cur in (ROOT_INODE, TRASH_INODE) or cur not in parents:
            break
        cur, name = parents[cur]
        parts.append(name)
    if cur == TRASH_INODE:
        parts.append(TRASH_NAME)
    elif cur != ROOT_INODE:
        parts.append(f"<inode {cur}>")
    return "/" + "/".join(reversed(parts))


def fsck(vol, repair: bool = False, verify: bool = False, progress=None,
         threads: int = 16) -> FsckReport:
    """Check ``vol`` (see the module docstring). ``progress``: a tqdm-like bar (its ``total`` is
    set to the number of blocks, then ``update(1)`` per block) or a callable ``progress(1)``."""
    meta, chunks, store = vol.meta, vol.chunks, vol.store
    r = FsckReport()
    r.problems = meta.check()
    if repair and r.problems:
        r.repaired = meta.repair()
        r.problems = meta.check()

    cutoff = time.time() - meta.session_timeout
    r.stale_sessions = [s["sid"] for s in meta.list_sessions() if s["heartbeat"] < cutoff]
    if repair and r.stale_sessions:
        dropped = meta.clean_stale_sessions(meta.session_timeout)
        r.repaired.append(f"dropped stale sessions {dropped}")
        r.stale_sessions = [s for s in r.stale_sessions if s not in dropped]

    parents: dict[int, tuple[int, str]] = {}
    uses: dict[str, tuple[int, list[int]]] = {}     # block key -> (bsize, inodes)
    for kind, value in meta.dump_iter():
        if kind != "inode":
            continue
        ino, node = value
        for name, child in node.get("entries", {}).items():
            parents[child] = (ino, name)
        if node["typ"] != TYPE_FILE:
            continue
        r.files += 1
        for slices in node.get("chunks", {}).values():
            for _pos, sid, size, _off, _len in slices:
                if sid:
                    for key, bsize in chunks.blocks(sid, size):
                        u = uses.setdefault(key, (bsize, []))
                        if not u[1] or u[1][-1] != ino:
                            u[1].append(ino)
    r.blocks = len(uses)
    tick: Callable[[int], None] | None = progress
    if progress is not None and hasattr(progress, "update"):
        progress.total = len(uses)
        progress.refresh()
        tick = progress.update
    exact = chunks.compressor.name == "none"

    def check(item) -> str | None:
        key, (bsize, _inos) = item
        try:
            if verify:
                body = store.get(key)
                data = chunks.compressor.decompress(body, bsize)
                if len(data) != bsize:
                    return f"{key}: {len(data)} bytes, not {bsize}"
            else:
                info = store.head(key)
                if exact and info.size != bsize:
                    return f"{key}: {info.size} bytes, not {bsize}"
            return None
        except FileNotFoundError:
            return f"{key}: missing"
        except Exception as e:                   # decompression errors, store errors
            return f"{key}: {type(e).__name__}: {e}"
        finally:
            if tick is not None:
                tick(1)

    bad_by_ino: dict[int, list[str]] = {}
    with ThreadPoolExecutor(max(1, threads)) as pool:
        items = list(uses.items())
        for (key, (_b, inos)), err in zip(items, pool.map(check, items)):
            if err is not None:
                for ino in inos:
                    bad_by_ino.setdefault(ino, []).append(err)
    for ino, bad in bad_by_ino.items():
        r.broken[_path_of(ino, parents)] = bad
        if repair:
            try:
                meta.setxattr(ino, XATTR, json.dumps(bad).encode())
                r.repaired.append(f"marked inode {ino} ({_path_of(ino, parents)}) broken")
            except OSError as e:
                r.repaired.append(f"could not mark inode {ino}: {e}")
    return r


__all__ = ["FsckReport", "fsck", "XATTR"]
