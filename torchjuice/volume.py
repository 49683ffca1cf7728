"""``format`` and ``connect``: the :class:`Volume` object users hold, and ``juice://`` URLs.

A volume is a metadata engine (which holds the settings, see :class:`~torchjuice.meta.Format`)
plus an object store. ``format`` writes the settings and registers the name in
``$TORCHJUICE_HOME/volumes.json`` (default ``~/.torchjuice``) so that ``connect("NAME")`` and
``juice://NAME/...`` URLs find it.
"""
from __future__ import annotations

import array
import errno
import io
import itertools
import json
import os
import posixpath
import re

import threading
import uuid as _uuid
import weakref
from typing import Iterator, Sequence

import xxhash

from .chunk.store import ChunkStore
from .errors import (AlreadyFormattedError, ClosedVolumeError, InvalidURLError, NotFormattedError,
                     PathEscapeError, VolumeMismatchError, oserror)
from .meta import (CHUNK_SIZE, RENAME_EXCHANGE, RENAME_NOREPLACE, ROOT_INODE, TYPE_DIR,
                   TYPE_FILE, Attr, Format, Meta, new_meta, unpack_attr, unpack_slices)
from .object import create_store
from .units import parse_size
from .vfs.handle import JuiceRawFile, open_flags
from .vfs.reader import FileReader
from .vfs.writer import PackWriter

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
BUFFER_SIZE = 1 << 20       # the io.Buffered* buffer: small reads and writes are batched this far
CACHE_FILL_MODES = ("skip", "wait", "adaptive", "direct")        # see Volume.cache_fill
WRITE_MANY_BATCH = 64       # write_many: files made new per metadata transaction (held in memory)


# -- where volumes live ----------------------------------------------------------------------------
def home() -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get("TORCHJUICE_HOME", "~/.torchjuice")))


def _registry_path() -> str:
    return os.path.join(home(), "volumes.json")


_registry_cache: tuple = (None, None, {})       # (path, (mtime_ns, size), contents)


def _read_registry() -> dict:
    """The registry, re-read only when the file changed (``juice://`` calls resolve through it)."""
    global _registry_cache
    path = _registry_path()
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return {}
    stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
    if _registry_cache[0] == path and _registry_cache[1] == stamp:
        return dict(_registry_cache[2])
    try:
        with open(path) as f:
            reg = json.load(f)
    except FileNotFoundError:
        return {}
    except ValueError as e:
        raise NotFormattedError(f"volume registry {path} is corrupt: {e}") from None
    _registry_cache = (path, stamp, reg)
    return dict(reg)


def _register(name: str, meta_url: str) -> None:
    reg = _read_registry()
    reg[name] = meta_url
    os.makedirs(home(), exist_ok=True)
    tmp = f"{_registry_path()}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(reg, f, indent=1, sort_keys=True)
    os.replace(tmp, _registry_path())


def find_meta_url(name_or_url: str, meta: str | None = None) -> str:
    """The engine URL for a volume name: ``meta`` if given, else ``$TORCHJUICE_META``, else the
    registry kept by ``format``. A string with ``://`` is already an engine URL."""
    if meta:
        return meta
    if "://" in name_or_url:
        return name_or_url
    env = os.environ.get("TORCHJUICE_META")
    if env:
        return env
    url = _read_registry().get(name_or_url)
    if url is None:
        raise NotFormattedError(
            f"no volume named {name_or_url!r}: format it with `torchjuice format {name_or_url}`, "
            "or pass meta=/set TORCHJUICE_META to its metadata URL")
    return url


def volume_names(meta_url: str | None = None) -> list[str]:
    """The volumes ``juice://`` URLs can name: the one a metadata engine URL holds, else those
    the registry lists."""
    if meta_url:
        m = new_meta(meta_url)
        try:
            return [m.load().name]
        finally:
            m.close()
    return sorted(_read_registry())


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidURLError(f"invalid volume name {name!r}: use 1-63 letters, digits, '.', '_' "
                              "or '-', starting with a letter or digit")
    return name


# -- format ------------------------------------------------------------------------------------------
def format(meta_url: str | None, name: str, storage: str | None = None, block_size: int = 4 << 20,
           compression: str | None = None, trash_days: int = 1, force: bool = False) -> Format:
    """Create a volume: store its settings in the metadata engine and register its name.

    With no ``meta_url`` the volume is embedded under ``$TORCHJUICE_HOME/NAME`` (SQLite + a local
    directory). Formatting an engine that already holds a volume needs ``force=True``, which
    updates the settings and keeps every file (the name and uuid cannot change)."""
    check_name(name)
    if not meta_url:
        meta_url = f"sqlite3://{os.path.join(home(), name, 'meta.db')}"
        os.makedirs(os.path.join(home(), name), exist_ok=True)
    if not storage:
        storage = f"file://{os.path.join(home(), name, 'data')}"
    if block_size < 64 << 10 or block_size > 64 << 20 or block_size & (block_size - 1):
        raise InvalidURLError(f"block size {block_size} must be a power of two in [64K, 64M]")
    from .chunk.compress import new_compressor
    new_compressor(compression)          # validates the name
    meta = new_meta(meta_url)
    try:
        try:
            old = meta.load()
        except NotFormattedError:
            old = None
        if old is not None:
            if not force:
                raise AlreadyFormattedError(
                    f"{meta_url} already holds volume {old.name!r}; use --force/force=True to "
                    "update its settings")
            if old.name != name:
                raise AlreadyFormattedError(
                    f"{meta_url} holds volume {old.name!r}, cannot rename it to {name!r}")
        store = create_store(storage)
        try:
            store.create()
            probe = f"{name}/.torchjuice-probe-{_uuid.uuid4().hex}"
            store.put(probe, b"ok")
            if store.get(probe) != b"ok":
                raise OSError(errno.EIO, f"storage {storage} returned other bytes than written")
            store.delete(probe)
        finally:
            store.close()
        fmt = Format(name=name, uuid=old.uuid if old else str(_uuid.uuid4()), storage=storage,
                     block_size=block_size, compression=(compression or "none").lower(),
                     trash_days=trash_days)
        meta.init(fmt, force=force)
    finally:
        meta.close()
    _register(name, meta_url)
    return fmt


def connect(meta_url_or_name: str, cache_dir: str | None = None, cache_size: int | None = None,
            **options) -> "Volume":
    """Open a formatted volume by engine URL or registered name."""
    url = find_meta_url(meta_url_or_name, options.pop("meta", None))
    meta = new_meta(url)
    try:
        fmt = meta.load()
        if "://" not in meta_url_or_name and fmt.name != meta_url_or_name:
            raise VolumeMismatchError(
                f"volume {meta_url_or_name!r} resolves to {url}, which holds volume {fmt.name!r}")
        store = create_store(fmt.storage)
    except BaseException:
        meta.close()
        raise
    try:
        return Volume(meta, fmt, store, cache_dir=cache_dir, cache_size=cache_size, **options)
    except BaseException:
        meta.close()
        store.close()
        raise


# -- the volume ----------------------------------------------------------------------------------
def _named(e: OSError, path: str) -> OSError:
    """``e`` with the caller's spelling of the path; errors without an errno (a lost engine:
    ConnectionError) pass through unchanged."""
    if e.errno is None or isinstance(e, ConnectionError):
        return e
    return oserror(e.errno, path)


def _stat_result(a: Attr) -> os.stat_result:
    return os.stat_result((a.st_mode, a.inode, 0, a.nlink, a.uid, a.gid, a.length,
                           int(a.atime), int(a.mtime), int(a.ctime),
                           a.atime, a.mtime, a.ctime))


def _attr_sum(raw) -> int:
    """A digest of an inode's raw attributes, 63 bits (-1: the inode is gone)."""
    return -1 if raw is None else xxhash.xxh3_64_intdigest(raw) >> 1


def _add_to_run(runs: list, key: str, bsize: int, item: int, rng: tuple[int, int]) -> None:
    """Add ``item``'s range ``(offset, length)`` of block ``key`` to ``runs``: items that follow
    one another in a batch and lie in the same block form one run, ``(key, bsize, items,
    ranges)``, read together (``ChunkStore.read_ranges_bytes``)."""
    if runs and runs[-1][0] == key:
        runs[-1][2].append(item)
        runs[-1][3].append(rng)
    else:
        runs.append((key, bsize, [item], [rng]))


class Listing:
    """Where the bytes of each regular file under a directory lay when :meth:`Volume.list_tree`
    listed it, for :meth:`Volume.read_listed`: file ``i`` (in path order) has its inode, a digest
    of its attributes, the directory it was found in and -- for a file whose bytes are one range
    of one block (a small file, or one packed with others) -- that block and offset. Each
    directory keeps the inodes and attribute digests of its path from the root. Arrays, so that
    a DataLoader worker inherits a few objects whatever the number of files, and pickling is
    fast."""

    def __init__(self):
        self.inode = array.array("q")
        self.attr = array.array("q")      # _attr_sum of the file's attributes
        self.dir = array.array("i")       # index into self.dirs
        self.sid = array.array("q")       # slice id of the file's one block; 0: read by path
        self.index = array.array("i")     # that block's index in its slice, its size, the offset
        self.bsize = array.array("q")
        self.off = array.array("q")
        self.length = array.array("q")
        self.dirs: list[tuple[tuple[int, ...], tuple[int, ...]]] = []   # (inodes, digests)
        self.usable = True                # False: the path to the top went through a symlink
        self.changes = -1                 # the volume's attr_changes() before it was listed

    def __len__(self) -> int:
        return len(self.inode)


class Volume:
    """A connected volume: paths are absolute inside it (``/a/b``); relative paths start at the
    root; ``..`` may not climb above it."""

    def __init__(self, meta: Meta, fmt: Format, store, *, cache_dir: str | None = None,
                 cache_size: int | str | None = None, cache_free_ratio: float = 0.1,
                 buffer_size: int = 256 << 20, max_readahead: int | None = None,
                 writeback: bool = False, cache_writes: bool = True, upload_threads: int = 16,
                 download_threads: int = 16, max_inflight: int = 256 << 20, session: bool = True,
                 stats_interval: float = 5.0):
        self.meta = meta
        self.format = fmt
        self.name = fmt.name
        self.store = store
        # blocks on this machine (a file:// or mem:// store): no network latency to hide, so no
        # disk cache by default, and reads are not handed to threads; their readahead (32 MiB)
        # only asks the kernel to read the next block files (ChunkStore.prefetch)
        self.local_store = fmt.storage.startswith(("file://", "mem://"))
        remote = not self.local_store
        cache = self._disk_cache(fmt, cache_dir, cache_size, cache_free_ratio, remote or writeback)
        if max_readahead is None:
            max_readahead = 64 << 20 if remote else 32 << 20
        self.max_readahead = max_readahead
        self.chunks = ChunkStore(store, fmt.name, fmt.block_size, fmt.compression,
                                 upload_threads=upload_threads, download_threads=download_threads,
                                 max_inflight=max_inflight, cache=cache, buffer_size=buffer_size,
                                 cache_writes=cache_writes, writeback=writeback)
        meta.on_delete_slices = self.chunks.delete_slices
        from .ops.compact import Compactor
        self.compactor = Compactor(meta, self.chunks)      # chunks with many slices, rewritten
        meta.on_compact = self.compactor.request
        self._files: weakref.WeakSet = weakref.WeakSet()     # open file objects, closed with us
        self._lock = threading.Lock()
        self.closed = False
        self.listed_direct = 0      # read_listed: files read from the listed block
        self.listed_by_path = 0     # ... and by path (changed since, or not one block)
        if session:
            meta.session_stats = self.metrics
            meta.heartbeat_interval = stats_interval
            meta.new_session({"pid": os.getpid(), "host": os.uname().nodename})

    @staticmethod
    def _disk_cache(fmt: Format, cache_dir, cache_size, free_ratio: float, default_on: bool):
        """The local block cache. On by default for remote stores (``$TORCHJUICE_HOME/cache``,
        10 GiB); off for ``file://``/``mem://`` stores unless a ``cache_dir`` is given, since
        their blocks are local already. ``cache_size=0`` turns it off."""
        from .chunk.disk import DiskCache
        cache_dir = cache_dir or os.environ.get("TORCHJUICE_CACHE_DIR")
        if cache_size is None:
            cache_size = os.environ.get("TORCHJUICE_CACHE_SIZE")
        if isinstance(cache_size, str):
            cache_size = parse_size(cache_size)
        if cache_size == 0 or (cache_dir is None and not default_on):
            return None
        return DiskCache(cache_dir or os.path.join(home(), "cache"), fmt.uuid,
                         10 << 30 if cache_size is None else cache_size, free_ratio)

    def __repr__(self) -> str:
        return f"<Volume {self.name!r} meta={self.meta.url!r} storage={self.format.storage!r}>"

    def __enter__(self) -> "Volume":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Flush and close every open file, end the session, release connections."""
        if self.closed:
            return
        self.closed = True
        try:
            for f in list(self._files):
                try:
                    f.close()
                except Exception:
                    pass
            self.compactor.close()
            self.chunks.close()
        finally:
            try:
                self.meta.close()
            finally:
                self.store.close()

    def _check(self) -> None:
        if self.closed:
            raise ClosedVolumeError(f"volume {self.name!r} is closed")

    # -- paths -------------------------------------------------------------------------------------
    def norm(self, path: str) -> str:
        """``/a/b`` for any spelling of a path inside the volume; ``..`` above the root is an error."""
        self._check()
        if isinstance(path, os.PathLike):
            path = os.fspath(path)
        if not isinstance(path, str):
            raise TypeError(f"path must be str, not {type(path).__name__}")
        if path[:1] == "/" and path[-1:] != "/" and "//" not in path and "/." not in path \
                and "\0" not in path:
            return path                   # already normal (the common case: a dataset's paths)
        if "\0" in path:
            raise oserror(errno.EINVAL, path, "NUL in path")
        parts: list[str] = []
        for p in path.split("/"):
            if p in ("", "."):
                continue
            if p == "..":
                if not parts:
                    raise PathEscapeError(f"path {path!r} climbs above the root of volume "
                                          f"{self.name!r}", filename=path)
                parts.pop()
            else:
                parts.append(p)
        return "/" + "/".join(parts)

    def _split(self, path: str) -> tuple[Attr, str, str]:
        """(parent attr, last name, normalised path); the root itself has no parent."""
        p = self.norm(path)
        if p == "/":
            raise oserror(errno.EPERM, p, "operation not permitted on the root")
        head, name = posixpath.split(p)
        return self._resolve(head, path), name, p

    def _resolve(self, p: str, shown: str | None = None, follow: bool = True) -> Attr:
        try:
            return self.meta.resolve(p, follow=follow)
        except OSError as e:
            if e.filename is None:
                raise _named(e, shown or p) from None
            raise type(e)(e.errno, e.strerror, shown or p) from None

    def _attr(self, path: str, follow: bool = True) -> Attr:
        return self._resolve(self.norm(path), path, follow)

    def _slices(self, path: str) -> tuple[Attr, list]:
        """A file's attributes and every chunk's slice list, in one transaction
        (``Meta.resolve_slices``); errors name ``path``."""
        try:
            return self.meta.resolve_slices(self.norm(path))
        except OSError as e:
            if e.filename is None:
                raise _named(e, path) from None
            raise type(e)(e.errno, e.strerror, path) from None

    # -- files ---------------------------------------------------------------------------------------
    def open(self, path: str, mode: str = "r", buffering: int = -1, encoding: str | None = None,
             errors: str | None = None, newline: str | None = None, *, readahead: bool = True):
        """Open a file like the built-in ``open``: binary modes give buffered binary files, text
        modes an ``io.TextIOWrapper``. ``buffering=0`` gives the raw file (binary only).
        ``readahead=False``: no prefetch for this handle (a caller that plans its own reads)."""
        bmode, read, write, append, create, trunc, excl = open_flags(mode)
        text = "b" not in mode
        if buffering == 0 and text:
            raise ValueError("can't have unbuffered text I/O")
        attr, p = self._open_attr(path, create, excl, trunc)
        raw = JuiceRawFile(self.meta, self.chunks, attr.inode, p, bmode, attr.length,
                           read, write, append, self.max_readahead if readahead else 0)
        if buffering == 0:
            self._files.add(raw)
            return raw
        size = buffering if buffering > 1 else BUFFER_SIZE
        if read and write:
            f = io.BufferedRandom(raw, size)
        elif write:
            f = io.BufferedWriter(raw, size)
        else:
            f = io.BufferedReader(raw, size)
        if text:
            f = io.TextIOWrapper(f, encoding or "utf-8", errors, newline,
                                 line_buffering=buffering == 1)
            f.mode = mode
        self._files.add(f)          # the outermost object: closing it flushes its buffer too
        return f

    def _open_attr(self, path: str, create: bool, excl: bool, trunc: bool) -> tuple[Attr, str]:
        """The file ``open`` works on, created or truncated as the flags say, and its path."""
        parent, name, p = self._split(path)
        for attempt in range(5):
            attr = None
            try:
                attr = self.meta.lookup(parent.inode, name)
                if attr.is_symlink:
                    attr = self._resolve(p, path)
            except FileNotFoundError:
                if not create:
                    raise oserror(errno.ENOENT, path) from None
            except NotADirectoryError as e:                 # the parent is a file
                raise _named(e, path) from None
            if attr is not None and excl:
                raise oserror(errno.EEXIST, path)
            try:
                if attr is None:
                    try:
                        attr = self.meta.create(parent.inode, name)
                    except FileExistsError:
                        if excl:
                            raise oserror(errno.EEXIST, path) from None
                        attr = self._resolve(p, path)
                if attr.is_dir:
                    raise oserror(errno.EISDIR, path)
                if trunc and attr.length:
                    attr = self.meta.truncate(attr.inode, 0)
                return attr, p
            except FileNotFoundError:
                # another client removed the file between our look and our create/truncate:
                # with O_CREAT the name is free again, so look once more
                if not create or attempt == 4:
                    raise oserror(errno.ENOENT, path) from None
        raise AssertionError("unreachable")

    def read_bytes(self, path: str) -> bytes:
        """The whole content of a file, as ``bytes``.

        Cheaper than ``open`` + ``read``: one metadata transaction resolves the path and reads
        the length and slice lists together (``Meta.resolve_slices``), there is no open-file
        bookkeeping, and a file held in one block (small files) comes back as the very ``bytes``
        object the disk cache or the store produced. Larger files are read block-parallel into one
        buffer. Close-to-open: each call sees every file closed before it. A block that vanishes
        under the read (the file was rewritten, compacted or removed meanwhile) makes it look
        again, once: the result is a version the file had, or ``FileNotFoundError``."""
        seen = missing = None
        for _attempt in range(3):
            attr, chunks = self._slices(path)
            if missing is not None and seen == (attr, chunks):
                raise missing           # nothing changed: the block is really missing
            if attr.is_dir:
                raise oserror(errno.EISDIR, path)
            try:
                return self._read_whole(attr, chunks)
            except FileNotFoundError as e:
                seen, missing = (attr, chunks), e
        raise missing

    def read_many(self, paths: Sequence[str]) -> list[bytes]:
        """:meth:`read_bytes` of every path, in order: one metadata transaction for them all (a
        batch of small files, e.g. a DataLoader's), then each file's bytes -- files that lie in
        one block (packed by :meth:`write_many`) read from it together. The first path that
        fails raises, as ``read_bytes`` would (nothing is returned for the others)."""
        found = self.meta.resolve_slices_many([self.norm(p) for p in paths])
        out: list = [None] * len(paths)
        runs: list[tuple[str, int, list[int], list[tuple[int, int]]]] = []   # one block's files
        for i, got in enumerate(found):
            if isinstance(got, OSError) or got[0].is_dir:
                out[i] = self.read_bytes(paths[i])          # raises, naming the path
                continue
            where = self._in_one_block(*got)
            if where is None:
                out[i] = self._read_whole_or_again(paths[i], got)
            else:
                _add_to_run(runs, where[0], where[1], i, where[2:])
        for i in self._read_runs(runs, out):            # changed under us: look again, each
            out[i] = self._read_whole_or_again(paths[i], found[i])
        return out

    def _read_runs(self, runs: list, out: list) -> list[int]:
        """Read each run of ``runs`` (see :func:`_add_to_run`) with one cache or store call into
        ``out``; returns the items of runs whose block is gone (their file changed meanwhile)."""
        gone: list[int] = []
        for key, bsize, items, ranges in runs:
            try:
                datas = self.chunks.read_ranges_bytes(key, bsize, ranges)
            except FileNotFoundError:
                gone += items
                continue
            for i, data in zip(items, datas):
                out[i] = data
        return gone

    def list_tree(self, top: str = "/") -> tuple[list[tuple[str, int]], Listing]:
        """``(path, size)`` of every regular file under directory ``top`` (recursive; symlinks
        not followed), sorted by path, and a :class:`Listing` of them for :meth:`read_listed`.
        Each directory is read in one metadata transaction: its entries, their attributes and
        where the bytes of its small files lie."""
        top = self.norm(top)
        changes = self.meta.attr_changes()      # before anything is read
        inos: list[int] = []
        sums: list[int] = []
        ino, usable = ROOT_INODE, True
        names = top.strip("/").split("/") if top != "/" else []
        for k, name in enumerate(names):        # the path down to top: each directory's
            inos.append(ino)                    # attributes, read before its entry is looked up
            sums.append(_attr_sum(self.meta.raw_attrs([ino])[0]))
            try:
                a = self.meta.lookup(ino, name)
            except OSError as e:
                raise _named(e, top) from None
            if not a.is_dir:                    # a symlink on the way: listed, read by path
                a, usable = self._attr("/" + "/".join(names[:k + 1])), False
                if not a.is_dir:
                    raise oserror(errno.ENOTDIR, top)
            ino = a.inode
        found: list[tuple] = []
        lst = Listing()
        lst.usable = usable
        lst.changes = changes
        stack = [(top, ino, tuple(inos), tuple(sums))]
        while stack:
            d, dino, inos_, sums_ = stack.pop()
            try:
                raw, entries = self.meta.readdir_files(dino)
            except FileNotFoundError:
                continue                        # removed since its parent was read
            inos_, sums_ = inos_ + (dino,), sums_ + (_attr_sum(raw),)
            k = len(lst.dirs)
            lst.dirs.append((inos_, sums_))
            base = d if d.endswith("/") else d + "/"
            for ename, (typ, inode, rawattr, slices) in entries.items():
                p = base + ename.decode("utf-8", "surrogateescape")
                if typ == TYPE_DIR:
                    stack.append((p, inode, inos_, sums_))
                elif typ == TYPE_FILE and rawattr is not None:
                    a = unpack_attr(inode, rawattr)
                    where = self._block_of(a, [unpack_slices(slices)]) \
                        if a.length <= CHUNK_SIZE else None
                    found.append((p, a.length, inode, _attr_sum(rawattr), k, where))
        found.sort(key=lambda f: f[0])
        for p, n, inode, digest, k, where in found:
            sid, index, bsize, off = where or (0, 0, 0, 0)
            lst.inode.append(inode)
            lst.attr.append(digest)
            lst.dir.append(k)
            lst.sid.append(sid)
            lst.index.append(index)
            lst.bsize.append(bsize)
            lst.off.append(off)
            lst.length.append(n)
        return [(p, n) for p, n, *_ in found], lst

    def read_listed(self, listing: Listing, indices: Sequence[int],
                    paths: Sequence[str]) -> list[bytes]:
        """``read_many(paths)``, where ``paths[k]`` is file ``indices[k]`` of ``listing`` (from
        :meth:`list_tree`), with one metadata read for them all instead of a path resolution
        each: a small file whose attributes, and those of every directory on its path, are
        still as listed is read from the block the listing recorded -- any change to a file's
        content changes its attributes, and any change to a directory's entries the
        directory's, so this is the file as it is now (close-to-open holds). The others are
        read by path. While the volume's count of attribute changes is still the one read
        before the listing, no attributes changed: that one read stands for them all."""
        L = listing
        fast = [i for i in indices if L.sid[i]] if L.usable else []
        if not fast:
            self.listed_by_path += len(indices)
            return self.read_many(paths)
        dirs = {L.dir[i] for i in fast}
        want = {L.inode[i] for i in fast}
        for d in dirs:
            want.update(L.dirs[d][0])
        want = list(want)
        now = same_dir = None
        raws = self.meta.raw_attrs(want, since=L.changes)
        if raws is not None:
            now = dict(zip(want, map(_attr_sum, raws)))
            same_dir = {d: all(now[i] == s for i, s in zip(*L.dirs[d])) for d in dirs}
        cs = self.chunks
        out: list = [None] * len(indices)
        runs: list[tuple[str, int, list[int], list[tuple[int, int]]]] = []   # one block's files
        slow: list[int] = []
        block = key = None
        for k, i in enumerate(indices):
            sid = L.sid[i]
            if not sid or now is not None and (not same_dir[L.dir[i]] or
                                               now[L.inode[i]] != L.attr[i]):
                slow.append(k)
                continue
            if (sid, L.index[i]) != block:      # files side by side share their block's key
                block = sid, L.index[i]
                key = cs.key(sid, L.index[i], L.bsize[i])
            _add_to_run(runs, key, L.bsize[i], k, (L.off[i], L.length[i]))
        slow += self._read_runs(runs, out)      # a block gone (compacted since): by path
        if slow:
            slow.sort()
            for k, data in zip(slow, self.read_many([paths[k] for k in slow])):
                out[k] = data
        self.listed_by_path += len(slow)
        self.listed_direct += len(indices) - len(slow)
        return out

    def prefetch_files(self, paths: Sequence[str], max_bytes: int) -> tuple[int, int, int]:
        """Start fetching, in the background, the blocks that small files a reader will read next
        share with each other (files packed by :meth:`write_many`: one GET serves many of them),
        resolving ``paths`` in order in one metadata transaction, until ``max_bytes`` of files
        are covered. Returns ``(paths covered, shared blocks seen, downloads started)``. Blocks
        already in memory or in the local cache are not fetched again; a file alone in its
        blocks is left to its own read, which returns the GET's bytes without a copy; missing
        paths are skipped (the read reports them). For ``JuiceDataset``'s readahead."""
        found = self.meta.resolve_slices_many([self.norm(p) for p in paths])
        count: dict[tuple[str, int], int] = {}          # block -> how many of the files it holds
        covered = 0
        for got in found:
            if max_bytes <= 0:
                break
            covered += 1
            if isinstance(got, OSError) or not got[0].is_file:
                continue
            max_bytes -= got[0].length
            where = self._in_one_block(*got)
            if where is not None:
                count[where[:2]] = count.get(where[:2], 0) + 1
        shared = [b for b, n in count.items() if n > 1]
        return covered, len(shared), self.chunks.prefetch(shared)

    def _read_whole_or_again(self, path: str, got) -> bytes:
        try:
            return self._read_whole(*got)
        except FileNotFoundError:                      # changed under us: look again
            return self.read_bytes(path)

    def _in_one_block(self, attr: Attr, chunks: list):
        """``(block key, block size, offset, length)`` of a non-empty file whose bytes are one
        range of one block (a small file, or one packed with others); else None."""
        where = self._block_of(attr, chunks)
        if where is None:
            return None
        sid, index, bsize, boff = where
        return self.chunks.key(sid, index, bsize), bsize, boff, attr.length

    def _block_of(self, attr: Attr, chunks: list):
        """``(slice id, block index, block size, offset)`` of :meth:`_in_one_block`'s block."""
        n = attr.length
        if n == 0 or len(chunks) != 1 or len(chunks[0]) != 1:
            return None
        s = chunks[0][0]
        bs = self.chunks.block_size
        if n > bs or not s.id or s.pos != 0 or s.len < n:
            return None
        index, boff = divmod(s.off, bs)
        bsize = min(bs, s.size - index * bs)
        if boff + n > bsize:
            return None
        return s.id, index, bsize, boff

    def _read_whole(self, attr: Attr, chunks: list) -> bytes:
        n = attr.length
        if n == 0:
            return b""
        cs = self.chunks
        where = self._in_one_block(attr, chunks)
        if where is not None:           # the file, or its range of a packed block: no buffer
            return cs.read_range_bytes(*where)
        reader = FileReader(self.meta, cs, attr.inode, 0)
        for index, slices in enumerate(chunks):
            reader.set_slices(index, slices)
        buf = bytearray(n)
        reader.read_into(0, memoryview(buf), n)          # holes read as zeros
        return bytes(buf)

    def write_bytes(self, path: str, data) -> int:
        with self.open(path, "wb", buffering=0) as f:
            return f.write(data)

    @property
    def pack_max(self) -> int:
        """The largest file :meth:`write_many` packs by default: a quarter of the block size."""
        return self.chunks.block_size // 4

    def write_many(self, items, *, pack_max: int | None = None, progress=None) -> int:
        """Write many whole files: ``items`` is a mapping or an iterable of ``(path, data)``;
        each file is created or replaced, as :meth:`write_bytes` would. Returns the bytes written.

        Small files (at most ``pack_max`` bytes; default a quarter of the block size, 0 to
        disable) are packed: consecutive ones share one block object, each file referring to its
        range of it (the object is deleted with the last of them). A dataset of 100 KiB files then
        costs one PUT per ~40 files, and reading it back one GET per ~40 files whose block lands
        in the local cache for its neighbours. Larger files are written one by one. Packed files
        are visible when their pack is committed, all of them before this returns; a failure
        leaves the files not yet committed empty (their objects are collected by ``gc``).
        ``progress(nbytes)`` is called per file."""
        limit = self.pack_max if pack_max is None else min(pack_max, self.chunks.block_size)
        packer = PackWriter(self.meta, self.chunks)
        total = 0
        it = iter(items.items() if hasattr(items, "items") else items)
        try:
            while True:
                batch = list(itertools.islice(it, WRITE_MANY_BATCH))
                if not batch:
                    break
                made = self._create_new(batch)
                for k, (path, data) in enumerate(batch):
                    if not isinstance(data, (bytes, bytearray)):
                        data = memoryview(data).cast("B")
                    n = len(data)
                    attr = made.get(k)
                    if attr is None:                    # it exists (or a bad path: raises here)
                        attr, _p = self._open_attr(path, True, False, True)   # emptied
                        if attr.inode in packer.waiting:    # written twice: commit the first
                            packer.flush()                  # one, then empty the file again
                            attr, _p = self._open_attr(path, True, False, True)
                    if 0 < n <= limit:
                        packer.add(attr.inode, data)
                    elif n:
                        self.write_bytes(path, data)
                    total += n
                    if progress is not None:
                        progress(n)
        finally:
            packer.flush()
        return total

    def _create_new(self, batch: list) -> dict[int, Attr]:
        """The files of ``batch`` (``(path, data)`` pairs) that do not exist yet, created empty,
        one metadata transaction per directory (``Meta.create_files``): index -> attributes.
        Anything else -- a file that exists, a bad path, a missing directory -- is left to the
        one-by-one path, which replaces the file or raises the error naming the path."""
        groups: dict[str, list[tuple[int, str]]] = {}
        for k, (path, _data) in enumerate(batch):
            try:
                p = self.norm(path)
            except (OSError, ValueError, TypeError):
                continue
            head, name = posixpath.split(p)
            if name:
                groups.setdefault(head, []).append((k, name))
        made: dict[int, Attr] = {}
        for head, members in groups.items():
            try:
                d = self._resolve(head)
                if not d.is_dir:
                    continue
                attrs = self.meta.create_files(d.inode, [name for _, name in members])
            except OSError:
                continue
            made.update((k, a) for (k, _), a in zip(members, attrs) if a is not None)
        return made

    # -- names ---------------------------------------------------------------------------------------
    def stat(self, path: str, follow_symlinks: bool = True) -> os.stat_result:
        return _stat_result(self._attr(path, follow_symlinks))

    def lstat(self, path: str) -> os.stat_result:
        return self.stat(path, follow_symlinks=False)

    def getattr(self, path: str, follow_symlinks: bool = True) -> Attr:
        """The engine's attributes (inode, type, length, nlink...)."""
        return self._attr(path, follow_symlinks)

    def exists(self, path: str) -> bool:
        try:
            self._attr(path)
            return True
        except (FileNotFoundError, NotADirectoryError):
            return False

    def isdir(self, path: str) -> bool:
        try:
            return self._attr(path).is_dir
        except (FileNotFoundError, NotADirectoryError):
            return False

    def isfile(self, path: str) -> bool:
        try:
            return self._attr(path).is_file
        except (FileNotFoundError, NotADirectoryError):
            return False

    def scandir(self, path: str = "/") -> list[tuple[str, Attr]]:
        """``(name, Attr)`` of every entry, sorted by name, in one metadata call."""
        a = self._attr(path)
        if not a.is_dir:
            raise oserror(errno.ENOTDIR, path)
        return self.meta.readdir(a.inode)

    def listdir(self, path: str = "/") -> list[str]:
        return [name for name, _ in self.scandir(path)]

    def walk(self, top: str = "/") -> Iterator[tuple[str, list[str], list[str]]]:
        """Like ``os.walk`` (top-down); symlinks to directories are not followed."""
        top = self.norm(top)
        try:
            entries = self.scandir(top)
        except OSError:
            return
        dirs = [n for n, a in entries if a.is_dir]
        files = [n for n, a in entries if not a.is_dir]
        yield top, dirs, files
        for d in dirs:
            yield from self.walk(posixpath.join(top, d))

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        parent, name, _ = self._split(path)
        try:
            self.meta.mkdir(parent.inode, name, mode)
        except OSError as e:
            raise _named(e, path) from None

    def makedirs(self, path: str, mode: int = 0o755, exist_ok: bool = False) -> None:
        p = self.norm(path)
        if p == "/":
            if not exist_ok:
                raise oserror(errno.EEXIST, path)
            return
        cur = self.meta.getattr(ROOT_INODE)
        parts = p.strip("/").split("/")
        for i, name in enumerate(parts):
            last = i == len(parts) - 1
            try:
                cur = self.meta.lookup(cur.inode, name)
                if cur.is_symlink:
                    cur = self._resolve("/" + "/".join(parts[: i + 1]))
                if not cur.is_dir:
                    raise oserror(errno.EEXIST if last else errno.ENOTDIR, path)
                if last and not exist_ok:
                    raise oserror(errno.EEXIST, path)
            except FileNotFoundError:
                try:
                    cur = self.meta.mkdir(cur.inode, name, mode)
                except FileExistsError:        # made by someone else meanwhile
                    cur = self.meta.lookup(cur.inode, name)
                    if not cur.is_dir:
                        raise oserror(errno.EEXIST, path) from None

    def remove(self, path: str) -> None:
        parent, name, _ = self._split(path)
        try:
            self.meta.unlink(parent.inode, name)
        except OSError as e:
            raise _named(e, path) from None

    unlink = remove

    def rmdir(self, path: str) -> None:
        parent, name, _ = self._split(path)
        try:
            self.meta.rmdir(parent.inode, name)
        except OSError as e:
            raise _named(e, path) from None

    def rmtree(self, path: str) -> None:
        """Remove a directory and everything under it (or a single file)."""
        a = self._attr(path, follow=False)
        if not a.is_dir:
            return self.remove(path)
        p = self.norm(path)
        for name, child in self.meta.readdir(a.inode):
            sub = posixpath.join(p, name)
            if child.is_dir:
                self.rmtree(sub)
            else:
                self.remove(sub)
        self.rmdir(p)

    def rename(self, src: str, dst: str, flags: int = 0) -> None:
        """Atomic rename, replacing ``dst`` when it is a file or an empty directory (as
        ``os.replace``). ``flags``: ``RENAME_NOREPLACE`` / ``RENAME_EXCHANGE`` (from this module)."""
        sp, sn, _ = self._split(src)
        dp, dn, _ = self._split(dst)
        try:
            self.meta.rename(sp.inode, sn, dp.inode, dn, flags)
        except OSError as e:
            raise _named(e, src) from None

    replace = rename

    def symlink(self, target: str, path: str) -> None:
        parent, name, _ = self._split(path)
        try:
            self.meta.symlink(parent.inode, name, target)
        except OSError as e:
            raise _named(e, path) from None

    def readlink(self, path: str) -> str:
        a = self._attr(path, follow=False)
        if not a.is_symlink:
            raise oserror(errno.EINVAL, path, "not a symbolic link")
        return self.meta.readlink(a.inode)

    def link(self, src: str, dst: str) -> None:
        a = self._attr(src, follow=False)
        parent, name, _ = self._split(dst)
        try:
            self.meta.link(a.inode, parent.inode, name)
        except OSError as e:
            raise _named(e, dst) from None

    def truncate(self, path: str, length: int) -> None:
        if length < 0:
            raise oserror(errno.EINVAL, path, "negative length")
        a = self._attr(path)
        if a.is_dir:
            raise oserror(errno.EISDIR, path)
        self.meta.truncate(a.inode, length)

    def chmod(self, path: str, mode: int) -> None:
        self.meta.setattr(self._attr(path).inode, mode=mode & 0o7777)

    def utime(self, path: str, times: tuple[float, float] | None = None) -> None:
        import time
        atime, mtime = times if times is not None else (time.time(),) * 2
        self.meta.setattr(self._attr(path).inode, atime=atime, mtime=mtime)

    def setxattr(self, path: str, key: str, value: bytes, flags: int = 0) -> None:
        self.meta.setxattr(self._attr(path).inode, key, bytes(value), flags)

    def getxattr(self, path: str, key: str) -> bytes:
        return self.meta.getxattr(self._attr(path).inode, key)

    def listxattr(self, path: str) -> list[str]:
        return self.meta.listxattr(self._attr(path).inode)

    def removexattr(self, path: str, key: str) -> None:
        self.meta.removexattr(self._attr(path).inode, key)

    # -- volume-wide ---------------------------------------------------------------------------------
    def statfs(self) -> dict:
        used, inodes = self.meta.statfs()
        return {"used_bytes": used, "used_inodes": inodes}

    @property
    def cache_fill(self) -> str:
        """How the local disk cache is filled by reads. ``"skip"`` (the default): in the
        background; when the fill is behind (more than its buffer, 64 MiB, waiting to be written)
        a block is not cached this time, so a single pass is never slowed by the cache.
        ``"wait"``: the read waits for room instead (5 s at most), so a pass that will be read
        again, such as a DataLoader's epochs, runs at the speed the cache fills and leaves it
        whole; blocks go through the page cache (the next pass reads them from memory).
        ``"adaptive"``: waits as ``"wait"``; blocks go through the page cache while the filler
        keeps up and with ``O_DIRECT`` once it is a quarter of its buffer behind, as in
        ``"skip"`` (on a busy machine, new page-cache memory can cost more CPU than the read
        itself) -- for large files read in whole blocks, which are read back from the disk at
        its speed; packed small files want ``"wait"``.
        ``"direct"``: as ``"wait"``, but blocks are written with ``O_DIRECT`` -- for data sets
        larger than the page cache, where filling it only evicts what the next epoch would have
        wanted (and costs CPU). In every mode, a whole cached block that is not in the page
        cache is read with ``O_DIRECT``. The datasets pick ``"wait"``, ``"adaptive"`` or
        ``"direct"`` (see ``JuiceDataset``)."""
        return self.chunks.cache_fill

    @cache_fill.setter
    def cache_fill(self, mode: str) -> None:
        if mode not in CACHE_FILL_MODES:
            raise ValueError(f"cache_fill must be one of {', '.join(CACHE_FILL_MODES)}, "
                             f"not {mode!r}")
        self.chunks.cache_fill = mode

    @property
    def get_count(self) -> int:
        """Object-store GETs of this client so far: ``metrics()["get_count"]``, without
        gathering the rest (a data loader asks after every batch)."""
        return self.chunks.metrics.get_count

    def metrics(self) -> dict:
        """Counters of this client: object GET/PUT counts, bytes and seconds, memory-buffer and
        disk-cache hits and misses, prefetches, cache usage."""
        out = self.chunks.stats()
        out.update(self.compactor.stats())
        out["listed_direct"], out["listed_by_path"] = self.listed_direct, self.listed_by_path
        return out

    # -- operations (torchjuice.ops; docs/operations.md) ----------------------------------------------
    def compact(self, path: str = "/") -> dict:
        """Compact every file at or under ``path`` now: chunks of several slices are rewritten as
        one slice per run of data, content unchanged."""
        from .ops.compact import compact_path
        return compact_path(self, path)

    def trash_list(self) -> list[dict]:
        """The files in ``/.trash``, oldest first (see :func:`torchjuice.ops.trash.trash_list`)."""
        from .ops.trash import trash_list
        return trash_list(self)

    def trash_restore(self, entry: str, dst: str | None = None) -> str:
        """Put a trashed file back where it was, or at ``dst``; returns its path."""
        from .ops.trash import trash_restore
        return trash_restore(self, entry, dst)

    def trash_empty(self, older_than_days: float | None = None) -> int:
        """Free trashed files now (all, or those older than ``older_than_days``)."""
        from .ops.trash import trash_empty
        return trash_empty(self, older_than_days)

    @property
    def cache_dir(self) -> str | None:
        """This volume's directory in the local disk cache (None: no disk cache)."""
        return None if self.chunks.cache is None else self.chunks.cache.dir

    def warmup(self, paths, progress=None) -> dict:
        """Fill the local disk cache with every block of the given files (directories: every
        file under them). ``progress`` is a tqdm-like object: its ``total`` is set to the bytes
        to warm, then ``update(nbytes)`` is called as blocks land. Returns a summary."""
        import time as _time
        t0 = _time.perf_counter()
        blocks = []
        for path in [paths] if isinstance(paths, str) else paths:
            blocks.extend(self._blocks_of(path))
        total = sum(b for _, b in blocks)
        if progress is not None:
            progress.total = total
            progress.refresh()
        fetched, nbytes = self.chunks.warm(blocks, None if progress is None else progress.update)
        return {"blocks": len(blocks), "downloaded_blocks": fetched, "downloaded_bytes": nbytes,
                "bytes": total, "seconds": _time.perf_counter() - t0}

    def _blocks_of(self, path: str) -> list[tuple[str, int]]:
        a = self._attr(path)
        if a.is_dir:
            p = self.norm(path)
            return [b for name, _ in self.meta.readdir(a.inode)
                    for b in self._blocks_of(posixpath.join(p, name))]
        if not a.is_file:
            return []
        out = []
        for index in range((a.length + CHUNK_SIZE - 1) // CHUNK_SIZE):
            for s in self.meta.read_chunk(a.inode, index):
                if s.id:
                    out.extend(self.chunks.blocks(s.id, s.size))
        return list(dict.fromkeys(out))

    def local_blocks(self, path: str, offset: int, length: int, *,
                     inode: int | None = None, verify: bool = True) -> list[tuple]:
        """Where bytes ``[offset, offset+length)`` of a file lie in local files: pieces
        ``(file_offset, length, local_path, local_offset)`` in file order, covering the range
        (clipped to the file's size). ``local_path`` holds the piece's bytes uncompressed, at
        ``local_offset``, and verified (a ``file://`` store's own object, or a disk-cache file
        whose checksum was just checked); None where they are not local -- holes, blocks not
        cached, compressed objects -- and must be read as usual (``open``).

        For memory-mapping a file's bytes (``torchjuice.models``): these files are never rewritten
        in place (eviction, compaction and deletion unlink them, replacements are renamed over
        them), so a mapping stays valid after any of that. ``inode``: the file must still be this
        inode (else ``OSError(ESTALE)``: it was replaced).

        ``verify=False``: the disk cache's files are not checked here; each piece gets a fifth
        element, ``check``: None where nothing needs checking (a piece not local; a store's own
        object, whose size the caller checks on the file it opens: it may be short or gone),
        else an object whose ``check(view, local_offset)`` verifies the bytes the caller holds of
        that file -- hashed in place, e.g. through the caller's mapping of it, so nothing is read
        twice -- and returns False (the file dropped as corrupt: read the piece as usual,
        which fetches it again) when they are not the block's. Until it said True, they are not
        to be used."""
        from .vfs.reader import merge_slices
        a, chunks = self._slices(path)
        if a.is_dir:
            raise oserror(errno.EISDIR, path)
        if inode is not None and a.inode != inode:
            raise OSError(errno.ESTALE, f"{path} was replaced", path)
        offset = max(0, offset)
        end = min(offset + max(0, length), a.length)
        if end <= offset:
            return []
        if not self.chunks.has_local_blocks():
            return [(offset, end - offset, None, 0) + (() if verify else (None,))]
        bs = self.chunks.block_size
        raw: list[tuple[int, int, str | None, int, int]] = []  # (foff, n, block key, bsize, boff)
        for index in range(offset // CHUNK_SIZE, (end - 1) // CHUNK_SIZE + 1):
            base = index * CHUNK_SIZE
            lo, hi = max(offset, base) - base, min(end, base + CHUNK_SIZE) - base
            pos = lo
            for start, stop, sid, size, soff in merge_slices(chunks[index]):
                if stop <= pos:
                    continue
                if start >= hi:
                    break
                if start > pos:
                    raw.append((base + pos, start - pos, None, 0, 0))
                    pos = start
                upto = min(stop, hi)
                if sid == 0:
                    raw.append((base + pos, upto - pos, None, 0, 0))
                else:
                    so = soff + (pos - start)           # slice-object offset of pos
                    while pos < upto:
                        bi, boff = divmod(so, bs)
                        bsize = min(bs, size - bi * bs)
                        n = min(bsize - boff, upto - pos)
                        raw.append((base + pos, n, self.chunks.key(sid, bi, bsize), bsize, boff))
                        pos += n
                        so += n
                pos = upto
            if pos < hi:
                raw.append((base + pos, hi - pos, None, 0, 0))
        keys = list(dict.fromkeys((key, bsize) for _, _, key, bsize, _ in raw if key))
        where = dict(zip((k for k, _ in keys), self.chunks.local_blocks(keys, verify=verify)))
        if verify:
            return [(foff, n, where[key] if key else None, boff)
                    for foff, n, key, _, boff in raw]
        out = []
        for foff, n, key, _, boff in raw:
            got = where[key] if key else None
            out.append((foff, n, got[0], boff, got[1]) if got else (foff, n, None, boff, None))
        return out

    def info(self, path: str) -> dict:
        """Inode, size, and the chunks, slices and objects behind a file (``torchjuice info``)."""
        a = self._attr(path, follow=False)
        out = {"path": self.norm(path), "inode": a.inode, "type": _type_name(a), "size": a.length,
               "mode": oct(a.mode), "nlink": a.nlink, "mtime": a.mtime}
        if a.is_file:
            chunks = []
            for index in range((a.length + CHUNK_SIZE - 1) // CHUNK_SIZE):
                slices = self.meta.read_chunk(a.inode, index)
                chunks.append({"index": index, "slices": [
                    {"pos": s.pos, "id": s.id, "size": s.size, "off": s.off, "len": s.len,
                     "objects": [k for k, _ in self.chunks.blocks(s.id, s.size)] if s.id else []}
                    for s in slices]})
            out["chunks"] = chunks
        elif a.is_dir:
            out["entries"] = len(self.meta.readdir(a.inode))
        else:
            out["target"] = self.meta.readlink(a.inode)
        return out


def _type_name(a: Attr) -> str:
    return {TYPE_FILE: "file", TYPE_DIR: "directory"}.get(a.typ, "symlink")


# -- juice:// URLs ---------------------------------------------------------------------------------
_volumes: dict[str, Volume] = {}
_volumes_lock = threading.Lock()


def split_url(url: str) -> tuple[str, str]:
    """``juice://VOL/a/b`` -> ``("VOL", "/a/b")``."""
    if not isinstance(url, str) or not url.startswith("juice://"):
        raise InvalidURLError(f"not a juice:// URL: {url!r} (expected juice://VOLUME/path)")
    rest = url[len("juice://"):]
    vol, _, path = rest.partition("/")
    if not vol:
        raise InvalidURLError(f"juice:// URL without a volume name: {url!r}")
    return check_name(vol), "/" + path


def volume_for(name: str, meta: str | None = None) -> Volume:
    """A shared, process-wide :class:`Volume` for a ``juice://`` volume name (connected once;
    reconnected in a forked child)."""
    url = find_meta_url(name, meta)
    key = f"{os.getpid()}|{name}|{url}"
    with _volumes_lock:
        vol = _volumes.get(key)
        if vol is not None and not vol.closed:
            return vol
    vol = connect(url)
    if vol.name != name:
        found = vol.name
        vol.close()
        raise VolumeMismatchError(
            f"URL names volume {name!r} but {url} holds volume {found!r}")
    with _volumes_lock:
        old = _volumes.get(key)
        if old is not None and not old.closed:
            vol.close()
            return old
        _volumes[key] = vol
    return vol


def open_url(url: str, mode: str = "rb", meta: str | None = None, **kwargs):
    """``open`` for a ``juice://VOL/path`` URL."""
    name, path = split_url(url)
    return volume_for(name, meta).open(path, mode, **kwargs)


__all__ = ["Volume", "format", "connect", "split_url", "volume_for", "open_url", "find_meta_url",
           "home", "check_name", "volume_names", "RENAME_NOREPLACE", "RENAME_EXCHANGE"]
