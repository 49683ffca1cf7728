"""The hidden control file of a mount, and finding the volume behind a mounted path.

Every mount answers a lookup of ``MOUNTPOINT/.torchjuice`` (not listed by ``readdir``) with a
read-only JSON document: the volume name, its metadata URL, the mount's pid, mountpoint and disk
cache settings. Commands given a path inside a mount (``torchjuice warmup /mnt/jfs/dir``,
``torchjuice stats /mnt/jfs``) read it to reach the same volume through the Python API, with the
same cache directory, so that what they warm is what the mount reads.

This module must not import pyfuse3: the commands that use it run without FUSE.
"""
from __future__ import annotations

import atexit
import json
import os
import threading

CONTROL_NAME = ".torchjuice"
# far above any inode number the metadata engines hand out (they count up from 2)
CONTROL_INODE = 0x7FFF_FFFF_0000_0001


def control_document(vol, mountpoint: str, meta_url: str) -> bytes:
    """The bytes of ``MOUNTPOINT/.torchjuice`` for a mount of ``vol``."""
    cache = vol.chunks.cache
    doc = {"volume": vol.name, "uuid": vol.format.uuid, "meta": meta_url,
           "mountpoint": os.path.abspath(mountpoint), "pid": os.getpid(),
           "cache_dir": None if cache is None else os.path.dirname(cache.dir),
           "volume_cache_dir": vol.cache_dir,
           "cache_size": None if cache is None else cache.capacity,
           "session": getattr(vol.meta, "sid", None)}
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def has_secret(meta_url: str) -> bool:
    """A URL with a password (``redis://:pw@host``): the control file is then readable by the
    mount's owner only."""
    rest = meta_url.split("://", 1)[-1].split("/", 1)[0]
    return "@" in rest and ":" in rest.rsplit("@", 1)[0]


def mount_root(path: str) -> str | None:
    """The mountpoint of the torchjuice mount holding ``path`` (walking up), or None."""
    p = os.path.abspath(path)
    while True:
        if os.path.ismount(p) and os.path.exists(os.path.join(p, CONTROL_NAME)):
            return p
        parent = os.path.dirname(p)
        if parent == p:
            return None
        p = parent


def mount_info(path: str) -> dict | None:
    """The control document of the mount holding ``path``, with ``inner`` (the path inside the
    volume); None when ``path`` is not inside a torchjuice mount."""
    root = mount_root(path)
    if root is None:
        return None
    try:
        with open(os.path.join(root, CONTROL_NAME), "rb") as f:
            info = json.loads(f.read())
    except PermissionError:
        raise PermissionError(
            f"{root} is a torchjuice mount whose control file is readable by its owner only "
            "(its metadata URL holds a password)") from None
    rel = os.path.relpath(os.path.abspath(path), root)
    info["inner"] = "/" if rel == "." else "/" + rel
    info["root"] = root
    return info


_volumes: dict[str, object] = {}
_lock = threading.Lock()


def mounted_volume(path: str):
    """``(Volume, path inside it)`` for a path inside a mount: a connection to the same volume
    with the mount's cache directory and size (closed at exit)."""
    info = mount_info(path)
    if info is None:
        raise FileNotFoundError(2, "not a juice:// URL nor a path inside a torchjuice mount", path)
    key = f"{os.getpid()}|{info['meta']}|{info['cache_dir']}"
    with _lock:
        vol = _volumes.get(key)
        if vol is None or vol.closed:
            from ..volume import connect
            vol = connect(info["meta"], cache_dir=info["cache_dir"],
                          cache_size=info["cache_size"])
            if not _volumes:
                atexit.register(_close_all)
            _volumes[key] = vol
    return vol, info["inner"]


def _close_all() -> None:
    for vol in list(_volumes.values()):
        try:
            vol.close()
        except Exception:
            pass
    _volumes.clear()


__all__ = ["CONTROL_NAME", "CONTROL_INODE", "control_document", "mount_root", "mount_info",
           "mounted_volume"]
