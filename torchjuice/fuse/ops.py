"""The POSIX file system: pyfuse3's low-level (inode) operations over a :class:`~torchjuice.Volume`.

The kernel speaks in inodes and so does our metadata engine, so every request maps onto one
:class:`~torchjuice.meta.Meta` call (lookup, getattr, mknod, rename...), with no path translation
and no inode table of our own. Open files are :class:`~torchjuice.vfs.handle.JuiceRawFile` objects
over the volume's block store: the mount reads and writes through the same memory buffer,
readahead and disk cache as the Python API.

One ``JuiceRawFile`` per inode is shared by every kernel file handle of that inode in this mount
(reference-counted), so two descriptors of one file see each other's writes at once, as on a local
file system, and writes commit in the order they were made. ``flush`` (every ``close(2)``) and
``fsync`` commit what was written: close-to-open consistency with other mounts and with the Python
API. ``open`` reads the attributes fresh; the kernel page cache of a file is kept only when its
length, mtime and ctime did not change since this mount last opened it.

Calls that may wait on the network (metadata round trips to Redis/PostgreSQL, reads and deletes
on a remote store, flushes waiting for uploads) run in worker threads (``trio.to_thread``), so one
slow request does not stall the others; quick local ones (SQLite calls, writes into the slice
buffer, reads from a local store or from blocks in the local disk cache) run on the event loop,
where a thread hop would cost more than the call. Errors are ``OSError`` with the errno a local
file system gives, passed to the kernel as ``FUSEError``; anything unexpected is logged and
becomes ``EIO`` (pyfuse3 would otherwise stop the whole mount).

Large sequential I/O (docs/fuse.md, "Performance"): write-only opens use direct I/O (one copy
less per write); read replies come from reused buffers filled by positional reads; the kernel's
``security.capability`` lookup before every write is answered from the open file; the mount
process keeps freed memory (``mount.tune_malloc``), since every write arrives as a fresh 1 MiB
``bytes``.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import stat as _stat
import threading
import time

import pyfuse3
import trio

from ..meta import ROOT_INODE, Attr
from ..vfs.handle import JuiceRawFile
from .control import CONTROL_INODE, CONTROL_NAME, control_document, has_secret

log = logging.getLogger("torchjuice.fuse")

BLKSIZE = 1 << 20           # st_blksize: the I/O size tools should use (one FUSE request)
TOTAL_SPACE = 1 << 50       # no quota: report 1 PiB, as JuiceFS does
TOTAL_INODES = 1 << 32
_CONTROL_NAME_B = CONTROL_NAME.encode()
_CAPS_S = "security.capability"
_CAPS = _CAPS_S.encode()


def _name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _ns(t: float) -> int:
    return int(round(t * 1e9))


def _fuse_errors(fn):
    """OSError -> FUSEError(errno); anything else is logged and becomes EIO."""
    @functools.wraps(fn)
    async def wrapper(self, *args):
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            if e.errno is None:
                log.warning("%s%r failed: %s", fn.__name__, args[:2], e)
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("%s%r failed", fn.__name__, args[:2])
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


class OpenFile:
    """The shared open state of one inode in this mount."""

    __slots__ = ("inode", "raw", "refs", "lock", "order", "dirty", "caps")

    def __init__(self, inode: int, raw: JuiceRawFile):
        self.inode = inode
        self.raw = raw
        self.refs = 0
        self.lock = threading.Lock()      # writes, flushes, truncates: one at a time
        self.order = trio.Lock()          # reads in worker threads: in arrival order (FIFO)
        self.dirty = False                # written since the last flush
        self.caps = None                  # security.capability: None unknown, False absent


class JuiceFuse(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False        # write-through: every write reaches us, in order
    enable_acl = False

    def __init__(self, vol, mountpoint: str, meta_url: str, attr_timeout: float = 1.0,
                 entry_timeout: float = 1.0, dir_entry_timeout: float | None = None):
        super().__init__()
        self.vol = vol
        self.meta = vol.meta
        self.chunks = vol.chunks
        self.attr_timeout = attr_timeout
        self.entry_timeout = entry_timeout
        self.dir_entry_timeout = entry_timeout if dir_entry_timeout is None else dir_entry_timeout
        self._lock = threading.Lock()
        self._files: dict[int, OpenFile] = {}        # inode -> shared open state
        self._handles: dict[int, OpenFile] = {}      # fh -> open state
        self._dirs: dict[int, list] = {}             # dir fh -> [dir attr, entries or None]
        self._control_fhs: set[int] = set()
        self._next_fh = 1
        self._stamps: dict[int, tuple] = {}          # inode -> (length, mtime, ctime) at last open
        self._told: dict[int, tuple] = {}            # inode -> (length, mtime) last given the kernel
        self._owner = (os.getuid(), os.getgid())
        self._control = control_document(vol, mountpoint, meta_url)
        self._control_mode = 0o400 if has_secret(meta_url) else 0o444
        self._started = time.time()
        # reads from a local store (or its page cache) are quick: serve them on the event loop;
        # reads that may wait for the network go to a worker thread
        self.inline_reads = vol.local_store
        self.inline_meta = self.meta.url.startswith(("sqlite3://", "sqlite://"))
        # the volume's readahead (on a local store: the kernel reads the next block files into
        # the page cache while the request round trips go on, so disk and FUSE overlap)
        self.readahead = vol.max_readahead
        self._bufs: list[bytearray] = []             # reply buffers for reads, reused

    # -- helpers -------------------------------------------------------------------------------------
    @staticmethod
    async def _thread(fn, *args):
        return await trio.to_thread.run_sync(fn, *args)

    async def _meta(self, fn, *args):
        """A metadata call: on the event loop for SQLite (a local call; a thread hop would cost
        more CPU than the call), in a worker thread for network engines."""
        if self.inline_meta:
            return fn(*args)
        return await trio.to_thread.run_sync(fn, *args)

    async def _data(self, fn, *args):
        """A call that may also delete or commit blocks (unlink, rename over a file, truncate,
        close): inline only when both the engine and the store are local."""
        if self.inline_meta and self.inline_reads:
            return fn(*args)
        return await trio.to_thread.run_sync(fn, *args)

    def _entry(self, a: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = a.inode
        e.generation = 0
        e.entry_timeout = self.dir_entry_timeout if a.is_dir else self.entry_timeout
        e.attr_timeout = self.attr_timeout
        e.st_mode = a.st_mode
        e.st_nlink = a.nlink
        e.st_uid = a.uid
        e.st_gid = a.gid
        e.st_rdev = 0
        length = a.length
        if a.is_file:
            of = self._files.get(a.inode)
            if of is not None and of.dirty:        # our own writes not yet committed
                length = max(length, of.raw.size())
        e.st_size = length
        if a.is_file:
            if len(self._told) > 1_000_000:
                self._told.clear()
            self._told[a.inode] = (length, a.mtime)
        e.st_blksize = BLKSIZE
        e.st_blocks = ((length + 4095) // 4096) * 8
        e.st_atime_ns = _ns(a.atime)
        e.st_mtime_ns = _ns(a.mtime)
        e.st_ctime_ns = _ns(a.ctime)
        return e

    def _control_entry(self) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = CONTROL_INODE
        e.entry_timeout = e.attr_timeout = 3600
        e.st_mode = _stat.S_IFREG | self._control_mode
        e.st_nlink = 1
        e.st_uid, e.st_gid = self._owner
        e.st_size = len(self._control)
        e.st_blksize = BLKSIZE
        e.st_blocks = (len(self._control) + 511) // 512
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = _ns(self._started)
        return e

    @staticmethod
    def _is_control(parent: int, name: bytes) -> bool:
        return parent == ROOT_INODE and name == _CONTROL_NAME_B

    def _owner_ids(self, parent: int, ctx) -> tuple[int, int, int]:
        """uid, gid and extra mode bits of a new entry: the caller's ids; in a set-group-ID
        directory the directory's group (and, for directories, the set-group-ID bit)."""
        p = self.meta.getattr(parent)
        if p.mode & _stat.S_ISGID:
            return ctx.uid, p.gid, _stat.S_ISGID
        return ctx.uid, ctx.gid, 0

    # -- names ---------------------------------------------------------------------------------------
    @_fuse_errors
    async def lookup(self, parent_inode, name, ctx=None):
        if self._is_control(parent_inode, name):
            return self._control_entry()
        return self._entry(await self._meta(self.meta.lookup, parent_inode, _name(name)))

    async def forget(self, inode_list):
        pass        # inodes live in the engine; nothing is kept per lookup

    @_fuse_errors
    async def getattr(self, inode, ctx=None):
        if inode == CONTROL_INODE:
            return self._control_entry()
        return self._entry(await self._meta(self.meta.getattr, inode))

    @_fuse_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        if inode == CONTROL_INODE:
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._entry(await self._data(self._setattr, inode, attr, fields))

    def _setattr(self, inode, attr, fields) -> Attr:
        a = None
        if fields.update_size:
            size = attr.st_size
            with self._lock:
                of = self._files.get(inode)
            if of is not None:
                with of.lock:
                    of.raw.truncate(size)       # commits pending writes first, then truncates
                    of.dirty = False
            else:
                a = self.meta.truncate(inode, size)
        kw = {}
        if fields.update_mode:
            kw["mode"] = attr.st_mode & 0o7777
        if fields.update_uid:
            kw["uid"] = attr.st_uid
        if fields.update_gid:
            kw["gid"] = attr.st_gid
        if fields.update_atime:
            kw["atime"] = attr.st_atime_ns / 1e9
        if fields.update_mtime:
            kw["mtime"] = attr.st_mtime_ns / 1e9
        if kw or a is None:
            a = self.meta.setattr(inode, **kw)
        return a

    @_fuse_errors
    async def readlink(self, inode, ctx):
        target = await self._meta(self.meta.readlink, inode)
        return target.encode("utf-8", "surrogateescape")

    @_fuse_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        if not _stat.S_ISREG(mode):
            raise pyfuse3.FUSEError(errno.EPERM)   # no devices, fifos or sockets (yet)
        return self._entry(await self._meta(self._create, parent_inode, name, mode, ctx))

    def _create(self, parent, name, mode, ctx) -> Attr:
        if self._is_control(parent, name):
            raise pyfuse3.FUSEError(errno.EEXIST)
        uid, gid, _ = self._owner_ids(parent, ctx)
        return self.meta.create(parent, _name(name), mode & 0o7777, uid, gid)

    @_fuse_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        return self._entry(await self._meta(self._mkdir, parent_inode, name, mode, ctx))

    def _mkdir(self, parent, name, mode, ctx) -> Attr:
        if self._is_control(parent, name):
            raise pyfuse3.FUSEError(errno.EEXIST)
        uid, gid, extra = self._owner_ids(parent, ctx)
        return self.meta.mkdir(parent, _name(name), (mode & 0o7777) | extra, uid, gid)

    @_fuse_errors
    async def symlink(self, parent_inode, name, target, ctx):
        return self._entry(await self._meta(self._symlink, parent_inode, name, target, ctx))

    def _symlink(self, parent, name, target, ctx) -> Attr:
        if self._is_control(parent, name):
            raise pyfuse3.FUSEError(errno.EEXIST)
        uid, gid, _ = self._owner_ids(parent, ctx)
        return self.meta.symlink(parent, _name(name), _name(target), uid, gid)

    @_fuse_errors
    async def unlink(self, parent_inode, name, ctx):
        if self._is_control(parent_inode, name):
            raise pyfuse3.FUSEError(errno.EPERM)
        await self._data(self.meta.unlink, parent_inode, _name(name))

    @_fuse_errors
    async def rmdir(self, parent_inode, name, ctx):
        if self._is_control(parent_inode, name):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        await self._meta(self.meta.rmdir, parent_inode, _name(name))

    @_fuse_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if self._is_control(parent_inode_old, name_old) or \
                self._is_control(parent_inode_new, name_new):
            raise pyfuse3.FUSEError(errno.EPERM)
        await self._data(self.meta.rename, parent_inode_old, _name(name_old), parent_inode_new,
                         _name(name_new), flags)

    @_fuse_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        if inode == CONTROL_INODE or self._is_control(new_parent_inode, new_name):
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._entry(await self._meta(self.meta.link, inode, new_parent_inode,
                                            _name(new_name)))

    # -- files ---------------------------------------------------------------------------------------
    def _new_fh(self, of: OpenFile | None) -> int:
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            if of is not None:
                self._handles[fh] = of
        return fh

    def _open(self, inode: int, flags: int, attr: Attr | None = None) -> tuple[int, bool]:
        """Open ``inode`` for a new kernel file handle; ``(fh, keep_cache)``."""
        a = attr if attr is not None else self.meta.getattr(inode)      # fresh: close-to-open
        if a.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        if not a.is_file:
            raise OSError(errno.EINVAL, "not a regular file")
        stamp = self._stamp(a)
        with self._lock:
            of = self._files.get(inode)
            shared = of is not None
            if not shared:
                of = self._files[inode] = OpenFile(inode, self._raw(a))
            of.refs += 1
        try:
            keep = self._opened(of, a, stamp, shared, flags)
        except BaseException:
            self._drop_ref(of)
            raise
        return self._new_fh(of), keep

    def _opened(self, of: OpenFile, a: Attr, stamp: tuple, shared: bool, flags: int) -> bool:
        inode = a.inode
        if shared and not of.dirty:
            # another handle has it open: pick up what others committed since it was opened
            with of.lock:
                if not of.dirty and (of.raw.size() != a.length or
                                     self._stamps.get(inode) != stamp):
                    old, of.raw = of.raw, self._raw(a)
                    old.close()
        if not of.dirty and self._told.get(inode) != (a.length, a.mtime):
            # the kernel may hold older attributes (another client changed the file): drop them,
            # so that this open sees the new length at once, not after --attr-cache
            try:
                pyfuse3.invalidate_inode(inode, attr_only=True)
            except OSError:
                pass            # the kernel does not know the inode (yet)
        if flags & os.O_TRUNC and a.length:
            with of.lock:
                of.raw.truncate(0)
                of.dirty = False
        keep = self._stamps.get(inode) == stamp and not flags & os.O_TRUNC
        if len(self._stamps) > 100_000:
            self._stamps.clear()
        self._stamps[inode] = stamp
        return keep

    def _drop_ref(self, of: OpenFile) -> None:
        with self._lock:
            of.refs -= 1
            last = of.refs == 0
            if last:
                self._files.pop(of.inode, None)
        if last:
            self._close(of)

    @staticmethod
    def _stamp(a: Attr) -> tuple:
        return (a.length, a.mtime, a.ctime)

    def _raw(self, a: Attr) -> JuiceRawFile:
        return JuiceRawFile(self.meta, self.chunks, a.inode, f"inode {a.inode}", "r+b", a.length,
                            True, True, False, self.readahead)

    @_fuse_errors
    async def open(self, inode, flags, ctx):
        if inode == CONTROL_INODE:
            if flags & os.O_ACCMODE != os.O_RDONLY:
                raise pyfuse3.FUSEError(errno.EACCES)
            fh = self._new_fh(None)
            self._control_fhs.add(fh)
            return pyfuse3.FileInfo(fh=fh, keep_cache=True)
        fh, keep = await self._data(self._open, inode, flags)
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep, direct_io=self._direct(flags))

    def _direct(self, flags: int) -> bool:
        """Write-only opens bypass the kernel page cache (FOPEN_DIRECT_IO): a write(2) is copied
        once, from the caller's memory into our request, instead of into the page cache first.
        A write-only descriptor cannot be mmapped, and the kernel drops cached pages of the
        range from other descriptors, so nothing else changes."""
        return flags & os.O_ACCMODE == os.O_WRONLY

    @_fuse_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        fh, a = await self._data(self._create_open, parent_inode, name, mode, flags, ctx)
        return pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=self._direct(flags)), \
            self._entry(a)

    def _create_open(self, parent, name, mode, flags, ctx) -> tuple[int, Attr]:
        try:
            a = self._create(parent, name, mode, ctx)
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            # made by another client since the kernel looked: open it as open(2) would
            a = self.meta.lookup(parent, _name(name))
            if a.is_symlink:
                raise
            if ctx.uid != 0 and not _may_open(a, flags, ctx):
                raise OSError(errno.EACCES, "permission denied") from None
        fh, _keep = self._open(a.inode, flags, a)
        if flags & os.O_TRUNC:
            a.length = 0
        return fh, a

    def _of(self, fh: int) -> OpenFile:
        try:
            return self._handles[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    @_fuse_errors
    async def read(self, fh, off, size):
        if fh in self._control_fhs:
            return self._control[off: off + size]
        of = self._of(fh)
        if of.dirty:
            # our own writes are pending: commit them first (under the file's lock), then read
            return await self._thread(self._read, of, off, size)
        # a local store, or blocks in the local disk cache: served here, on the event loop (a
        # copy from the host's page cache or disk, cheaper than the hop to a thread and back)
        local = self.inline_reads or (not of.order.locked() and self._cached(of, off, size))
        if local:
            # the reply straight from a mapping of the block's file (the kernel copies from the
            # page cache; no copy of ours), when the read lies in one block
            view = self._mapped(of, off, size)
            if view is not None:
                return view
        # Reply buffers are reused: pyfuse3 sends the reply as soon as this coroutine returns,
        # before any other task runs, so a buffer given back here is free by the time another
        # request takes it (the pool is only touched on the event loop).
        buf = self._bufs.pop() if self._bufs else bytearray(max(size, 1 << 20))
        if len(buf) < size:
            buf = bytearray(size)
        try:
            view = memoryview(buf)[:size]
            if local:
                n = self._pread(of, off, view)
            else:
                # may wait for the network: in a worker thread. One at a time per file, in the
                # order the kernel sent them, so the reader's sequential detection and readahead
                # see a sequential reader; other files' reads go on meanwhile.
                async with of.order:
                    n = await trio.to_thread.run_sync(self._pread, of, off, view)
            return view[:n]
        finally:
            if len(self._bufs) < 16:
                self._bufs.append(buf)

    def _cached(self, of: OpenFile, off: int, size: int) -> bool:
        """Whether every block of this read is in the local disk cache (no engine call: False
        while the chunk's slice list is not loaded yet)."""
        cache = self.chunks.cache
        if cache is None:
            return False
        blocks = of.raw.blocks(off, size)
        return blocks is not None and all(cache.contains(key) for key, _ in blocks)

    @staticmethod
    def _on_raw(of: OpenFile, method: str, *args):
        """``of.raw.<method>(*args)``; again on the fresher handle if that one was closed
        meanwhile (replaced by a reopen)."""
        raw = of.raw
        try:
            return getattr(raw, method)(*args)
        except ValueError:
            if raw is of.raw:           # not a handle replaced by a fresher one meanwhile
                raise
            return getattr(of.raw, method)(*args)

    def _pread(self, of: OpenFile, off: int, view: memoryview) -> int:
        """A positional read of committed data; several may run at once on one file."""
        return self._on_raw(of, "pread_into", off, view)

    def _mapped(self, of: OpenFile, off: int, size: int) -> memoryview | None:
        """The bytes as a view of a mapped block file, or None (``JuiceRawFile.read_mapped``)."""
        return self._on_raw(of, "read_mapped", off, size)

    def _read(self, of: OpenFile, off: int, size: int):
        with of.lock:
            return self._read_locked(of, off, memoryview(bytearray(size)))

    @staticmethod
    def _read_locked(of: OpenFile, off: int, view: memoryview):
        raw = of.raw
        raw.seek(off)
        n = raw.readinto(view)
        of.dirty = False          # readinto committed our pending writes first
        return view[:n]

    @_fuse_errors
    async def write(self, fh, off, buf):
        of = self._of(fh)
        if of.lock.acquire(blocking=False):
            # a write only copies into the slice buffer and queues uploads: done here, without
            # a thread hop (it blocks only when too many uploads are in flight)
            try:
                return self._write_locked(of, off, buf)
            finally:
                of.lock.release()
        return await self._thread(self._write, of, off, buf)

    def _write(self, of: OpenFile, off: int, buf) -> int:
        with of.lock:
            return self._write_locked(of, off, buf)

    @staticmethod
    def _write_locked(of: OpenFile, off: int, buf) -> int:
        of.dirty = True
        raw = of.raw
        raw.seek(off)
        return raw.write(buf)

    @_fuse_errors
    async def flush(self, fh):
        of = self._handles.get(fh)
        if of is not None and of.dirty:
            await self._thread(self._flush, of)

    @staticmethod
    def _flush(of: OpenFile) -> None:
        with of.lock:
            if of.dirty:
                of.raw.flush()
                of.dirty = False

    @_fuse_errors
    async def fsync(self, fh, datasync):
        of = self._handles.get(fh)
        if of is not None:
            await self._thread(self._flush, of)

    @_fuse_errors
    async def release(self, fh):
        with self._lock:
            self._control_fhs.discard(fh)
            of = self._handles.pop(fh, None)
        if of is not None:
            if of.refs > 1:
                self._drop_ref(of)          # not the last: nothing to close
            else:
                await self._data(self._drop_ref, of)

    @staticmethod
    def _close(of: OpenFile) -> None:
        with of.lock:
            of.raw.close()

    # -- directories ---------------------------------------------------------------------------------
    @_fuse_errors
    async def opendir(self, inode, ctx):
        a = await self._meta(self.meta.getattr, inode)
        if not a.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._dirs[fh] = [a, None]
        return fh

    @_fuse_errors
    async def readdir(self, fh, start_id, token):
        d = self._dirs.get(fh)
        if d is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if start_id == 0 or d[1] is None:      # a new listing (or rewinddir): read it fresh
            d[1] = await self._meta(self._listing, d[0])
        entries = d[1]
        for i in range(start_id, len(entries)):
            name, entry = entries[i]
            if not pyfuse3.readdir_reply(token, name, entry, i + 1):
                break

    def _listing(self, a: Attr) -> list:
        dot = pyfuse3.EntryAttributes()
        dot.st_ino = a.inode
        dot.st_mode = _stat.S_IFDIR | 0o755
        dotdot = pyfuse3.EntryAttributes()
        dotdot.st_ino = a.parent or ROOT_INODE
        dotdot.st_mode = _stat.S_IFDIR | 0o755
        out = [(b".", dot), (b"..", dotdot)]
        out.extend((n.encode("utf-8", "surrogateescape"), self._entry(e))
                   for n, e in self.meta.readdir(a.inode))
        return out

    async def releasedir(self, fh):
        self._dirs.pop(fh, None)

    async def fsyncdir(self, fh, datasync):
        pass        # every namespace change is committed when its call returns

    # -- volume --------------------------------------------------------------------------------------
    @_fuse_errors
    async def statfs(self, ctx):
        used, inodes = await self._meta(self.meta.statfs)
        s = pyfuse3.StatvfsData()
        s.f_bsize = BLKSIZE
        s.f_frsize = 4096
        total = max(TOTAL_SPACE, used * 2)
        s.f_blocks = total // 4096
        s.f_bfree = s.f_bavail = (total - used) // 4096
        files = max(TOTAL_INODES, inodes * 2)
        s.f_files = files
        s.f_ffree = s.f_favail = files - inodes
        s.f_namemax = 255
        return s

    # -- xattrs --------------------------------------------------------------------------------------
    @_fuse_errors
    async def setxattr(self, inode, name, value, ctx):
        if inode == CONTROL_INODE:
            raise pyfuse3.FUSEError(errno.EPERM)
        try:
            await self._meta(self.meta.setxattr, inode, _name(name), value)
        finally:
            self._forget_caps(inode, name)

    @_fuse_errors
    async def getxattr(self, inode, name, ctx):
        if inode == CONTROL_INODE:
            raise pyfuse3.FUSEError(errno.ENODATA)
        if name == _CAPS:
            of = self._files.get(inode)
            if of is not None:
                # the kernel asks before every write(2) (to drop capabilities from a modified
                # file): answered from what this open file looked up once, not from the engine
                if of.caps is None:
                    try:
                        of.caps = await self._meta(self.meta.getxattr, inode, _CAPS_S)
                    except OSError as e:
                        if e.errno != errno.ENODATA:
                            raise
                        of.caps = False
                if of.caps is False:
                    raise pyfuse3.FUSEError(errno.ENODATA)
                return of.caps
        return await self._meta(self.meta.getxattr, inode, _name(name))

    @_fuse_errors
    async def listxattr(self, inode, ctx):
        if inode == CONTROL_INODE:
            return []
        names = await self._meta(self.meta.listxattr, inode)
        return [n.encode("utf-8", "surrogateescape") for n in names]

    @_fuse_errors
    async def removexattr(self, inode, name, ctx):
        if inode == CONTROL_INODE:
            raise pyfuse3.FUSEError(errno.EPERM)
        try:
            await self._meta(self.meta.removexattr, inode, _name(name))
        finally:
            self._forget_caps(inode, name)

    def _forget_caps(self, inode: int, name: bytes) -> None:
        if name == _CAPS:
            of = self._files.get(inode)
            if of is not None:
                of.caps = None

    # -- shutdown ------------------------------------------------------------------------------------
    def close_all(self) -> None:
        """Commit and close what the kernel left open (an unmount without releases)."""
        with self._lock:
            files = list(self._files.values())
            self._files.clear()
            self._handles.clear()
        for of in files:
            try:
                of.raw.close()
            except Exception:
                log.exception("closing inode %d at unmount failed", of.inode)


def _may_open(a: Attr, flags: int, ctx) -> bool:
    """Mode-bit check for opening an existing file found by ``create`` (the kernel checked the
    directory, not the file)."""
    acc = flags & os.O_ACCMODE
    want = (4 if acc in (os.O_RDONLY, os.O_RDWR) else 0) | (2 if acc != os.O_RDONLY else 0)
    if ctx.uid == a.uid:
        bits = a.mode >> 6
    elif ctx.gid == a.gid or a.gid in pyfuse3.get_sup_groups(ctx.pid):
        bits = a.mode >> 3
    else:
        bits = a.mode
    return (bits & want) == want


__all__ = ["JuiceFuse"]
