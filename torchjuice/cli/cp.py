"""``torchjuice cp``: copy between local paths and ``juice://`` URLs, with a progress bar.

Semantics follow ``cp``: copying onto an existing directory puts the source inside it;
directories need ``-r``. Bytes move through one reused buffer (``readinto``), never a whole file,
except small files copied into a volume: those are read whole and packed several to a block
object (``Volume.write_many``).
"""
from __future__ import annotations

import errno
import os
import posixpath
import time

from .. import volume as _volume
from ..errors import oserror

COPY_BUFFER = 8 << 20


class _Local:
    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.label = path

    def join(self, *parts: str) -> "_Local":
        return _Local(os.path.join(self.path, *parts))

    def basename(self) -> str:
        return os.path.basename(self.path.rstrip("/"))

    def isdir(self) -> bool:
        return os.path.isdir(self.path)

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def files(self):
        """(relative path, size) of every file under this directory, sorted."""
        out = []
        for root, dirs, files in os.walk(self.path):
            dirs.sort()
            for f in sorted(files):
                full = os.path.join(root, f)
                out.append((os.path.relpath(full, self.path), os.path.getsize(full)))
        return out

    def size(self) -> int:
        return os.path.getsize(self.path)

    def makedirs(self) -> None:
        os.makedirs(self.path, exist_ok=True)

    def open(self, mode: str):
        if "w" in mode:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        return open(self.path, mode, buffering=0)

    def read_all(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()


class _Juice:
    def __init__(self, url: str, vol=None, path: str | None = None):
        if vol is None:
            name, path = _volume.split_url(url)
            vol = _volume.volume_for(name)
            path = vol.norm(path)
        self.vol, self.path, self.label = vol, path, url

    def join(self, *parts: str) -> "_Juice":
        p = posixpath.join(self.path, *[x.replace(os.sep, "/") for x in parts])
        return _Juice(f"juice://{self.vol.name}{p}", self.vol, p)

    def basename(self) -> str:
        return posixpath.basename(self.path)

    def isdir(self) -> bool:
        return self.vol.isdir(self.path)

    def exists(self) -> bool:
        return self.vol.exists(self.path)

    def files(self):
        out = []
        for root, _dirs, names in self.vol.walk(self.path):
            for name, attr in self.vol.scandir(root):
                if not attr.is_dir:
                    full = posixpath.join(root, name)
                    out.append((posixpath.relpath(full, self.path), attr.length))
        return sorted(out)

    def size(self) -> int:
        return self.vol.stat(self.path).st_size

    def makedirs(self) -> None:
        self.vol.makedirs(self.path, exist_ok=True)

    def open(self, mode: str):
        if "w" in mode:
            self.vol.makedirs(posixpath.dirname(self.path), exist_ok=True)
        return self.vol.open(self.path, mode, buffering=0)

    def read_all(self) -> bytes:
        return self.vol.read_bytes(self.path)


def endpoint(spec: str):
    return _Juice(spec) if spec.startswith("juice://") else _Local(spec)


def copy(src: str, dst: str, recursive: bool = False, progress: bool = True):
    """Copy ``src`` to ``dst``; returns ``(files, bytes, seconds)``."""
    s, d = endpoint(src), endpoint(dst)
    if not s.exists():
        raise oserror(errno.ENOENT, src)
    if s.isdir():
        if not recursive:
            raise oserror(errno.EISDIR, src, "use -r to copy a directory")
        if d.exists() and d.isdir() and not src.endswith("/"):
            d = d.join(s.basename())
        d.makedirs()
        jobs = [(s.join(rel), d.join(rel), size) for rel, size in s.files()]
    else:
        if d.exists() and d.isdir() or dst.endswith("/"):
            d = d.join(s.basename())
        jobs = [(s, d, s.size())]
    total = sum(j[2] for j in jobs)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=f"cp {len(jobs)} file(s)", leave=True)
    t0 = time.perf_counter()
    copied = 0
    nfiles = len(jobs)
    try:
        if isinstance(d, _Juice):
            vol = d.vol
            small = [j for j in jobs if j[2] <= vol.pack_max]
            jobs = [j for j in jobs if j[2] > vol.pack_max]
            for parent in sorted({posixpath.dirname(b.path) for _, b, _ in small}):
                vol.makedirs(parent, exist_ok=True)
            copied += vol.write_many(((b.path, a.read_all()) for a, b, _ in small),
                                     progress=bar.update if bar is not None else None)
        buf = bytearray(min(COPY_BUFFER, max(total, 1)))
        view = memoryview(buf)
        for a, b, _ in jobs:
            with a.open("rb") as fin, b.open("wb") as fout:
                while True:
                    n = fin.readinto(view)
                    if not n:
                        break
                    done = 0
                    while done < n:          # a local file may take fewer bytes than offered
                        done += fout.write(view[done:n])
                    copied += n
                    if bar is not None:
                        bar.update(n)
    finally:
        if bar is not None:
            bar.close()
    return nfiles, copied, time.perf_counter() - t0
