"""``file:///abs/dir``: every object is a file under one local directory.

A key ``a/b/c`` is the file ``DIR/a/b/c``. ``put`` writes a temporary file next to the target and
renames it over (atomic: a reader sees the old object, the new one, or none, never a part). Reads
open the file per call (no shared descriptors: thread- and fork-safe) and ``get_into`` reads with
``preadv`` straight into the caller's buffer.
"""
from __future__ import annotations

import os
import stat as stat_mod
from typing import Iterator

from ..errors import InvalidURLError
from ._url import InvalidKeyError, check_key, check_range, not_found, split_url
from .interface import ObjectInfo, ObjectStore

__all__ = ["FileStore", "InvalidKeyError", "TEMP_PREFIX"]

#: Temporary files (a ``put`` in progress) are named ``TEMP_PREFIX + random``; ``list`` skips them.
TEMP_PREFIX = ".tjtmp."

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_BINARY = getattr(os, "O_BINARY", 0)
_IOV_MAX = 1024                  # buffers per writev (Linux IOV_MAX)


def _write_all(fd: int, views: list[memoryview]) -> None:
    """Write every buffer of ``views``, in order (``writev``, resumed after a short write)."""
    i = 0
    while i < len(views):
        n = os.writev(fd, views[i:i + _IOV_MAX])
        while i < len(views) and n >= len(views[i]):
            n -= len(views[i])
            i += 1
        if n:
            views[i] = views[i][n:]


class FileStore(ObjectStore):
    def __init__(self, url: str):
        netloc, path, _query = split_url(url, "file")
        if netloc not in ("", "localhost"):
            raise InvalidURLError(f"file store URL must be file:///absolute/dir, got {url!r}")
        if not path or not os.path.isabs(path):
            raise InvalidURLError(f"file store URL needs an absolute directory: {url!r}")
        self.url = url
        self.root = os.path.normpath(path)

    # ---- helpers ----
    def _path(self, key: str) -> str:
        check_key(key)
        if key.rsplit("/", 1)[-1].startswith(TEMP_PREFIX):
            raise InvalidKeyError(f"invalid object key {key!r}: reserved name")
        return f"{self.root}/{key}" if os.sep == "/" else os.path.join(self.root, *key.split("/"))

    def _open_read(self, key: str) -> int:
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | _O_CLOEXEC | _O_BINARY)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise not_found(key) from None
        try:
            if stat_mod.S_ISDIR(os.fstat(fd).st_mode):
                raise not_found(key)
        except BaseException:
            os.close(fd)
            raise
        return fd

    # ---- interface ----
    def create(self) -> None:
        os.makedirs(self.root, exist_ok=True)

    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        self.put_pieces(key, [data])

    def put_pieces(self, key: str, pieces: list) -> None:
        """``put`` of the concatenation of ``pieces`` (buffers), written as they are."""
        path = self._path(key)
        parent = os.path.dirname(path)
        views = []
        for p in pieces:
            view = memoryview(p)
            if view.ndim != 1 or view.format != "B":
                view = view.cast("B")
            if view:
                views.append(view)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC | _O_BINARY
        for attempt in range(3):
            tmp = os.path.join(parent, TEMP_PREFIX + os.urandom(8).hex())
            try:
                fd = os.open(tmp, flags, 0o666)
            except FileNotFoundError:
                if attempt == 2:
                    raise
                os.makedirs(parent, exist_ok=True)
                continue
            break
        try:
            try:
                _write_all(fd, views)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def get(self, key: str, off: int = 0, limit: int = -1) -> bytes:
        check_range(off, limit)
        fd = self._open_read(key)
        try:
            if limit < 0:
                limit = max(0, os.fstat(fd).st_size - off)
            if limit == 0:
                return b""
            data = os.pread(fd, limit, off)
            if len(data) == limit or not data:
                return data
            # a short read before the end (rare): collect the rest
            parts = [data]
            got = len(data)
            while got < limit:
                more = os.pread(fd, limit - got, off + got)
                if not more:
                    break
                parts.append(more)
                got += len(more)
            return b"".join(parts)
        finally:
            os.close(fd)

    def get_into(self, key: str, buf: memoryview, off: int = 0) -> int:
        check_range(off, 0)
        view = memoryview(buf)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        fd = self._open_read(key)
        try:
            got, n = 0, len(view)
            while got < n:
                k = os.preadv(fd, [view[got:]], off + got)
                if k <= 0:
                    break
                got += k
            return got
        finally:
            os.close(fd)

    def advise(self, key: str) -> bool:
        try:
            fd = os.open(self._path(key), os.O_RDONLY | _O_CLOEXEC | _O_BINARY)
        except OSError:
            return False                  # the reader will see the error
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)    # starts the reads, returns
            return True
        except (OSError, AttributeError):                    # no posix_fadvise (macOS)
            return False
        finally:
            os.close(fd)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError):
            pass
        except IsADirectoryError:   # a "directory" key is no object
            pass
        except PermissionError as e:
            # Linux reports EISDIR; some systems report EPERM for unlink(dir)
            if not os.path.isdir(path):
                raise e

    def head(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            raise not_found(key) from None
        if stat_mod.S_ISDIR(st.st_mode):
            raise not_found(key)
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        dirpart = prefix.rpartition("/")[0]
        if dirpart:
            try:
                check_key(dirpart)
            except InvalidKeyError:
                return iter(())      # no key can live under such a prefix
            start = os.path.join(self.root, *dirpart.split("/"))
            rel = dirpart + "/"
        else:
            start, rel = self.root, ""
        return self._walk(start, rel, prefix)

    def _walk(self, dirpath: str, rel: str, prefix: str) -> Iterator[ObjectInfo]:
        try:
            with os.scandir(dirpath) as it:
                entries = []
                for e in it:
                    if e.name.startswith(TEMP_PREFIX):
                        continue
                    try:
                        is_dir = e.is_dir()
                    except OSError:
                        continue
                    # a directory sorts as "name/" so keys come out in plain string order
                    entries.append((e.name + "/" if is_dir else e.name, is_dir, e))
        except (FileNotFoundError, NotADirectoryError):
            return
        entries.sort(key=lambda t: t[0])
        for name, is_dir, e in entries:
            full = rel + name
            if is_dir:
                if full.startswith(prefix) or prefix.startswith(full):
                    yield from self._walk(e.path, full, prefix)
            elif full.startswith(prefix):
                try:
                    st = e.stat()
                except FileNotFoundError:   # deleted while listing
                    continue
                yield ObjectInfo(full, st.st_size, st.st_mtime)

    def __reduce__(self):
        return (type(self), (self.url,))

    def local_path(self, key: str) -> str:
        """The local file that holds object ``key`` (it may not exist). An object's file is never
        rewritten in place -- ``put`` renames a new file over it, ``delete`` unlinks it -- so a
        memory mapping of one stays valid, its bytes unchanged, after either."""
        return self._path(key)
