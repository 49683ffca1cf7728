"""The trash of a volume, seen from Python (``Volume.trash_list/trash_restore/trash_empty``).

A removed file (its last link gone by ``remove`` or by a ``rename`` over it) stays in
``/.trash/{YYYY-MM-DD-HH}/{parent}-{inode}-{name}`` for ``trash_days`` (set at format; 0 turns the
trash off), then a background job of a connected client frees it. Until then it can be listed,
read (``vol.open("/.trash/...")``) and restored.
"""
from __future__ import annotations

import errno
import math
import posixpath

from ..errors import oserror
from ..meta import ROOT_INODE, TRASH_INODE, TRASH_NAME


def _dir_path(meta, ino: int, cache: dict) -> str | None:
    """The path of directory ``ino`` now (None if it is gone or in the trash)."""
    if ino in cache:
        return cache[ino]
    parts = []
    cur = ino
    path = None
    for _ in range(1000):
        if cur == ROOT_INODE:
            path = "/" + "/".join(reversed(parts))
            break
        try:
            a = meta.getattr(cur)
        except FileNotFoundError:
            break
        if not a.is_dir or a.parent in (0, TRASH_INODE) or cur == TRASH_INODE:
            break
        name = next((n for n, c in meta.readdir(a.parent) if c.inode == cur), None)
        if name is None:
            break
        parts.append(name)
        cur = a.parent
    cache[ino] = path
    return path


def trash_list(vol) -> list[dict]:
    """Every file in the trash, oldest first: ``path`` (in the volume), ``name`` and ``parent``
    (the name and directory inode it was removed from), ``original`` (that place as a path now,
    or None when the directory is gone), ``inode``, ``size``, ``removed`` (epoch seconds)."""
    meta = vol.meta
    out = []
    dirs: dict = {}
    for hour, h in meta.readdir(TRASH_INODE):
        try:
            entries = meta.readdir(h.inode)
        except FileNotFoundError:           # emptied and removed by a cleanup meanwhile
            continue
        for entry, a in entries:
            try:
                p0, _ino, name = entry.split("-", 2)
                parent = int(p0)
            except ValueError:
                parent, name = 0, entry
            where = _dir_path(meta, parent, dirs) if parent else None
            out.append({"path": f"/{TRASH_NAME}/{hour}/{entry}", "name": name, "parent": parent,
                        "original": None if where is None else posixpath.join(where, name),
                        "inode": a.inode, "size": a.length, "removed": a.ctime})
    out.sort(key=lambda e: (e["removed"], e["path"]))
    return out


def _split_entry(entry: str) -> tuple[str, str]:
    parts = [p for p in entry.split("/") if p]
    if parts and parts[0] == TRASH_NAME:
        parts = parts[1:]
    if len(parts) != 2:
        raise oserror(errno.EINVAL, entry, "expected /.trash/HOUR/ENTRY")
    return parts[0], parts[1]


def trash_restore(vol, entry: str, dst: str | None = None) -> str:
    """Put trashed file ``entry`` (a ``path`` from :func:`trash_list`) back where it was removed
    from, or at ``dst``. Returns the path it now has. FileNotFoundError when its directory is
    gone (give ``dst``), FileExistsError when the name is taken."""
    hour, name = _split_entry(entry)
    meta = vol.meta
    h = meta.lookup(TRASH_INODE, hour)
    if dst is not None:
        parent, new_name, p = vol._split(dst)
        meta.trash_restore(h.inode, name, parent.inode, new_name)
        return p
    a = meta.trash_restore(h.inode, name)
    orig = _dir_path(meta, a.parent, {})
    return posixpath.join(orig, name.split("-", 2)[2]) if orig else f"<inode {a.parent}>"


def trash_empty(vol, older_than_days: float | None = None) -> int:
    """Free trashed files now: all of them, or those of hours that ended more than
    ``older_than_days`` ago. Returns how many."""
    if older_than_days is None:
        return vol.meta.cleanup_trash(now=math.inf, days=0)
    return vol.meta.cleanup_trash(days=older_than_days)


__all__ = ["trash_list", "trash_restore", "trash_empty"]
