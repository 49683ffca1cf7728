"""The metadata interface every engine implements.

Layout and semantics follow JuiceFS (``pkg/meta/interface.go``): inodes with attributes, directory
entries, the slice list of every 64 MiB chunk, counters handed out in batches, sessions. Engines
(SQL, Redis) only provide transactions over a small key/value model; the file-system logic lives
once, in :mod:`torchjuice.meta.base`.

All names are ``str`` (one path component, no ``/``, not ``.``/``..``). All errors are built-in
``OSError`` subclasses with the errno a local file system would give.
"""
from __future__ import annotations

import json
import stat as _stat
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

CHUNK_SIZE = 64 << 20          # a file is cut into chunks of this many bytes
ROOT_INODE = 1
#: the trash directory, ``/.trash`` (reachable by path, not listed in the root; JuiceFS's number).
#: Its subdirectories, one per hour (``YYYY-MM-DD-HH`` in UTC), are inodes ``TRASH_INODE + 1 +
#: hours since the epoch``; a removed file sits there as ``{parent}-{inode}-{name}``.
TRASH_INODE = 0x7FFFFFFF10000000
TRASH_NAME = ".trash"

TYPE_FILE = 1
TYPE_DIR = 2
TYPE_SYMLINK = 3

# rename flags, as in renameat2(2)
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

# setxattr flags, as in setxattr(2)
XATTR_CREATE = 1
XATTR_REPLACE = 2

_TYPE_BITS = {TYPE_FILE: _stat.S_IFREG, TYPE_DIR: _stat.S_IFDIR, TYPE_SYMLINK: _stat.S_IFLNK}


@dataclass
class Attr:
    """Attributes of one inode. ``mode`` holds permission bits only (0o7777); ``typ`` the type."""

    inode: int
    typ: int
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    atime: float = 0.0
    mtime: float = 0.0
    ctime: float = 0.0
    nlink: int = 1
    length: int = 0
    parent: int = 0           # parent directory inode (0 once a file has several hard links)

    @property
    def is_dir(self) -> bool:
        return self.typ == TYPE_DIR

    @property
    def is_file(self) -> bool:
        return self.typ == TYPE_FILE

    @property
    def is_symlink(self) -> bool:
        return self.typ == TYPE_SYMLINK

    @property
    def st_mode(self) -> int:
        """``mode`` with the type bits, as ``os.stat_result.st_mode``."""
        return _TYPE_BITS[self.typ] | (self.mode & 0o7777)


@dataclass(frozen=True)
class Slice:
    """One write inside a chunk: bytes ``[off, off+len)`` of slice object ``id`` (whose blocks hold
    ``size`` bytes in all) placed at ``pos`` inside the chunk. ``id == 0`` is a hole: zeros."""

    pos: int
    id: int
    size: int
    off: int
    len: int


@dataclass
class Format:
    """A volume's settings, stored in its metadata engine at format time."""

    name: str
    uuid: str
    storage: str
    block_size: int = 4 << 20
    compression: str = "none"       # none | lz4 | zstd
    trash_days: int = 1
    version: int = 1
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Format":
        data = json.loads(text)
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


class Meta(ABC):
    """A metadata engine holding one volume.

    Every method that changes the namespace is one transaction. Times are float seconds since the
    epoch. ``uid``/``gid`` are stored, not enforced (the FUSE layer checks permissions).
    """

    url: str
    #: called after a commit that dropped slices nothing refers to any more, with their
    #: ``(id, size)``; the data layer sets it to delete the blocks. None: the blocks leak for gc.
    on_delete_slices: Callable[[list[tuple[int, int]]], None] | None = None
    #: returns this client's counters; published with every session heartbeat
    session_stats: Callable[[], dict] | None = None
    #: seconds between session heartbeats
    heartbeat_interval: float = 10.0
    #: called after ``write_chunk`` left a chunk with ``compact_threshold`` slices or more, with
    #: ``(inode, index, nslices)``; the data layer sets it to compact the chunk in the background
    on_compact: Callable[[int, int, int], None] | None = None
    compact_threshold: int = 64
    #: background jobs of a client with a session and a data layer (``on_delete_slices`` set): at
    #: most once per ``cleanup_interval`` seconds across all clients (a lease in the engine), drop
    #: sessions silent for ``session_timeout`` seconds (freeing their open-but-deleted files),
    #: expire the trash and delete compacted-away slices older than ``slice_delay`` seconds
    cleanup_interval: float = 60.0
    session_timeout: float = 300.0
    slice_delay: float = 3600.0

    # -- volume ------------------------------------------------------------------------------------
    @abstractmethod
    def init(self, fmt: Format, force: bool = False) -> None:
        """Store ``fmt`` and create the root directory. An engine already holding a volume raises
        ``AlreadyFormattedError`` unless ``force`` (then settings are updated, data kept)."""

    @abstractmethod
    def load(self) -> Format:
        """The stored settings; ``NotFormattedError`` when the engine holds no volume."""

    @abstractmethod
    def new_session(self, info: dict | None = None) -> int:
        """Register this client; start heartbeats. Returns the session id."""

    @abstractmethod
    def close_session(self) -> None:
        """Drop this client's session."""

    def publish_session(self) -> None:
        """Write this client's session record (and stats) now rather than at the next beat."""

    @abstractmethod
    def list_sessions(self) -> list[dict]:
        """Live sessions: ``{"sid", "heartbeat", "info"}`` each."""

    @abstractmethod
    def statfs(self) -> tuple[int, int]:
        """``(used_bytes, used_inodes)``."""

    @abstractmethod
    def close(self) -> None:
        """Release connections (and the session, if any)."""

    # -- names ---------------------------------------------------------------------------------------
    @abstractmethod
    def lookup(self, parent: int, name: str) -> Attr:
        """The entry ``name`` in directory ``parent``."""

    @abstractmethod
    def resolve(self, path: str, follow: bool = True) -> Attr:
        """Walk an absolute, normalised path (``/a/b``) from the root in one round trip where the
        engine allows. Symlinks in the middle are followed; the last one only when ``follow``.
        ELOOP after 40 links."""

    @abstractmethod
    def getattr(self, inode: int) -> Attr: ...

    @abstractmethod
    def setattr(self, inode: int, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, atime: float | None = None,
                mtime: float | None = None) -> Attr: ...

    @abstractmethod
    def mknod(self, parent: int, name: str, typ: int, mode: int = 0o644, uid: int = 0,
              gid: int = 0, target: str | None = None) -> Attr:
        """Create a file, directory or symlink (``target``). FileExistsError if the name exists."""

    def create(self, parent: int, name: str, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Attr:
        return self.mknod(parent, name, TYPE_FILE, mode, uid, gid)

    @abstractmethod
    def create_files(self, parent: int, names: list[str], mode: int = 0o644, uid: int = 0,
                     gid: int = 0) -> list[Attr | None]:
        """Create many empty regular files in one transaction; None for a name that exists."""

    def mkdir(self, parent: int, name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Attr:
        return self.mknod(parent, name, TYPE_DIR, mode, uid, gid)

    def symlink(self, parent: int, name: str, target: str, uid: int = 0, gid: int = 0) -> Attr:
        return self.mknod(parent, name, TYPE_SYMLINK, 0o777, uid, gid, target=target)

    @abstractmethod
    def readlink(self, inode: int) -> str: ...

    @abstractmethod
    def unlink(self, parent: int, name: str) -> None:
        """Remove a non-directory entry; when the last link goes and no local handle has the file
        open, its chunks are dropped (``on_delete_slices``)."""

    @abstractmethod
    def rmdir(self, parent: int, name: str) -> None: ...

    @abstractmethod
    def rename(self, parent_src: int, name_src: str, parent_dst: int, name_dst: str,
               flags: int = 0) -> None:
        """Atomic rename, across directories too; replaces a file or an empty directory;
        ``RENAME_NOREPLACE`` / ``RENAME_EXCHANGE`` as in renameat2(2)."""

    @abstractmethod
    def link(self, inode: int, parent: int, name: str) -> Attr: ...

    @abstractmethod
    def readdir(self, inode: int) -> list[tuple[str, Attr]]:
        """Entries (without ``.``/``..``) with their attributes, in one round trip where possible."""

    @abstractmethod
    def readdir_files(self, inode: int) -> tuple[bytes, dict]:
        """A directory as one transaction sees it: its own raw attributes, and for each entry
        name (encoded) ``[type, inode, raw attributes, raw slices of chunk 0]`` (read for regular
        files; None and ``[]`` for others may be given). Every change to a directory's entries
        changes its attributes, and every change to a file's content the file's: a reader that
        kept them (``Volume.list_tree``) knows a later view is the same by comparing them."""

    @abstractmethod
    def raw_attrs(self, inodes: list[int], since: int | None = None) -> list[bytes | None] | None:
        """The stored attributes of ``inodes``, raw, in one transaction (None: no such inode);
        with ``since``, None instead while :meth:`attr_changes` is still ``since``."""

    @abstractmethod
    def attr_changes(self) -> int:
        """A count that every transaction changing any inode's attributes raises: the same
        value read again means no inode's attributes changed in between."""

    # -- data ----------------------------------------------------------------------------------------
    @abstractmethod
    def truncate(self, inode: int, length: int) -> Attr:
        """Set the length; bytes past a shrink read as zeros if the file grows again."""

    @abstractmethod
    def new_slice_id(self) -> int:
        """A fresh slice id (> 0); ids are reserved from the engine in batches."""

    @abstractmethod
    def read_chunk(self, inode: int, index: int) -> list[Slice]:
        """The slices of chunk ``index``, oldest first (later ones win where they overlap)."""

    @abstractmethod
    def resolve_slices(self, path: str, follow: bool = True) -> tuple[Attr, list[list[Slice]]]:
        """``resolve(path)`` and, for a regular file, the slices of each of its chunks (a list per
        chunk index, as ``read_chunk``), in one read transaction: what a whole-file read needs,
        consistent with the length it returns on engines with snapshots (SQL). Empty for other
        types. A fresh call sees every file closed before it (close-to-open)."""

    @abstractmethod
    def resolve_slices_many(self, paths: list[str]) -> list:
        """:meth:`resolve_slices` of each path (symlinks followed) in one read transaction: a list
        with, for each path, ``(attr, chunks)`` or the ``OSError`` that path raised (a batch of
        small files costs one transaction, not one each)."""

    @abstractmethod
    def write_chunk(self, inode: int, index: int, slice_: Slice, mtime: float | None = None) -> Attr:
        """Append ``slice_`` to chunk ``index``; the length grows to cover it."""

    @abstractmethod
    def write_shared(self, sid: int, size: int, parts: list[tuple[int, int, int]]) -> list[int]:
        """Make ranges ``(inode, off, length)`` of one uploaded slice the content of several
        files, in one transaction (small files packed into shared objects)."""

    def open_file(self, inode: int) -> None:
        """A local handle opened ``inode`` (its data stays while open, even if unlinked)."""

    def close_file(self, inode: int) -> None:
        """The local handle closed; frees the data of a file unlinked meanwhile."""

    # -- xattrs --------------------------------------------------------------------------------------
    @abstractmethod
    def getxattr(self, inode: int, name: str) -> bytes: ...

    @abstractmethod
    def setxattr(self, inode: int, name: str, value: bytes, flags: int = 0) -> None: ...

    @abstractmethod
    def listxattr(self, inode: int) -> list[str]: ...

    @abstractmethod
    def removexattr(self, inode: int, name: str) -> None: ...

    # -- whole volume (gc, fsck, dump) ---------------------------------------------------------------
    @abstractmethod
    def list_slices(self) -> Iterable[tuple[int, int]]:
        """Every ``(id, size)`` a chunk refers to (id > 0), for gc."""

    def list_delayed_slices(self) -> list[tuple[int, int]]:
        """Slices compaction replaced, kept ``slice_delay`` seconds for readers that still use
        them: references too, for gc."""
        return []


def new_meta(url: str) -> Meta:
    """An engine for ``url``: ``sqlite3://``, ``postgres://``/``postgresql://``, ``redis://``."""
    from ..errors import InvalidURLError

    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("sqlite3", "sqlite"):
        from .sql import SQLMeta
        return SQLMeta(url)
    if scheme in ("postgres", "postgresql"):
        from .sql import SQLMeta
        return SQLMeta(url)
    if scheme in ("redis", "rediss", "unix"):
        from .redis import RedisMeta
        return RedisMeta(url)
    raise InvalidURLError(
        f"unknown metadata engine URL {url!r}: use sqlite3:///abs/path.db, redis://host:port/db "
        "or postgres://user@host:port/db")
