"""The file-system logic of every metadata engine, written once against a small transactional
key/value model (JuiceFS ``pkg/meta/base.go`` + ``tkv.go``).

Engines (:mod:`.sql`, :mod:`.redis`) only provide :meth:`BaseMeta.txn`, which runs ``fn(tx)`` in a
transaction and retries it on conflict. ``tx`` offers (keys ``str``; fields and values ``bytes``):

========================  ===============================================================
``get(k)``                string value or None
``gets(keys)``            list of values (None where missing), one round trip
``set(k, v)``             store a string value
``delete(k, kind=None)``  remove a key; ``kind`` ("str", "hash", "list") is a hint engines may use
``incrby(k, n)``          add to a counter; the result may be None inside a transaction on
                          engines that buffer writes (Redis): the logic here never uses it
``counter(k)``            a counter's value (0 when missing)
``hget/hmget/hgetall``    hash reads; ``hlen(k)`` its size
``hset/hdel``             hash writes
``rpush(k, v)``           append to a list; ``lrange(k)`` all its items, oldest first;
                          ``llen(k)`` how many
``scan_keys(prefix)``     every key starting with ``prefix`` (gc, fsck)
``batch(ops)``            several reads ``[("get", k), ("hget", k, f), ...]`` in one round trip
========================  ===============================================================

Rules the logic here keeps so that buffering engines (Redis WATCH/MULTI) are correct: inside one
transaction every read of a key happens before any write to it, and a function passed to ``txn``
has no side effects outside ``tx`` except on locals it resets (it may run several times).

Key layout::

    setting          the Format, JSON
    i{ino}           packed Attr (struct, see _ATTR)
    d{ino}           hash: name (utf-8) -> b"{typ}{ino}"
    s{ino}           symlink target
    x{ino}           hash: xattr name -> value
    c{ino}_{indx}    list of packed Slices (24 bytes each), oldest first
    sessions         hash: sid -> JSON {sid, heartbeat, info, host, pid}
    sustained        hash: ino -> sid, unlinked files kept for an open handle of that session
    pendingDelete    hash: slice id -> b"{size},{time}", slices compaction replaced (deleted
                     ``slice_delay`` seconds later: readers may still hold the old slice list)
    lease:{job}      the time a client last ran a volume-wide background job
    counters         nextInode, nextSlice, nextSession (last value handed out),
                     usedSpace (sum of align4k(length) over inodes), totalInodes,
                     attrChanges (see below)

Every transaction that writes or deletes an ``i{ino}`` key adds one to the counter
``attrChanges``, in the same transaction (the engines do it at commit: ``attr_key`` tells them
which keys count). A reader that kept attributes and the counter's value (``Volume.list_tree``)
then knows, by one read of the counter, that none of them changed since. A volume made or loaded
raises it to the time in microseconds, so one made again under the same URL never counts through
values an earlier one had (``load_dump`` keeps it).

The trash (JuiceFS's design): with ``Format.trash_days > 0`` a regular file whose last link goes
(``unlink``, or a ``rename`` replacing it) is not freed: its entry moves to ``/.trash/{hour}/``
as ``{parent}-{inode}-{name}`` (nlink stays 1, ``parent`` becomes the hour directory), in the same
transaction. ``/.trash`` (inode ``TRASH_INODE``) is reachable by path but not listed in the root;
nothing can be created in it; removing a file inside it frees it for good; ``trash_restore`` (or a
rename out of it) puts a file back. ``cleanup_trash`` frees the hours older than ``trash_days``.
Truncation (``open(p, "wb")``) frees data at once, as in JuiceFS.

Deleting data: when a commit drops slices nothing refers to any more (the last link of a file
goes, a truncate drops whole chunks, a rename replaces a file), ``on_delete_slices`` is called with
their ``(id, size)`` *after* the commit, in the calling thread (errors it raises are logged, not
raised: the metadata change is already committed). A file still open through this instance
(``open_file``) keeps its inode (nlink 0) and data until the last ``close_file`` in this process;
``clean_stale_sessions`` frees those of clients that died. Opens are counted per instance and per
process: a forked child starts with none, and ``close_file`` of an inode it never opened is a no-op.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import socket
import struct
import threading
import time
import weakref
from collections import Counter
from typing import IO, Callable, Iterable, Iterator

from ..errors import AlreadyFormattedError, NotFormattedError, oserror
from .interface import (CHUNK_SIZE, RENAME_EXCHANGE, RENAME_NOREPLACE, ROOT_INODE, TRASH_INODE,
                        TRASH_NAME, TYPE_DIR, TYPE_FILE, TYPE_SYMLINK, XATTR_CREATE, XATTR_REPLACE,
                        Attr, Format, Meta, Slice)

log = logging.getLogger(__name__)

INODE_BATCH = 100
SLICE_BATCH = 1000
MAX_SYMLINKS = 40
MAX_NAME = 255
DIR_LENGTH = 4096

_ATTR = struct.Struct("<BHIIdddIQQ")   # typ mode uid gid atime mtime ctime nlink length parent
_SLICE = struct.Struct("<IQIII")        # pos id size off len
_SLICE_SIZE = _SLICE.size


def align4k(length: int) -> int:
    """Space an inode of ``length`` bytes is counted for (JuiceFS ``align4K``: 0 counts 4 KiB)."""
    if length <= 0:
        return 4096
    return ((length - 1) // 4096 + 1) * 4096


def pack_attr(a: Attr) -> bytes:
    return _ATTR.pack(a.typ, a.mode & 0o7777, a.uid, a.gid, a.atime, a.mtime, a.ctime, a.nlink,
                      a.length, a.parent)


def unpack_attr(ino: int, raw: bytes) -> Attr:
    typ, mode, uid, gid, atime, mtime, ctime, nlink, length, parent = _ATTR.unpack(raw)
    return Attr(ino, typ, mode, uid, gid, atime, mtime, ctime, nlink, length, parent)


def pack_entry(typ: int, ino: int) -> bytes:
    return b"%d%d" % (typ, ino)


def unpack_entry(raw: bytes) -> tuple[int, int]:
    return raw[0] - 48, int(raw[1:])


def pack_slice(s: Slice) -> bytes:
    return _SLICE.pack(s.pos, s.id, s.size, s.off, s.len)


def unpack_slices(raws: Iterable[bytes]) -> list[Slice]:
    return [Slice(*_SLICE.unpack(r)) for r in raws]


def redact(url: str) -> str:
    """``url`` with any password replaced by ``****`` (for error messages)."""
    if "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    netloc, sep, tail = rest.partition("/")
    if "@" in netloc:
        cred, host = netloc.rsplit("@", 1)
        if ":" in cred:
            cred = cred.split(":", 1)[0] + ":****"
        netloc = f"{cred}@{host}"
    return f"{scheme}://{netloc}{sep}{tail}"


def _ikey(ino: int) -> str:
    return f"i{ino}"


ATTR_CHANGES = "attrChanges"


def attr_key(k: str) -> bool:
    """Whether ``k`` is an inode's attributes (``i{ino}``): writing it counts in ``attrChanges``."""
    return k[:1] == "i" and k[1:].isdigit()


def _start_attr_changes(tx, count: int) -> None:
    """Raise ``attrChanges`` (now ``count``) to the time in microseconds, for a volume made or
    loaded."""
    start = time.time_ns() // 1000
    if count < start:
        tx.incrby(ATTR_CHANGES, start - count)


def _dkey(ino: int) -> str:
    return f"d{ino}"


def _rkey(sid: int) -> str:
    """A packed slice's count of holders beyond the first (see ``BaseMeta._unref``)."""
    return f"k{sid}"


def _ckey(ino: int, indx: int) -> str:
    return f"c{ino}_{indx}"


def _enc(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def _dec(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def check_name(name: str) -> None:
    """EINVAL for '', '.', '..', '/' or NUL inside; ENAMETOOLONG past 255 bytes."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise oserror(errno.EINVAL, name)
    if len(_enc(name)) > MAX_NAME:
        raise oserror(errno.ENAMETOOLONG, name)


def _check_free(parent: int, name: str) -> None:
    """EPERM for a new entry named like the trash in the root (``/.trash`` is taken)."""
    if parent == ROOT_INODE and name == TRASH_NAME:
        raise oserror(errno.EPERM, name, "reserved for the trash")


class KVTx:
    """Base of engines' transaction objects: ``batch`` done one read at a time."""

    def batch(self, ops):
        return [getattr(self, op[0])(*op[1:]) for op in ops]


# -- fork safety: one hook for every live instance ----------------------------------------------
_INSTANCES: "weakref.WeakSet[BaseMeta]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for m in list(_INSTANCES):
        try:
            m._after_fork()
        except Exception:  # pragma: no cover - never break a fork
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _ThreadConn:
    """Closes a thread's engine connection when the thread ends: it lives in the thread's
    ``threading.local`` storage, which Python drops then. Never in a forked child: the
    connections it inherited are the parent's (see ``_reset_engine``)."""
    __slots__ = ("conn", "meta", "pid")

    def __init__(self, conn, meta):
        self.conn = conn
        self.meta = weakref.ref(meta)
        self.pid = os.getpid()

    def __del__(self):
        meta = self.meta()
        if meta is None or self.pid != os.getpid():
            return
        try:
            if meta._forget_conn(self.conn):
                meta._disconnect(self.conn)
        except Exception:
            pass


class BaseMeta(Meta):
    """All the file-system logic; subclasses implement :meth:`txn` (and may override
    :meth:`_incr`, :meth:`_walk`, :meth:`_close_engine`, :meth:`_reset_engine`).

    Thread-safe. Fork-safe: in a forked child the reserved inode/slice batches, the session and the
    heartbeat thread are dropped and the engine's connections are rebuilt on first use. Pickles as
    its URL (a fresh, session-less instance on the other side).
    """


    def __init__(self, url: str):
        self.url = url
        self.on_delete_slices = None
        self.fmt: Format | None = None
        self._init_local_state()
        _INSTANCES.add(self)

    def _init_local_state(self) -> None:
        self._lock = threading.Lock()
        self._ino_next = 1
        self._ino_max = 0
        self._slice_next = 1
        self._slice_max = 0
        self._open_lock = threading.Lock()
        self._open: dict[int, int] = {}
        self._sid: int | None = None
        self._session_info: dict = {}
        self._hb_thread: threading.Thread | None = None
        self._hb_stop = threading.Event()
        self._bg_thread: threading.Thread | None = None
        self._bg_last = float("-inf")

    def __reduce__(self):
        return (self.__class__, (self.url,))

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({redact(self.url)!r})"

    # -- what engines provide ----------------------------------------------------------------------
    def txn(self, fn: Callable, *, readonly: bool = False):
        """Run ``fn(tx)`` in one transaction, retrying on conflicts; returns its result."""
        raise NotImplementedError

    def _incr(self, key: str, n: int) -> int:
        """Atomically add ``n`` to counter ``key`` outside any other transaction; the new value."""
        return self.txn(lambda tx: tx.incrby(key, n))

    # Engines keep one connection per thread, registered in ``self._conns`` (guarded by
    # ``self._conns_lock``, the thread's own in ``self._local.conn``); the bookkeeping is here,
    # closing one connection is the engine's ``_disconnect``. A thread's connection is closed when
    # the thread ends (``_ThreadConn``): threads come and go (the background cleanup runs in a new
    # one each interval, trio's worker threads exit when idle), and each kept its connection --
    # two file descriptors on SQLite -- until the client closed, one more per minute.
    def _register_conn(self, c) -> None:
        """Make ``c`` this thread's connection."""
        self._local.conn = c
        self._local.closer = _ThreadConn(c, self)
        with self._conns_lock:
            self._conns.append(c)

    def _forget_conn(self, c) -> bool:
        """Unregister ``c``; False when it was not registered (closed already)."""
        with self._conns_lock:
            if c in self._conns:
                self._conns.remove(c)
                return True
        return False

    def _disconnect(self, c) -> None:
        c.close()

    def _drop_conn(self, c) -> None:
        """Forget and close a broken connection of this thread."""
        if getattr(self._local, "conn", None) is c:
            self._local.conn = None
            self._local.closer = None
        self._forget_conn(c)
        try:
            self._disconnect(c)
        except Exception:
            pass

    def _close_engine(self) -> None:
        """Release connections."""
        with self._conns_lock:
            conns, self._conns = self._conns, []
        self._local = threading.local()
        for c in conns:
            try:
                self._disconnect(c)
            except Exception:
                pass

    def _reset_engine(self) -> None:
        """In a forked child: forget the parent's connections (without closing them)."""

    def _after_fork(self) -> None:
        # the child starts with no open files: closing a handle it inherited must not free a file
        # the parent still holds open (close_file ignores inodes this process never opened)
        self._init_local_state()
        self._open = {}
        self._reset_engine()

    # -- helpers -----------------------------------------------------------------------------------
    def _not_formatted(self) -> NotFormattedError:
        return NotFormattedError(f"{redact(self.url)} holds no volume: run `torchjuice format` "
                                 "first")

    def _run(self, fn: Callable):
        """``txn(fn)`` where ``fn`` returns ``(result, freed_slices)``; the slices go to
        ``on_delete_slices`` once committed."""
        result, freed = self.txn(fn)
        if freed:
            self._deleted(freed)
        return result

    def _deleted(self, slices: list[tuple[int, int]]) -> None:
        cb = self.on_delete_slices
        if cb is None:
            return
        try:
            cb(slices)
        except Exception:
            log.exception("on_delete_slices failed; %d slices leak until gc", len(slices))

    @staticmethod
    def _get_attr(tx, ino: int, path=None) -> Attr:
        raw = tx.get(_ikey(ino))
        if raw is None:
            raise oserror(errno.ENOENT, path if path is not None else f"inode {ino}")
        return unpack_attr(ino, raw)

    @staticmethod
    def _dir_attr(ino: int, raw: bytes | None, path) -> Attr:
        if raw is None:
            raise oserror(errno.ENOENT, path)
        a = unpack_attr(ino, raw)
        if a.typ != TYPE_DIR:
            raise oserror(errno.ENOTDIR, path)
        return a

    @staticmethod
    def _chunk_keys(ino: int, length: int, first: int = 0) -> list[str]:
        if length <= 0:
            return []
        return [_ckey(ino, i) for i in range(first, (length - 1) // CHUNK_SIZE + 1)]

    @staticmethod
    def _slices_of(lists: Iterable[list[bytes]]) -> list[tuple[int, int]]:
        seen: dict[int, int] = {}
        for items in lists:
            for raw in items:
                _pos, sid, size, _off, _len = _SLICE.unpack(raw)
                if sid > 0 and sid not in seen:
                    seen[sid] = size
        return list(seen.items())

    def _is_open(self, ino: int) -> bool:
        return self._open.get(ino, 0) > 0

    def _sustain(self, tx, ino: int) -> None:
        """Remember that unlinked inode ``ino`` is kept for an open handle of this session, so
        that ``clean_stale_sessions`` can free it if this client dies before closing it."""
        tx.hset("sustained", str(ino).encode(), str(self._sid or 0).encode())

    def _read_inode_data(self, tx, a: Attr) -> tuple[list[str], list[tuple[int, int]]]:
        """Read phase of freeing inode ``a``: its chunk keys and the slices that nothing refers
        to once they are gone (see :meth:`_unref`)."""
        if a.typ != TYPE_FILE:
            return [], []
        keys = self._chunk_keys(a.inode, a.length)
        lists = tx.batch([("lrange", k) for k in keys]) if keys else []
        return keys, self._unref(tx, self._slices_of(lists))

    # Slice references. A slice is normally held by one chunk of one file. A packed slice
    # (:meth:`write_shared`) holds several small files, each chunk list referring to its own
    # range; ``k{sid}`` then counts the references beyond the first. Every path that drops a
    # chunk's slices (unlink, rename over, truncate, compaction, trash cleanup, the last close of
    # an unlinked file) passes them through here: a slice is freed only with its last reference.
    def _unref(self, tx, slices: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """``slices`` each lost one reference (one chunk no longer holds them): returns those
        that nothing refers to any more; the others' counts drop by one (written to ``tx``)."""
        if not slices:
            return slices
        freed = []
        for s, raw in zip(slices, tx.gets([_rkey(sid) for sid, _ in slices])):
            if raw is None:
                freed.append(s)
                continue
            self._set_holders(tx, s[0], int(raw))       # one holder fewer: raw + 1 - 1
        return freed

    @staticmethod
    def _set_holders(tx, sid: int, n: int) -> None:
        """Record that ``n`` chunks hold slice ``sid`` (one needs no record)."""
        if n > 1:
            tx.set(_rkey(sid), b"%d" % (n - 1))
        else:
            tx.delete(_rkey(sid), "str")

    def _unlinked(self, tx, a: Attr, parent, name, to_trash, drop: bool, chunks, now) -> None:
        """Write what becomes of an inode that lost an entry: moved to the trash, freed (its last
        link, not open), or kept (other links, or nlink 0 but open here: sustained)."""
        if to_trash is not None:
            self._trash_writes(tx, a, parent, name, to_trash, now)
            tx.set(_ikey(a.inode), pack_attr(a))
        elif drop:
            self._free_inode(tx, a, chunks)
        else:
            tx.set(_ikey(a.inode), pack_attr(a))
            if a.nlink == 0:
                self._sustain(tx, a.inode)

    @staticmethod
    def _free_inode(tx, a: Attr, chunk_keys: list[str]) -> None:
        """Write phase of freeing inode ``a``."""
        ino = a.inode
        tx.delete(_ikey(ino), "str")
        tx.delete(f"x{ino}", "hash")
        if a.typ == TYPE_SYMLINK:
            tx.delete(f"s{ino}", "str")
        elif a.typ == TYPE_DIR:
            tx.delete(_dkey(ino), "hash")
        for k in chunk_keys:
            tx.delete(k, "list")
        tx.incrby("usedSpace", -align4k(a.length))
        tx.incrby("totalInodes", -1)

    # -- counters handed out in batches ------------------------------------------------------------
    def _next_inode(self) -> int:
        with self._lock:
            if self._ino_next > self._ino_max:
                top = self._incr("nextInode", INODE_BATCH)
                self._ino_next, self._ino_max = top - INODE_BATCH + 1, top
            ino = self._ino_next
            self._ino_next += 1
            return ino

    def new_slice_id(self) -> int:
        with self._lock:
            if self._slice_next > self._slice_max:
                top = self._incr("nextSlice", SLICE_BATCH)
                self._slice_next, self._slice_max = top - SLICE_BATCH + 1, top
            sid = self._slice_next
            self._slice_next += 1
            return sid

    # -- volume ------------------------------------------------------------------------------------
    def init(self, fmt: Format, force: bool = False) -> None:
        def fn(tx):
            old, root, changes = tx.batch([("get", "setting"), ("get", _ikey(ROOT_INODE)),
                                           ("counter", ATTR_CHANGES)])
            if old is not None and not force:
                name = Format.from_json(old).name
                raise AlreadyFormattedError(
                    f"{redact(self.url)} already holds volume {name!r} (use force to update its "
                    "settings)")
            tx.set("setting", fmt.to_json().encode())
            if root is None:
                now = time.time()
                a = Attr(ROOT_INODE, TYPE_DIR, 0o755, 0, 0, now, now, now, 2, DIR_LENGTH,
                         ROOT_INODE)
                tx.set(_ikey(ROOT_INODE), pack_attr(a))
                if old is None:
                    # counters hold the last value handed out: inode 2 and slice 1 come first
                    tx.incrby("nextInode", ROOT_INODE)
                    tx.incrby("totalInodes", 1)
                    tx.incrby("usedSpace", align4k(DIR_LENGTH))
            _start_attr_changes(tx, changes)
        self.txn(fn)
        self.fmt = fmt

    def load(self) -> Format:
        raw = self.txn(lambda tx: tx.get("setting"), readonly=True)
        if raw is None:
            raise self._not_formatted()
        self.fmt = Format.from_json(raw)
        return self.fmt

    def statfs(self) -> tuple[int, int]:
        used, inodes = self.txn(lambda tx: tx.batch([("counter", "usedSpace"),
                                                     ("counter", "totalInodes")]), readonly=True)
        return int(used), int(inodes)

    def close(self) -> None:
        try:
            self.close_session()
        except Exception as e:      # an unreachable engine: the session expires on its own
            log.warning("could not remove session from %s: %s", redact(self.url), e)
        finally:
            self._close_engine()

    # -- sessions ----------------------------------------------------------------------------------
    def _session_record(self, sid: int) -> bytes:
        rec = {"sid": sid, "heartbeat": time.time(), "info": self._session_info,
               "host": socket.gethostname(), "pid": os.getpid()}
        if self.session_stats is not None:      # the client's counters, for `torchjuice stats`
            try:
                rec["stats"] = self.session_stats()
            except Exception as e:
                log.debug("session stats unavailable: %s", e)
        return json.dumps(rec).encode()

    def publish_session(self) -> None:
        """Write this client's session record (with fresh stats) now, not at the next beat."""
        if self._sid is not None:
            sid = self._sid
            rec = self._session_record(sid)
            self.txn(lambda tx: tx.hset("sessions", str(sid).encode(), rec))

    def new_session(self, info: dict | None = None) -> int:
        self._session_info = dict(info or {})
        if self._sid is None:
            self._sid = self._incr("nextSession", 1)
        sid = self._sid
        rec = self._session_record(sid)
        self.txn(lambda tx: tx.hset("sessions", str(sid).encode(), rec))
        if self._hb_thread is None or not self._hb_thread.is_alive():
            self._hb_stop = threading.Event()
            t = threading.Thread(target=self._heartbeat_loop, args=(sid, self._hb_stop),
                                 name=f"torchjuice-heartbeat-{sid}", daemon=True)
            self._hb_thread = t
            t.start()
        return sid

    def _heartbeat_loop(self, sid: int, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_interval):
            if self._sid != sid:
                return
            try:
                rec = self._session_record(sid)
                self.txn(lambda tx: tx.hset("sessions", str(sid).encode(), rec))
            except Exception as e:  # keep beating; the engine may come back
                log.warning("session %s heartbeat failed: %s", sid, e)
                continue
            self._maybe_background(stop)

    # -- volume-wide background jobs ---------------------------------------------------------------
    def _maybe_background(self, stop: threading.Event) -> None:
        """From the heartbeat: start the background jobs in their own thread when they are due
        here (a slow job must not delay the heartbeats). Only a client that can delete blocks
        (``on_delete_slices`` set) runs them; the lease makes one client per interval do it."""
        if self.on_delete_slices is None or self.cleanup_interval <= 0:
            return
        if self._bg_thread is not None and self._bg_thread.is_alive():
            return
        now = time.monotonic()
        if now - self._bg_last < self.cleanup_interval:
            return
        self._bg_last = now
        t = threading.Thread(target=self._background_jobs, args=(stop,), daemon=True,
                             name="torchjuice-cleanup")
        self._bg_thread = t
        t.start()

    def _background_jobs(self, stop: threading.Event) -> None:
        try:
            if not self.try_lease("cleanup", self.cleanup_interval):
                return
            self.clean_stale_sessions(self.session_timeout)
            if not stop.is_set():
                self.cleanup_trash()
            if not stop.is_set():
                self.cleanup_delayed_slices()
        except Exception as e:        # the next interval tries again
            log.warning("background cleanup of %s failed: %s", redact(self.url), e)

    def try_lease(self, job: str, interval: float) -> bool:
        """True for the one client that may run ``job`` now: nobody ran it in the last
        ``interval`` seconds (the time is recorded in the engine, in one transaction)."""
        key = f"lease:{job}"

        def fn(tx):
            now = time.time()
            raw = tx.get(key)
            if raw is not None and 0 <= now - float(raw) < interval:
                return False
            tx.set(key, repr(now).encode())
            return True
        return self.txn(fn)

    def close_session(self) -> None:
        sid, self._sid = self._sid, None
        self._hb_stop.set()
        t, self._hb_thread = self._hb_thread, None
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5)
        if sid is not None:
            self.txn(lambda tx: tx.hdel("sessions", str(sid).encode()))

    @property
    def sid(self) -> int | None:
        """This client's session id, or None."""
        return self._sid

    def list_sessions(self) -> list[dict]:
        raw = self.txn(lambda tx: tx.hgetall("sessions"), readonly=True)
        out = [json.loads(v) for v in raw.values()]
        return sorted(out, key=lambda s: s["sid"])

    def clean_stale_sessions(self, timeout: float = 300.0, sessionless: bool = False) -> list[int]:
        """Drop sessions whose last heartbeat is older than ``timeout`` seconds and free the
        unlinked files they kept open (with ``sessionless``, also those kept by clients without a
        session: only safe when no such client runs). Returns the dropped session ids."""
        cutoff = time.time() - timeout
        stale = [s["sid"] for s in self.list_sessions() if s["heartbeat"] < cutoff]
        if stale:
            def fn(tx):
                for sid in stale:
                    tx.hdel("sessions", str(sid).encode())
            self.txn(fn)
        dead = set(stale) | ({0} if sessionless else set())
        live = {s["sid"] for s in self.list_sessions()}
        kept = self.txn(lambda tx: tx.hgetall("sustained"), readonly=True)
        for ino_b, sid_b in kept.items():
            ino, sid = int(ino_b), int(sid_b)
            if (sid in dead or (sid and sid not in live)) and not self._is_open(ino):
                self._free_unlinked(ino)
        return stale

    def _free_unlinked(self, ino: int) -> None:
        def fn(tx):
            raw = tx.get(_ikey(ino))
            a = unpack_attr(ino, raw) if raw is not None else None
            if a is not None and a.nlink > 0:
                tx.hdel("sustained", str(ino).encode())
                return None, []
            keys, freed = self._read_inode_data(tx, a) if a is not None else ([], [])
            if a is not None:
                self._free_inode(tx, a, keys)
            tx.hdel("sustained", str(ino).encode())
            return None, freed
        self._run(fn)

    # -- names -------------------------------------------------------------------------------------
    def _walk(self, tx, start: int, names: list[str]):
        """Walk ``names`` from directory ``start``. Returns ``(code, idx, inos, attr_raw, target)``:
        code 0 when every name resolved (``attr_raw`` of the last, ``target`` if it is a symlink);
        -1 when ``names[idx]`` (not the last) is a symlink (``target`` set); else an errno at
        ``names[idx]``. ``inos`` are the inodes walked so far. Engines may run it server-side."""
        return self._walk_entries(
            tx, len(names), lambda i, cur: tx.hget(_dkey(start if i == 0 else cur), _enc(names[i])),
            lambda ino: tx.get(_ikey(ino)))

    @staticmethod
    def _walk_entries(tx, n: int, entry, attr):
        """The walk of :meth:`_walk` over ``n`` names, given ``entry(i, parent inode)`` (the raw
        directory entry of name ``i``, None when missing) and ``attr(inode)`` (its raw
        attributes): shared by the generic walk and engines that fetch every entry at once."""
        cur = None
        inos: list[int] = []
        last = n - 1
        for i in range(n):
            e = entry(i, cur)
            if e is None:
                return errno.ENOENT, i, inos, None, None
            typ, ino = e[0] - 48, int(e[1:])
            inos.append(ino)
            if typ == TYPE_SYMLINK:
                target = tx.get(f"s{ino}")
                if i < last:
                    return -1, i, inos, None, target
                return 0, i, inos, attr(ino), target
            if i < last and typ != TYPE_DIR:
                return errno.ENOTDIR, i + 1, inos, None, None
            cur = ino
        return 0, last, inos, attr(cur), None

    def _walk_file(self, tx, names: list[str]):
        """``_walk`` from the root, plus (last) the raw slices of chunk 0 when the walk ends on a
        regular file, or None when they were not read. Engines may read them in the same round
        trip as the walk."""
        return (*self._walk(tx, ROOT_INODE, names), None)

    def lookup(self, parent: int, name: str) -> Attr:
        if name == ".":
            return self._getattr_dir(parent, name)
        if name == "..":
            a = self._getattr_dir(parent, name)
            return self.getattr(a.parent or ROOT_INODE)
        check_name(name)
        if parent == ROOT_INODE and name == TRASH_NAME:
            return self.txn(self._trash_attr, readonly=True)

        def fn(tx):
            code, _i, inos, raw, _t = self._walk(tx, parent, [name])
            if code == 0 and raw is not None:
                return unpack_attr(inos[-1], raw)
            self._dir_attr(parent, tx.get(_ikey(parent)), name)
            raise oserror(errno.ENOENT, name)
        return self.txn(fn, readonly=True)

    @staticmethod
    def _trash_attr(tx) -> Attr:
        """The trash directory's attributes (made up until the first file goes to the trash)."""
        raw = tx.get(_ikey(TRASH_INODE))
        if raw is not None:
            return unpack_attr(TRASH_INODE, raw)
        return Attr(TRASH_INODE, TYPE_DIR, 0o755, 0, 0, 0.0, 0.0, 0.0, 2, DIR_LENGTH, ROOT_INODE)

    def _getattr_dir(self, ino: int, path) -> Attr:
        return self.txn(lambda tx: self._dir_attr(ino, tx.get(_ikey(ino)), path), readonly=True)

    @staticmethod
    def _path_names(path: str) -> list[str]:
        if not path.startswith("/"):
            raise oserror(errno.EINVAL, path, "not an absolute path")
        names = [c for c in path.split("/") if c]
        for n in names:
            if len(_enc(n)) > MAX_NAME:
                raise oserror(errno.ENAMETOOLONG, path)
        return names

    def resolve(self, path: str, follow: bool = True) -> Attr:
        names = self._path_names(path)
        return self.txn(lambda tx: self._resolve_tx(tx, names, follow, path), readonly=True)

    def resolve_slices(self, path: str, follow: bool = True) -> tuple[Attr, list[list[Slice]]]:
        # One transaction instead of resolve + lookup + read_chunk per chunk (+ close_file): a
        # whole-file read of a small file costs one round trip of path walk (server-side on
        # Redis) and one batch of chunk lists.
        return self.txn(self._resolve_slices_fn(path, follow), readonly=True)

    def resolve_slices_many(self, paths: list[str]) -> list:
        """:meth:`resolve_slices` of every path (symlinks followed), in one transaction: for each,
        ``(attr, chunks)`` or the ``OSError`` it raised. Plain paths are looked up together
        (:meth:`_files_at`: their entries, attributes and chunk 0); anything else (a symlink, a
        file over one chunk, an error) takes the path of :meth:`resolve_slices`."""
        items: list[tuple[int, list[str]]] = []
        slow: list[int] = []
        for i, p in enumerate(paths):
            try:
                names = self._path_names(p)
            except OSError:
                names = None
            if names is None or not self._plain(names):
                slow.append(i)              # an error, or a path one walk does not resolve
                continue
            items.append((i, names))

        def fn(tx):
            out: list = [None] * len(paths)
            late = list(slow)
            found = self._files_at(tx, items) if items else {}
            for i, _names in items:
                f = found.get(i)
                if f is None or f[0] != TYPE_FILE or f[2] is None:
                    late.append(i)
                    continue
                a = unpack_attr(f[1], f[2])
                if a.length <= 0:
                    out[i] = (a, [])
                elif a.length <= CHUNK_SIZE:
                    out[i] = (a, [unpack_slices(f[3])])
                else:
                    late.append(i)
            for i in late:                  # errors named as resolve_slices names them
                try:
                    out[i] = self._resolve_slices_fn(paths[i], True)(tx)
                except OSError as e:
                    out[i] = e
            return out
        return self.txn(fn, readonly=True)

    def _files_at(self, tx, items: list[tuple[int, list[str]]]) -> dict:
        """For plain paths ``(i, names)``: ``i`` -> ``(type, inode, raw attributes, raw slices
        of chunk 0)`` of the entry each path names (the last two read for regular files only);
        a path that does not resolve by a plain walk (missing, a symlink or a file on the way)
        is left out. Here: each parent directory walked once, its files read together
        (:meth:`_files_in`); engines may do it all in one statement."""
        groups: dict[tuple, list[tuple[int, bytes]]] = {}
        for i, names in items:
            groups.setdefault(tuple(names[:-1]), []).append((i, _enc(names[-1])))
        out: dict = {}
        for parent, members in groups.items():
            try:
                d = self._resolve_tx(tx, list(parent), True, "/" + "/".join(parent)) \
                    if parent else None
            except OSError:
                continue
            if d is not None and d.typ != TYPE_DIR:
                continue
            found = self._files_in(tx, ROOT_INODE if d is None else d.inode,
                                   [n for _, n in members])
            for i, n in members:
                f = found.get(n)
                if f is not None:
                    out[i] = f
        return out

    def _files_in(self, tx, dir_ino: int, names: list[bytes]) -> dict:
        """The entries ``names`` (encoded) of directory ``dir_ino`` that exist: name ->
        ``(type, inode, raw attributes, raw slices of chunk 0)`` (the last two read for regular
        files only). Engines may do it in one statement."""
        ents = tx.hmget(_dkey(dir_ino), names)
        return self._with_file_data(tx, {n: [*unpack_entry(bytes(e)), None, []]
                                         for n, e in zip(names, ents) if e is not None})

    @staticmethod
    def _with_file_data(tx, out: dict) -> dict:
        """``out`` (name -> ``[type, inode, None, []]``) with the raw attributes and chunk 0's
        raw slices of its regular files filled in, in one batch."""
        files = [f for f in out.values() if f[0] == TYPE_FILE]
        got = tx.batch([op for f in files for op in (("get", _ikey(f[1])),
                                                     ("lrange", _ckey(f[1], 0)))]) if files else []
        for k, f in enumerate(files):
            f[2], f[3] = got[2 * k], got[2 * k + 1]
        return out

    @staticmethod
    def _plain(names: list[str]) -> bool:
        """A path that one walk from the root resolves (no trash, no '.' or '..')."""
        return bool(names) and names[0] != TRASH_NAME and "." not in names and ".." not in names

    def _resolve_slices_fn(self, path: str, follow: bool):
        names = self._path_names(path)
        plain = self._plain(names)

        def fn(tx):
            a = chunk0 = None
            if plain:                   # the common case: one walk, no symlink on the way
                code, _i, inos, raw, target, chunk0 = self._walk_file(tx, names)
                if code == 0 and target is None and raw is not None:
                    a = unpack_attr(inos[-1], raw)
            if a is None:
                a, chunk0 = self._resolve_tx(tx, names, follow, path), None
            if a.typ != TYPE_FILE or a.length <= 0:
                return a, []
            if a.length <= CHUNK_SIZE:
                return a, [unpack_slices(tx.lrange(_ckey(a.inode, 0)) if chunk0 is None
                                         else chunk0)]
            # chunk 0 came with the walk (when it did): the others in one batch
            keys = self._chunk_keys(a.inode, a.length, 0 if chunk0 is None else 1)
            lists = tx.batch([("lrange", k) for k in keys])
            return a, [unpack_slices(items) for items in
                       (lists if chunk0 is None else [chunk0, *lists])]
        return fn

    def _resolve_tx(self, tx, names: list[str], follow: bool, path: str) -> Attr:
        stack = [ROOT_INODE]              # directories walked (physical), for '..'
        todo = names[::-1]                 # components left, next one last
        links = 0
        while True:
            run: list[str] = []
            while todo and todo[-1] not in (".", ".."):
                run.append(todo.pop())
            if run and run[0] == TRASH_NAME and stack[-1] == ROOT_INODE:
                stack.append(TRASH_INODE)            # /.trash: not an entry of the root
                if len(run) == 1 and not todo:
                    return self._trash_attr(tx)
                todo.extend(reversed(run[1:]))
                continue
            if not run:
                if not todo:
                    return self._get_attr(tx, stack[-1], path)
                if todo.pop() == ".." and len(stack) > 1:
                    stack.pop()
                continue
            code, idx, inos, raw, target = self._walk(tx, stack[-1], run)
            if code > 0:
                raise oserror(code, path)
            if code == 0:
                if raw is None:          # entry without inode: a race with a delete
                    raise oserror(errno.ENOENT, path)
                a = unpack_attr(inos[-1], raw)
                if a.typ == TYPE_SYMLINK and (todo or follow):
                    stack.extend(inos[:-1])
                elif todo:
                    if a.typ != TYPE_DIR:
                        raise oserror(errno.ENOTDIR, path)
                    stack.extend(inos)
                    continue
                else:
                    return a
            else:                        # a symlink in the middle of the run
                stack.extend(inos[:-1])
                todo.extend(reversed(run[idx + 1:]))
            links += 1
            if links > MAX_SYMLINKS:
                raise oserror(errno.ELOOP, path)
            if target is None:
                raise oserror(errno.ENOENT, path)
            t = _dec(target)
            if t.startswith("/"):
                del stack[1:]
            todo.extend(reversed([c for c in t.split("/") if c]))

    def getattr(self, inode: int) -> Attr:
        if inode == TRASH_INODE:
            return self.txn(self._trash_attr, readonly=True)
        return self.txn(lambda tx: self._get_attr(tx, inode), readonly=True)

    def setattr(self, inode: int, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, atime: float | None = None,
                mtime: float | None = None) -> Attr:
        def fn(tx):
            a = self._get_attr(tx, inode)
            if mode is None and uid is None and gid is None and atime is None and mtime is None:
                return a
            if mode is not None:
                a.mode = mode & 0o7777
            if uid is not None:
                a.uid = uid
            if gid is not None:
                a.gid = gid
            if atime is not None:
                a.atime = atime
            if mtime is not None:
                a.mtime = mtime
            a.ctime = time.time()
            tx.set(_ikey(inode), pack_attr(a))
            return a
        return self.txn(fn)

    def _creatable_dir(self, parent: int, raw: bytes | None, name) -> Attr:
        """Directory ``parent`` (its raw attributes ``raw``), checked to take new entries."""
        p = self._dir_attr(parent, raw, name)
        if self._in_trash(p):
            raise oserror(errno.EPERM, name, "nothing can be created in the trash")
        return p

    def mknod(self, parent: int, name: str, typ: int, mode: int = 0o644, uid: int = 0,
              gid: int = 0, target: str | None = None) -> Attr:
        check_name(name)
        _check_free(parent, name)
        if typ not in (TYPE_FILE, TYPE_DIR, TYPE_SYMLINK):
            raise oserror(errno.EINVAL, name, f"unknown inode type {typ}")
        tbytes = b""
        if typ == TYPE_SYMLINK:
            if not target:
                raise oserror(errno.EINVAL, name, "empty symlink target")
            tbytes = _enc(target)
            if len(tbytes) > 4096:
                raise oserror(errno.ENAMETOOLONG, name)
        ino = self._next_inode()
        ename = _enc(name)
        length = DIR_LENGTH if typ == TYPE_DIR else len(tbytes)
        pkey, dkey = _ikey(parent), _dkey(parent)

        def fn(tx):
            praw, exist = tx.batch([("get", pkey), ("hget", dkey, ename)])
            p = self._creatable_dir(parent, praw, name)
            if exist is not None:
                raise oserror(errno.EEXIST, name)
            now = time.time()
            a = Attr(ino, typ, mode & 0o7777, uid, gid, now, now, now,
                     2 if typ == TYPE_DIR else 1, length, parent)
            p.mtime = p.ctime = now
            if typ == TYPE_DIR:
                p.nlink += 1
            tx.set(_ikey(ino), pack_attr(a))
            if typ == TYPE_SYMLINK:
                tx.set(f"s{ino}", tbytes)
            tx.hset(dkey, ename, pack_entry(typ, ino))
            tx.set(pkey, pack_attr(p))
            tx.incrby("usedSpace", align4k(length))
            tx.incrby("totalInodes", 1)
            return a
        return self.txn(fn)

    def create_files(self, parent: int, names: list[str], mode: int = 0o644, uid: int = 0,
                     gid: int = 0) -> list[Attr | None]:
        """Create many empty regular files in directory ``parent`` in one transaction (a batch
        of ``create``); for a name that exists already (or comes twice), None -- the caller
        handles those one by one. Names are checked as ``create`` checks them."""
        if not names:
            return []
        for name in names:
            check_name(name)
            _check_free(parent, name)
        enames = [_enc(n) for n in names]
        inos = [self._next_inode() for _ in names]
        pkey, dkey = _ikey(parent), _dkey(parent)

        def fn(tx):
            p = self._creatable_dir(parent, tx.get(pkey), names[0])
            exist = tx.hmget(dkey, enames)
            now = time.time()
            out: list[Attr | None] = []
            seen: set[bytes] = set()
            for ino, ename, e in zip(inos, enames, exist):
                if e is not None or ename in seen:
                    out.append(None)
                    continue
                seen.add(ename)
                a = Attr(ino, TYPE_FILE, mode & 0o7777, uid, gid, now, now, now, 1, 0, parent)
                tx.set(_ikey(ino), pack_attr(a))
                tx.hset(dkey, ename, pack_entry(TYPE_FILE, ino))
                out.append(a)
            made = len(seen)
            if made:
                p.mtime = p.ctime = now
                tx.set(pkey, pack_attr(p))
                tx.incrby("usedSpace", made * align4k(0))
                tx.incrby("totalInodes", made)
            return out
        return self.txn(fn)

    def readlink(self, inode: int) -> str:
        def fn(tx):
            raw, target = tx.batch([("get", _ikey(inode)), ("get", f"s{inode}")])
            if raw is None:
                raise oserror(errno.ENOENT, f"inode {inode}")
            if raw[0] != TYPE_SYMLINK or target is None:
                raise oserror(errno.EINVAL, f"inode {inode}", "not a symlink")
            return _dec(target)
        return self.txn(fn, readonly=True)

    def unlink(self, parent: int, name: str) -> None:
        check_name(name)
        self._unlink(parent, _enc(name), name, self._trash_days() > 0)

    def _unlink(self, parent: int, ename: bytes, name, trash: bool) -> None:
        pkey, dkey = _ikey(parent), _dkey(parent)

        def fn(tx):
            praw, e = tx.batch([("get", pkey), ("hget", dkey, ename)])
            p = self._dir_attr(parent, praw, name)
            if e is None:
                raise oserror(errno.ENOENT, name)
            typ, ino = unpack_entry(e)
            if typ == TYPE_DIR:
                raise oserror(errno.EISDIR, name)
            raw = tx.get(_ikey(ino))
            freed: list = []
            now = time.time()
            to_trash = None
            if raw is None:             # dangling entry: just drop it
                a, chunks, drop = None, [], False
            else:
                a = unpack_attr(ino, raw)
                if trash and a.nlink <= 1 and a.typ == TYPE_FILE and not self._in_trash(p):
                    to_trash = self._trash_reads(tx, now)
                    drop = False
                else:
                    a.nlink = max(a.nlink - 1, 0)
                    a.ctime = now
                    drop = a.nlink == 0 and not self._is_open(ino)
                chunks, freed = self._read_inode_data(tx, a) if drop else ([], [])
            # writes
            tx.hdel(dkey, ename)
            p.mtime = p.ctime = now
            tx.set(pkey, pack_attr(p))
            if a is not None:
                self._unlinked(tx, a, parent, ename, to_trash, drop, chunks, now)
            return None, freed
        self._run(fn)

    # -- the trash ---------------------------------------------------------------------------------
    def _trash_days(self) -> int:
        fmt = self.fmt
        return fmt.trash_days if fmt is not None else 0

    @staticmethod
    def _in_trash(d: Attr) -> bool:
        """Directory ``d`` is the trash or one of its hour directories."""
        return d.inode == TRASH_INODE or d.parent == TRASH_INODE

    @staticmethod
    def trash_hour(ino: int) -> float:
        """The start (epoch seconds) of the hour a trash hour directory collects."""
        return float((ino - TRASH_INODE - 1) * 3600)

    @staticmethod
    def _trash_reads(tx, now: float) -> tuple:
        """Read phase of moving a file to the trash."""
        hours = int(now // 3600)
        hino = TRASH_INODE + 1 + hours
        hname = time.strftime("%Y-%m-%d-%H", time.gmtime(hours * 3600)).encode()
        root_raw, hour_raw = tx.batch([("get", _ikey(TRASH_INODE)), ("get", _ikey(hino))])
        return hino, hname, root_raw, hour_raw

    @staticmethod
    def _trash_writes(tx, a: Attr, parent: int, ename: bytes, prep: tuple, now: float) -> None:
        """Write phase: file ``a`` (entry ``ename`` of ``parent``, already removed there) goes
        into this hour's trash directory, made when missing. The caller writes ``a``."""
        hino, hname, root_raw, hour_raw = prep
        if hour_raw is None:
            if root_raw is None:
                root = Attr(TRASH_INODE, TYPE_DIR, 0o755, 0, 0, now, now, now, 2, DIR_LENGTH,
                            ROOT_INODE)
                tx.incrby("usedSpace", align4k(DIR_LENGTH))
                tx.incrby("totalInodes", 1)
            else:
                root = unpack_attr(TRASH_INODE, root_raw)
            root.nlink += 1
            root.mtime = root.ctime = now
            tx.set(_ikey(TRASH_INODE), pack_attr(root))
            tx.hset(_dkey(TRASH_INODE), hname, pack_entry(TYPE_DIR, hino))
            hour = Attr(hino, TYPE_DIR, 0o755, 0, 0, now, now, now, 2, DIR_LENGTH, TRASH_INODE)
            tx.incrby("usedSpace", align4k(DIR_LENGTH))
            tx.incrby("totalInodes", 1)
        else:
            hour = unpack_attr(hino, hour_raw)
            hour.mtime = hour.ctime = now
        tx.set(_ikey(hino), pack_attr(hour))
        tx.hset(_dkey(hino), b"%d-%d-" % (parent, a.inode) + ename, pack_entry(a.typ, a.inode))
        a.nlink = 1
        a.parent = hino
        a.ctime = now

    def trash_restore(self, hour: int, entry: str, parent: int | None = None,
                      name: str | None = None) -> Attr:
        """Move trashed file ``entry`` of hour directory ``hour`` back to ``parent``/``name``
        (default: where it was removed from). ENOENT when that directory is gone, EEXIST when
        the name is taken."""
        eb = _enc(entry)
        if parent is None or name is None:
            try:
                p0, _ino, n0 = entry.split("-", 2)
                parent = int(p0) if parent is None else parent
                name = n0 if name is None else name
            except ValueError:
                raise oserror(errno.EINVAL, entry, "not a trash entry name") from None
        check_name(name)
        nb = _enc(name)

        def fn(tx):
            hraw, e, praw, de = tx.batch([("get", _ikey(hour)), ("hget", _dkey(hour), eb),
                                          ("get", _ikey(parent)), ("hget", _dkey(parent), nb)])
            if hraw is None or unpack_attr(hour, hraw).parent != TRASH_INODE:
                raise oserror(errno.ENOENT, entry, "no such trash directory")
            if e is None:
                raise oserror(errno.ENOENT, entry)
            p = self._dir_attr(parent, praw, name)
            if self._in_trash(p):
                raise oserror(errno.EPERM, name, "cannot restore into the trash")
            if de is not None:
                raise oserror(errno.EEXIST, name)
            typ, ino = unpack_entry(e)
            a = self._get_attr(tx, ino, entry)
            h = unpack_attr(hour, hraw)
            now = time.time()
            tx.hdel(_dkey(hour), eb)
            tx.hset(_dkey(parent), nb, e)
            a.parent = parent
            a.ctime = now
            tx.set(_ikey(ino), pack_attr(a))
            p.mtime = p.ctime = h.mtime = h.ctime = now
            tx.set(_ikey(parent), pack_attr(p))
            tx.set(_ikey(hour), pack_attr(h))
            return a
        return self.txn(fn)

    def cleanup_trash(self, now: float | None = None, days: float | None = None) -> int:
        """Free the files of every trash hour that ended more than ``days`` (default: the
        volume's ``trash_days``) ago, and remove those hour directories. Returns the number of
        files freed (their blocks go to ``on_delete_slices``)."""
        now = time.time() if now is None else now
        days = self._trash_days() if days is None else days
        cutoff = now - days * 86400
        n = 0
        for hname, h in self.readdir(TRASH_INODE):
            if not h.is_dir or self.trash_hour(h.inode) + 3600 > cutoff:
                continue
            entries = self.txn(lambda tx: tx.hgetall(_dkey(h.inode)), readonly=True)
            for eb in entries:
                try:
                    self._unlink(h.inode, bytes(eb), _dec(eb), trash=False)
                    n += 1
                except (FileNotFoundError, IsADirectoryError):
                    pass                    # restored or freed meanwhile
            try:
                self.rmdir(TRASH_INODE, hname)
            except OSError as e:            # a file arrived meanwhile: the next round
                if e.errno not in (errno.ENOTEMPTY, errno.ENOENT):
                    raise
        return n

    def rmdir(self, parent: int, name: str) -> None:
        check_name(name)
        ename = _enc(name)
        pkey, dkey = _ikey(parent), _dkey(parent)

        def fn(tx):
            praw, e = tx.batch([("get", pkey), ("hget", dkey, ename)])
            p = self._dir_attr(parent, praw, name)
            if e is None:
                raise oserror(errno.ENOENT, name)
            typ, ino = unpack_entry(e)
            if typ != TYPE_DIR:
                raise oserror(errno.ENOTDIR, name)
            raw, n = tx.batch([("get", _ikey(ino)), ("hlen", _dkey(ino))])
            if n:
                raise oserror(errno.ENOTEMPTY, name)
            now = time.time()
            tx.hdel(dkey, ename)
            p.mtime = p.ctime = now
            p.nlink = max(p.nlink - 1, 2)
            tx.set(pkey, pack_attr(p))
            if raw is not None:
                self._free_inode(tx, unpack_attr(ino, raw), [])
        self.txn(fn)

    def rename(self, parent_src: int, name_src: str, parent_dst: int, name_dst: str,
               flags: int = 0) -> None:
        check_name(name_src)
        check_name(name_dst)
        _check_free(parent_dst, name_dst)
        if flags & RENAME_EXCHANGE:
            _check_free(parent_src, name_src)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or \
                flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise oserror(errno.EINVAL, name_src, f"bad rename flags {flags}")
        exchange = bool(flags & RENAME_EXCHANGE)
        trash = self._trash_days() > 0
        ps, pd = parent_src, parent_dst
        es, ed = _enc(name_src), _enc(name_dst)
        sk, dk = _dkey(ps), _dkey(pd)

        def fn(tx):
            ps_raw, pd_raw, se, de = tx.batch([("get", _ikey(ps)), ("get", _ikey(pd)),
                                               ("hget", sk, es), ("hget", dk, ed)])
            attrs: dict[int, Attr] = {}
            attrs[ps] = self._dir_attr(ps, ps_raw, name_src)
            if pd != ps:
                attrs[pd] = self._dir_attr(pd, pd_raw, name_dst)
            if self._in_trash(attrs[pd]) or ps == TRASH_INODE or (exchange and
                                                                  self._in_trash(attrs[ps])):
                raise oserror(errno.EPERM, name_dst, "nothing can be moved into the trash")
            if se is None:
                raise oserror(errno.ENOENT, name_src)
            styp, sino = unpack_entry(se)
            dtyp = dino = None
            if de is not None:
                dtyp, dino = unpack_entry(de)
                if dino == sino:        # same name, or two links of one inode: nothing to do
                    return None, []
                if flags & RENAME_NOREPLACE:
                    raise oserror(errno.EEXIST, name_dst)
            elif exchange:
                raise oserror(errno.ENOENT, name_dst)
            ops = [("get", _ikey(sino))]
            if dino is not None:
                ops.append(("get", _ikey(dino)))
                if dtyp == TYPE_DIR and not exchange:
                    ops.append(("hlen", _dkey(dino)))
            got = tx.batch(ops)
            if got[0] is None:
                raise oserror(errno.ENOENT, name_src)
            sattr = unpack_attr(sino, got[0])
            dattr = None
            if dino is not None:
                if not exchange:
                    if styp == TYPE_DIR and dtyp != TYPE_DIR:
                        raise oserror(errno.ENOTDIR, name_dst)
                    if styp != TYPE_DIR and dtyp == TYPE_DIR:
                        raise oserror(errno.EISDIR, name_dst)
                    if dtyp == TYPE_DIR and got[2]:
                        raise oserror(errno.ENOTEMPTY, name_dst)
                if got[1] is not None:
                    dattr = unpack_attr(dino, got[1])
            # a directory may not move below itself
            if styp == TYPE_DIR and ps != pd:
                self._check_not_below(tx, sino, pd, attrs, name_dst)
            if exchange and dtyp == TYPE_DIR and ps != pd:
                self._check_not_below(tx, dino, ps, attrs, name_src)

            now = time.time()
            freed: list = []
            drop_chunks: list[str] = []
            drop = False
            to_trash = None
            if dattr is not None and not exchange and dtyp != TYPE_DIR:
                if trash and dattr.nlink <= 1 and dattr.typ == TYPE_FILE and \
                        not self._in_trash(attrs[ps]):
                    to_trash = self._trash_reads(tx, now)
                else:
                    dattr.nlink = max(dattr.nlink - 1, 0)
                    dattr.ctime = now
                    drop = dattr.nlink == 0 and not self._is_open(dino)
                if drop:
                    drop_chunks, freed = self._read_inode_data(tx, dattr)
            # -- writes from here on --
            src_p, dst_p = attrs[ps], attrs[pd]
            if exchange:
                tx.hset(sk, es, de)
                tx.hset(dk, ed, se)
                if ps != pd:
                    self._moved(sattr, styp, src_p, dst_p)
                    if dattr is not None:
                        self._moved(dattr, dtyp, dst_p, src_p)
                    elif dtyp == TYPE_DIR:
                        dst_p.nlink -= 1
                        src_p.nlink += 1
                if dattr is not None:
                    dattr.ctime = now
                    tx.set(_ikey(dino), pack_attr(dattr))
            else:
                if dino is not None:
                    if dtyp == TYPE_DIR:
                        dst_p.nlink -= 1
                        if dattr is not None:
                            self._free_inode(tx, dattr, [])
                    elif dattr is not None:
                        self._unlinked(tx, dattr, pd, ed, to_trash, drop, drop_chunks, now)
                tx.hdel(sk, es)
                tx.hset(dk, ed, se)
                if ps != pd:
                    self._moved(sattr, styp, src_p, dst_p)
            sattr.ctime = now
            tx.set(_ikey(sino), pack_attr(sattr))
            for p in attrs.values():
                p.mtime = p.ctime = now
                tx.set(_ikey(p.inode), pack_attr(p))
            return None, freed
        self._run(fn)

    @staticmethod
    def _moved(a: Attr, typ: int, src_p: Attr, dst_p: Attr) -> None:
        """``a`` moved from directory ``src_p`` to ``dst_p`` (different ones)."""
        if typ == TYPE_DIR:
            a.parent = dst_p.inode
            src_p.nlink -= 1
            dst_p.nlink += 1
        elif a.parent == src_p.inode:
            a.parent = dst_p.inode

    @staticmethod
    def _check_not_below(tx, ino: int, start: int, attrs: dict[int, Attr], path) -> None:
        """EINVAL when directory ``start`` is ``ino`` or lies below it."""
        cur = start
        for _ in range(100_000):
            if cur == ino:
                raise oserror(errno.EINVAL, path, "a directory cannot move into itself")
            if cur == ROOT_INODE:
                return
            a = attrs.get(cur)
            if a is None:
                raw = tx.get(_ikey(cur))
                if raw is None:
                    raise oserror(errno.ENOENT, path)
                a = unpack_attr(cur, raw)
            cur = a.parent
        raise oserror(errno.ELOOP, path, "directory tree has a cycle")

    def link(self, inode: int, parent: int, name: str) -> Attr:
        check_name(name)
        _check_free(parent, name)
        ename = _enc(name)
        pkey, dkey = _ikey(parent), _dkey(parent)

        def fn(tx):
            raw, praw, e = tx.batch([("get", _ikey(inode)), ("get", pkey),
                                     ("hget", dkey, ename)])
            if raw is None:
                raise oserror(errno.ENOENT, name)
            a = unpack_attr(inode, raw)
            if a.typ == TYPE_DIR:
                raise oserror(errno.EPERM, name, "hard link to a directory")
            if a.nlink == 0:
                raise oserror(errno.ENOENT, name)
            p = self._dir_attr(parent, praw, name)
            if self._in_trash(p):
                raise oserror(errno.EPERM, name, "nothing can be created in the trash")
            if e is not None:
                raise oserror(errno.EEXIST, name)
            now = time.time()
            a.nlink += 1
            a.parent = 0
            a.ctime = now
            p.mtime = p.ctime = now
            tx.hset(dkey, ename, pack_entry(a.typ, inode))
            tx.set(_ikey(inode), pack_attr(a))
            tx.set(pkey, pack_attr(p))
            return a
        return self.txn(fn)

    def readdir(self, inode: int) -> list[tuple[str, Attr]]:
        def fn(tx):
            raw, entries = tx.batch([("get", _ikey(inode)), ("hgetall", _dkey(inode))])
            if raw is None and inode == TRASH_INODE:
                return []
            self._dir_attr(inode, raw, f"inode {inode}")
            items = sorted((_dec(k), int(v[1:])) for k, v in entries.items())
            raws = tx.gets([_ikey(ino) for _n, ino in items]) if items else []
            return [(n, unpack_attr(ino, r)) for (n, ino), r in zip(items, raws) if r is not None]
        return self.txn(fn, readonly=True)

    def readdir_files(self, inode: int) -> tuple[bytes, dict]:
        def fn(tx):
            raw = tx.get(_ikey(inode))
            self._dir_attr(inode, raw, f"inode {inode}")
            return bytes(raw), self._dir_files(tx, inode)
        return self.txn(fn, readonly=True)

    def _dir_files(self, tx, dir_ino: int) -> dict:
        """:meth:`_files_in` of every entry of directory ``dir_ino`` (its entries read once);
        engines may do it in one statement."""
        return self._with_file_data(tx, {bytes(n): [*unpack_entry(bytes(e)), None, []]
                                         for n, e in tx.hgetall(_dkey(dir_ino)).items()})

    def raw_attrs(self, inodes: list[int], since: int | None = None) -> list[bytes | None] | None:
        def fn(tx):
            if since is not None and tx.counter(ATTR_CHANGES) == since:
                return None
            return tx.gets([_ikey(i) for i in inodes])
        return self.txn(fn, readonly=True)

    def attr_changes(self) -> int:
        return self.txn(lambda tx: tx.counter(ATTR_CHANGES), readonly=True)

    # -- data --------------------------------------------------------------------------------------
    def truncate(self, inode: int, length: int) -> Attr:
        if length < 0:
            raise oserror(errno.EINVAL, f"inode {inode}", "negative length")

        def fn(tx):
            a = self._get_attr(tx, inode)
            if a.typ == TYPE_DIR:
                raise oserror(errno.EISDIR, f"inode {inode}")
            if a.typ != TYPE_FILE:
                raise oserror(errno.EINVAL, f"inode {inode}")
            old = a.length
            drop_keys: list[str] = []
            freed: list = []
            hole = None
            if length < old:
                first = (length - 1) // CHUNK_SIZE + 1 if length > 0 else 0
                drop_keys = self._chunk_keys(inode, old, first)
                if drop_keys:
                    freed = self._unref(tx, self._slices_of(
                        tx.batch([("lrange", k) for k in drop_keys])))
                pos = length % CHUNK_SIZE
                if pos:
                    indx = length // CHUNK_SIZE
                    end = min(old - indx * CHUNK_SIZE, CHUNK_SIZE)
                    if end > pos:
                        hole = (indx, Slice(pos, 0, 0, 0, end - pos))
            now = time.time()
            for k in drop_keys:
                tx.delete(k, "list")
            if hole is not None:
                tx.rpush(_ckey(inode, hole[0]), pack_slice(hole[1]))
            a.length = length
            a.mtime = a.ctime = now
            tx.set(_ikey(inode), pack_attr(a))
            delta = align4k(length) - align4k(old)
            if delta:
                tx.incrby("usedSpace", delta)
            return a, freed
        return self._run(fn)

    def read_chunk(self, inode: int, index: int) -> list[Slice]:
        def fn(tx):
            raw, items = tx.batch([("get", _ikey(inode)), ("lrange", _ckey(inode, index))])
            if raw is None:
                raise oserror(errno.ENOENT, f"inode {inode}")
            return unpack_slices(items)
        return self.txn(fn, readonly=True)

    def write_chunk(self, inode: int, index: int, slice_: Slice,
                    mtime: float | None = None) -> Attr:
        s = slice_
        if index < 0 or s.pos < 0 or s.len <= 0 or s.off < 0 or s.pos + s.len > CHUNK_SIZE or \
                s.id < 0 or (s.id > 0 and s.off + s.len > s.size):
            raise oserror(errno.EINVAL, f"inode {inode}", f"bad slice {s} for chunk {index}")
        packed = pack_slice(s)
        ckey = _ckey(inode, index)
        end = index * CHUNK_SIZE + s.pos + s.len

        def fn(tx):
            raw, n = tx.batch([("get", _ikey(inode)), ("llen", ckey)])
            if raw is None:
                raise oserror(errno.ENOENT, f"inode {inode}")
            a = unpack_attr(inode, raw)
            if a.typ == TYPE_DIR:
                raise oserror(errno.EISDIR, f"inode {inode}")
            if a.typ != TYPE_FILE:
                raise oserror(errno.EINVAL, f"inode {inode}")
            now = time.time()
            old = a.length
            if end > old:
                a.length = end
            a.mtime = now if mtime is None else mtime
            a.ctime = now
            tx.rpush(ckey, packed)
            tx.set(_ikey(inode), pack_attr(a))
            delta = align4k(a.length) - align4k(old)
            if delta:
                tx.incrby("usedSpace", delta)
            return a, n + 1
        a, n = self.txn(fn)
        cb = self.on_compact
        if cb is not None and n >= self.compact_threshold:
            try:
                cb(inode, index, n)
            except Exception:
                log.exception("on_compact failed")
        return a

    def write_shared(self, sid: int, size: int, parts: list[tuple[int, int, int]]) -> list[int]:
        """Packing: make ranges of one uploaded slice (``sid``, ``size`` bytes) the content of
        several files in one transaction. Each ``(inode, off, length)`` writes bytes
        ``[off, off+length)`` of the slice at the start of that file, as :meth:`write_chunk`
        would, and the slice counts one reference per file (see :meth:`_unref`). Inodes gone
        meanwhile (or no longer regular files) are skipped; returns the inodes written. When none
        is left, the slice is freed (``on_delete_slices``)."""
        if not 0 < size <= CHUNK_SIZE:
            raise oserror(errno.EINVAL, None, f"bad shared slice size {size}")
        for ino, off, n in parts:
            if off < 0 or n <= 0 or off + n > size:
                raise oserror(errno.EINVAL, f"inode {ino}",
                              f"bad range [{off}, {off + n}) of slice {sid} ({size} bytes)")

        def fn(tx):
            inos = list(dict.fromkeys(ino for ino, _, _ in parts))
            attrs = {ino: unpack_attr(ino, raw)
                     for ino, raw in zip(inos, tx.gets([_ikey(i) for i in inos]))
                     if raw is not None}
            now = time.time()
            used = 0
            done: list[int] = []
            for ino, off, n in parts:           # a file listed twice: the later range wins
                a = attrs.get(ino)
                if a is None or a.typ != TYPE_FILE:
                    continue
                old = a.length
                a.length = max(old, n)
                a.mtime = a.ctime = now
                tx.rpush(_ckey(ino, 0), pack_slice(Slice(0, sid, size, off, n)))
                used += align4k(a.length) - align4k(old)
                done.append(ino)
            for ino in dict.fromkeys(done):
                tx.set(_ikey(ino), pack_attr(attrs[ino]))
            if used:
                tx.incrby("usedSpace", used)
            files = len(set(done))          # a file listed twice holds the slice in one chunk
            if files > 1:
                self._set_holders(tx, sid, files)
            return done, ([] if done else [(sid, size)])
        return self._run(fn)

    def replace_chunk(self, inode: int, index: int, old: list[Slice], new: list[Slice]) -> bool:
        """Compaction's commit: make ``new`` the slice list of chunk ``index`` if it is still
        exactly ``old`` (else False: something wrote meanwhile; nothing changes). The slices of
        ``old`` that ``new`` does not use are kept ``slice_delay`` seconds (readers may hold the
        old list) and then deleted by :meth:`cleanup_delayed_slices`. Attributes do not change."""
        expected = [pack_slice(s) for s in old]
        packed = [pack_slice(s) for s in new]
        keep = {s.id for s in new}
        ckey = _ckey(inode, index)

        def fn(tx):
            raw, items = tx.batch([("get", _ikey(inode)), ("lrange", ckey)])
            if raw is None or [bytes(x) for x in items] != expected:
                return False
            gone = self._unref(tx, [s for s in self._slices_of([items]) if s[0] not in keep])
            tx.delete(ckey, "list")
            for p in packed:
                tx.rpush(ckey, p)
            stamp = repr(time.time()).encode()
            for sid, size in gone:
                tx.hset("pendingDelete", str(sid).encode(), b"%d," % size + stamp)
            return True
        return self.txn(fn)

    def list_delayed_slices(self) -> list[tuple[int, int]]:
        raw = self.txn(lambda tx: tx.hgetall("pendingDelete"), readonly=True)
        return [(int(k), int(bytes(v).split(b",")[0])) for k, v in raw.items()]

    def cleanup_delayed_slices(self, older_than: float | None = None) -> int:
        """Delete (``on_delete_slices``) the slices compaction replaced more than ``older_than``
        seconds ago (default ``slice_delay``). Returns how many; 0 without ``on_delete_slices``."""
        if self.on_delete_slices is None:
            return 0
        cutoff = time.time() - (self.slice_delay if older_than is None else older_than)
        raw = self.txn(lambda tx: tx.hgetall("pendingDelete"), readonly=True)
        due = []
        for k, v in raw.items():
            size, stamp = bytes(v).split(b",")
            if float(stamp) <= cutoff:
                due.append((int(k), int(size)))
        if not due:
            return 0

        def fn(tx):
            for sid, _size in due:
                tx.hdel("pendingDelete", str(sid).encode())
            return None, due
        self._run(fn)
        return len(due)

    def open_file(self, inode: int) -> None:
        with self._open_lock:
            self._open[inode] = self._open.get(inode, 0) + 1

    def close_file(self, inode: int) -> None:
        with self._open_lock:
            if inode not in self._open:
                return                  # not opened through this instance (or in this process)
            n = self._open[inode] - 1
            if n > 0:
                self._open[inode] = n
                return
            self._open.pop(inode, None)
        # the common case, a file that still has links, needs no write transaction
        raw = self.txn(lambda tx: tx.get(_ikey(inode)), readonly=True)
        if raw is None or unpack_attr(inode, raw).nlink > 0:
            return

        def fn(tx):
            raw = tx.get(_ikey(inode))
            if raw is None:
                return None, []
            a = unpack_attr(inode, raw)
            if a.nlink > 0 or self._is_open(inode):
                return None, []
            keys, freed = self._read_inode_data(tx, a)
            self._free_inode(tx, a, keys)
            tx.hdel("sustained", str(inode).encode())
            return None, freed
        self._run(fn)

    # -- xattrs ------------------------------------------------------------------------------------
    @staticmethod
    def _check_xname(name: str) -> bytes:
        if not name:
            raise oserror(errno.EINVAL, name, "empty xattr name")
        raw = _enc(name)
        if len(raw) > MAX_NAME:
            raise oserror(errno.ERANGE, name)
        return raw

    def getxattr(self, inode: int, name: str) -> bytes:
        xn = self._check_xname(name)

        def fn(tx):
            raw, v = tx.batch([("get", _ikey(inode)), ("hget", f"x{inode}", xn)])
            if raw is None:
                raise oserror(errno.ENOENT, f"inode {inode}")
            if v is None:
                raise oserror(errno.ENODATA, name)
            return bytes(v)
        return self.txn(fn, readonly=True)

    def setxattr(self, inode: int, name: str, value: bytes, flags: int = 0) -> None:
        xn = self._check_xname(name)
        if flags & ~(XATTR_CREATE | XATTR_REPLACE) or flags == XATTR_CREATE | XATTR_REPLACE:
            raise oserror(errno.EINVAL, name, f"bad xattr flags {flags}")
        value = bytes(value)
        if len(value) > 65536:
            raise oserror(errno.E2BIG, name)

        def fn(tx):
            raw, v = tx.batch([("get", _ikey(inode)), ("hget", f"x{inode}", xn)])
            if raw is None:
                raise oserror(errno.ENOENT, f"inode {inode}")
            if flags & XATTR_CREATE and v is not None:
                raise oserror(errno.EEXIST, name)
            if flags & XATTR_REPLACE and v is None:
                raise oserror(errno.ENODATA, name)
            tx.hset(f"x{inode}", xn, value)
        self.txn(fn)

    def listxattr(self, inode: int) -> list[str]:
        def fn(tx):
            raw, xs = tx.batch([("get", _ikey(inode)), ("hgetall", f"x{inode}")])
            if raw is None:
                raise oserror(errno.ENOENT, f"inode {inode}")
            return sorted(_dec(k) for k in xs)
        return self.txn(fn, readonly=True)

    def removexattr(self, inode: int, name: str) -> None:
        xn = self._check_xname(name)

        def fn(tx):
            raw, v = tx.batch([("get", _ikey(inode)), ("hget", f"x{inode}", xn)])
            if raw is None:
                raise oserror(errno.ENOENT, f"inode {inode}")
            if v is None:
                raise oserror(errno.ENODATA, name)
            tx.hdel(f"x{inode}", xn)
        self.txn(fn)

    # -- whole volume ------------------------------------------------------------------------------
    def list_slices(self) -> list[tuple[int, int]]:
        def fn(tx):
            keys = tx.scan_keys("c")
            return self._slices_of(tx.batch([("lrange", k) for k in keys])) if keys else []
        return self.txn(fn, readonly=True)

    _COUNTERS = ("nextInode", "nextSlice", "nextSession", "usedSpace", "totalInodes")
    _ID_COUNTERS = ("nextInode", "nextSlice", "nextSession")

    # -- dump / load -------------------------------------------------------------------------------
    def dump_iter(self, batch: int = 500) -> Iterator[tuple[str, object]]:
        """The volume piece by piece: ``("setting", dict)``, then ``("inode", (ino, node))`` for
        every inode (``batch`` inodes per round trip), then ``("counters", dict)``. Files unlinked
        while open (nlink 0) are left out (their blocks become garbage for gc), so ``usedSpace``
        and ``totalInodes`` are counted from what was dumped. Sessions are left out. Each batch is
        read in its own transaction: dump a quiet volume for a consistent copy."""
        def head(tx):
            return tx.get("setting"), tx.batch([("counter", k) for k in self._ID_COUNTERS]), \
                [k for k in tx.scan_keys("i") if k[1:].isdigit()]
        setting, ids, ikeys = self.txn(head, readonly=True)
        if setting is None:
            raise self._not_formatted()
        yield "setting", json.loads(setting)
        used = total = 0
        for i in range(0, len(ikeys), batch):
            part = ikeys[i: i + batch]
            for ino, node in self.txn(lambda tx: self._dump_nodes(tx, part), readonly=True):
                used += align4k(node["length"])
                total += 1
                yield "inode", (ino, node)
        counters = dict(zip(self._ID_COUNTERS, (int(c) for c in ids)))
        counters.update(usedSpace=used, totalInodes=total)
        yield "counters", counters

    def _dump_nodes(self, tx, ikeys: list[str]) -> list[tuple[int, dict]]:
        import base64
        attrs = []
        ops: list = []
        for k, raw in zip(ikeys, tx.gets(ikeys)):
            if raw is None:
                continue
            a = unpack_attr(int(k[1:]), raw)
            if a.nlink == 0 and a.typ != TYPE_DIR:
                continue                    # unlinked, kept only for an open handle
            ckeys = self._chunk_keys(a.inode, a.length) if a.typ == TYPE_FILE else []
            attrs.append((a, len(ops), ckeys))
            ops.append(("hgetall", f"x{a.inode}"))
            if a.typ == TYPE_DIR:
                ops.append(("hgetall", _dkey(a.inode)))
            elif a.typ == TYPE_SYMLINK:
                ops.append(("get", f"s{a.inode}"))
            ops += [("lrange", ck) for ck in ckeys]
        got = tx.batch(ops) if ops else []
        out = []
        for a, at, ckeys in attrs:
            node = {f: getattr(a, f) for f in ("typ", "mode", "uid", "gid", "atime", "mtime",
                                               "ctime", "nlink", "length", "parent")}
            if got[at]:
                node["xattrs"] = {_dec(n): base64.b64encode(v).decode()
                                  for n, v in sorted(got[at].items())}
            at += 1
            if a.typ == TYPE_DIR:
                node["entries"] = {_dec(n): unpack_entry(v)[1] for n, v in sorted(got[at].items())}
                at += 1
            elif a.typ == TYPE_SYMLINK:
                node["target"] = _dec(got[at] or b"")
                at += 1
            chunks = {}
            for ck, items in zip(ckeys, got[at: at + len(ckeys)]):
                if items:
                    chunks[ck.rsplit("_", 1)[1]] = [list(_SLICE.unpack(r)) for r in items]
            if chunks:
                node["chunks"] = chunks
            out.append((a.inode, node))
        return out

    def dump(self) -> dict:
        """The whole volume as a JSON-able dict (settings, counters, every inode with its entries,
        xattrs, symlink target and chunks); see :meth:`dump_iter`. :meth:`load_dump` puts it into
        an empty engine of any kind."""
        out: dict = {"format": "torchjuice-meta-dump", "version": 1}
        inodes = {}
        for kind, value in self.dump_iter():
            if kind == "inode":
                inodes[str(value[0])] = value[1]
            else:
                out[kind] = value
        out["inodes"] = inodes
        return out

    def dump_to(self, fp: IO[str], progress: Callable[[int], None] | None = None) -> int:
        """Write :meth:`dump` as JSON to text file ``fp`` without building it in memory (one
        inode per line). ``progress(1)`` is called per inode. Returns the number of inodes."""
        n = 0
        fp.write('{"format": "torchjuice-meta-dump", "version": 1,\n')
        for kind, value in self.dump_iter():
            if kind == "setting":
                fp.write(f'"setting": {json.dumps(value, sort_keys=True)},\n"inodes": {{')
            elif kind == "inode":
                fp.write(f'{"," if n else ""}\n"{value[0]}": '
                         f'{json.dumps(value[1], separators=(",", ":"))}')
                n += 1
                if progress is not None:
                    progress(1)
            else:
                fp.write(f'}},\n"counters": {json.dumps(value, sort_keys=True)}}}\n')
        return n

    def load_dump(self, data: dict, force: bool = False, batch: int = 1000,
                  progress: Callable[[int], None] | None = None) -> None:
        """Fill an empty engine from :meth:`dump`'s output. An engine holding anything raises
        ``AlreadyFormattedError`` unless ``force`` (then everything in it is removed first).
        Inodes go in ``batch`` per transaction; the settings last, so an interrupted load leaves
        an engine that is not a volume (load again with ``force``)."""
        import base64
        if data.get("format") != "torchjuice-meta-dump":
            raise oserror(errno.EINVAL, None, "not a torchjuice metadata dump")
        fmt = Format.from_json(json.dumps(data["setting"]))
        setting, keys = self.txn(lambda tx: (tx.get("setting"), tx.scan_keys("")), readonly=True)
        if keys and not force:
            what = (f"volume {Format.from_json(setting).name!r}" if setting is not None else
                    f"{len(keys)} keys")
            raise AlreadyFormattedError(f"{redact(self.url)} already holds {what} (--force / "
                                        "force=True replaces it)")
        keys = [k for k in keys if k != ATTR_CHANGES]      # it only ever goes up (see above)
        for i in range(0, len(keys), batch):
            part = keys[i: i + batch]
            self.txn(lambda tx: [tx.delete(k) for k in part])
        nodes = data["inodes"]
        items = list(nodes.items())

        def put(tx, part):
            for sino, node in part:
                ino = int(sino)
                a = Attr(ino, node["typ"], node["mode"], node["uid"], node["gid"], node["atime"],
                         node["mtime"], node["ctime"], node["nlink"], node["length"],
                         node["parent"])
                tx.set(_ikey(ino), pack_attr(a))
                for n, v in node.get("xattrs", {}).items():
                    tx.hset(f"x{ino}", _enc(n), base64.b64decode(v))
                if "target" in node:
                    tx.set(f"s{ino}", _enc(node["target"]))
                for n, child in node.get("entries", {}).items():
                    cnode = nodes.get(str(child))
                    if cnode is not None:           # else a dangling entry: dropped
                        tx.hset(_dkey(ino), _enc(n), pack_entry(cnode["typ"], child))
                for indx, slices in node.get("chunks", {}).items():
                    ck = _ckey(ino, int(indx))
                    for sl in slices:
                        tx.rpush(ck, _SLICE.pack(*sl))
        for i in range(0, len(items), batch):
            part = items[i: i + batch]
            self.txn(lambda tx: put(tx, part))
            if progress is not None:
                progress(len(part))
        # packed slices: one reference per chunk that holds them (counted, not dumped)
        holders: Counter = Counter(sl[1] for node in nodes.values()
                                   for slices in node.get("chunks", {}).values()
                                   for sl in {s[1]: s for s in slices}.values() if sl[1] > 0)
        shared = [(sid, n) for sid, n in holders.items() if n > 1]
        for i in range(0, len(shared), batch):
            part = shared[i: i + batch]
            self.txn(lambda tx: [self._set_holders(tx, sid, n) for sid, n in part])

        def finish(tx):
            _start_attr_changes(tx, tx.counter(ATTR_CHANGES))
            for k, v in data["counters"].items():
                if v:
                    tx.incrby(k, int(v))
            tx.set("setting", fmt.to_json().encode())
        self.txn(finish)
        self.fmt = fmt

    # -- fsck --------------------------------------------------------------------------------------
    def _inspect(self) -> list[tuple]:
        """The inconsistencies of the namespace as ``(kind, message, *details)``."""
        def fn(tx):
            ikeys = [k for k in tx.scan_keys("i") if k[1:].isdigit()]
            dkeys = [k for k in tx.scan_keys("d") if k[1:].isdigit()]
            inos = [int(k[1:]) for k in ikeys]
            attrs = {ino: unpack_attr(ino, r)
                     for ino, r in zip(inos, tx.gets(ikeys) if ikeys else []) if r is not None}
            dirs = {int(k[1:]): tx.hgetall(k) for k in dkeys}
            used, total = tx.batch([("counter", "usedSpace"), ("counter", "totalInodes")])
            return attrs, dirs, used, total
        attrs, dirs, used, total = self.txn(fn, readonly=True)
        problems: list[tuple] = []
        refs: Counter = Counter()
        subdirs: Counter = Counter()
        where: dict[int, list[tuple[int, bytes]]] = {}
        for d, entries in dirs.items():
            if not entries:
                continue
            da = attrs.get(d)
            if da is None or da.typ != TYPE_DIR:
                problems.append(("notdir", f"entries under inode {d}, which is not a directory",
                                 d))
                continue
            for k, v in entries.items():
                typ, ino = unpack_entry(v)
                a = attrs.get(ino)
                if a is None:
                    problems.append(("dangling", f"entry {_dec(k)!r} in {d} points at missing "
                                                 f"inode {ino}", d, bytes(k)))
                    continue
                if a.typ != typ:
                    problems.append(("etype", f"entry {_dec(k)!r} in {d}: type {typ} but inode "
                                              f"{ino} is {a.typ}", d, bytes(k), a.typ, ino))
                refs[ino] += 1
                where.setdefault(ino, []).append((d, bytes(k)))
                if a.typ == TYPE_DIR:
                    subdirs[d] += 1
        for ino, a in attrs.items():
            if a.typ == TYPE_DIR:
                if ino == TRASH_INODE:
                    if a.parent != ROOT_INODE:
                        problems.append(("parent", f"trash parent {a.parent} != {ROOT_INODE}",
                                         ino, ROOT_INODE))
                elif ino != ROOT_INODE and refs[ino] == 0:
                    problems.append(("orphan", f"directory {ino} is orphaned", ino))
                elif ino != ROOT_INODE and refs[ino] > 1:
                    problems.append(("dirrefs", f"directory {ino} has {refs[ino]} entries", ino,
                                     where[ino]))
                if a.nlink != 2 + subdirs[ino]:
                    problems.append(("nlink", f"directory {ino} nlink {a.nlink} != 2 + "
                                              f"{subdirs[ino]}", ino, 2 + subdirs[ino]))
                if ino != ROOT_INODE and refs[ino] == 1 and a.parent != where[ino][0][0]:
                    problems.append(("parent", f"directory {ino} parent {a.parent} != "
                                               f"{where[ino][0][0]}", ino, where[ino][0][0]))
            else:
                if a.nlink == 0 and refs[ino] == 0:
                    continue                     # unlinked while open somewhere
                if refs[ino] == 0:
                    problems.append(("orphan", f"inode {ino} is orphaned (nlink {a.nlink})", ino))
                elif a.nlink != refs[ino]:
                    problems.append(("nlink", f"inode {ino} nlink {a.nlink} != {refs[ino]} "
                                              "entries", ino, refs[ino]))
                elif refs[ino] == 1 and a.parent not in (0, where[ino][0][0]):
                    problems.append(("parent", f"inode {ino} parent {a.parent} != "
                                               f"{where[ino][0][0]}", ino, where[ino][0][0]))
        if total != len(attrs):
            problems.append(("counter", f"totalInodes {total} != {len(attrs)} inodes",
                             "totalInodes", len(attrs) - total))
        space = sum(align4k(a.length) for a in attrs.values())
        if used != space:
            problems.append(("counter", f"usedSpace {used} != {space}", "usedSpace",
                             space - used))
        problems += self._inspect_slice_refs(attrs)
        return problems

    def _inspect_slice_refs(self, attrs: dict[int, Attr]) -> list[tuple]:
        """Packed slices: every ``k{sid}`` count against the chunks that hold the slice (a
        count too low would free data still in use; too high, leak it)."""
        files = [a for a in attrs.values() if a.typ == TYPE_FILE]

        def fn(tx):
            ckeys = [k for a in files for k in self._chunk_keys(a.inode, a.length)]
            lists = tx.batch([("lrange", k) for k in ckeys]) if ckeys else []
            kkeys = [k for k in tx.scan_keys("k") if k[1:].isdigit()]
            return lists, dict(zip(kkeys, tx.gets(kkeys) if kkeys else []))
        lists, stored = self.txn(fn, readonly=True)
        holders = Counter(sid for items in lists for sid, _ in self._slices_of([items]))
        problems = []
        for sid, n in holders.items():
            raw = stored.pop(_rkey(sid), None)
            have = int(raw) + 1 if raw is not None else 1
            if have != n:
                problems.append(("sliceref", f"slice {sid} counts {have} references, "
                                             f"{n} chunk(s) hold it", sid, n))
        for k in stored:
            problems.append(("sliceref", f"slice {k[1:]} counts references but no chunk holds "
                                         "it", int(k[1:]), 0))
        return problems

    def check(self) -> list[str]:
        """fsck: the problems found in the whole tree (empty when consistent). Checks that every
        entry points at an inode of its type, no inode is orphaned, nlink counts match the entries
        (files) and 2 + subdirectories (dirs), parents are right and the usedSpace/totalInodes
        counters agree. Files with nlink 0 (unlinked while open) are not problems. On engines
        without snapshot reads (Redis) run it on a quiet volume."""
        return [p[1] for p in self._inspect()]

    def repair(self) -> list[str]:
        """Fix what :meth:`check` finds, on a quiet volume; returns what was done. Dangling
        entries and entries under a non-directory are removed; an entry with the wrong type is
        rewritten; nlink counts, parents and the counters are set to what the tree says; orphaned
        inodes are linked into ``/lost+found`` as ``{inode}``; a directory with several entries
        keeps the one its parent field names."""
        done: list[str] = []
        for _round in range(4):
            problems = self._inspect()
            if not problems:
                break
            for p in problems:
                try:
                    if self._repair_one(p):
                        done.append(f"fixed: {p[1]}")
                except OSError as e:
                    done.append(f"could not fix: {p[1]} ({e})")
        return done

    def _repair_one(self, p: tuple) -> bool:
        kind = p[0]
        if kind == "notdir":
            d = p[2]
            self.txn(lambda tx: tx.delete(_dkey(d), "hash"))
        elif kind == "dangling":
            d, k = p[2], p[3]
            self.txn(lambda tx: tx.hdel(_dkey(d), k))
        elif kind == "etype":
            d, k, typ, ino = p[2:]
            self.txn(lambda tx: tx.hset(_dkey(d), k, pack_entry(typ, ino)))
        elif kind in ("nlink", "parent"):
            ino, want = p[2], p[3]

            def fn(tx):
                a = self._get_attr(tx, ino)
                setattr(a, kind, want)
                tx.set(_ikey(ino), pack_attr(a))
            self.txn(fn)
        elif kind == "counter":
            name, delta = p[2], p[3]
            self.txn(lambda tx: tx.incrby(name, delta))
        elif kind == "sliceref":
            sid, n = p[2], p[3]
            self.txn(lambda tx: self._set_holders(tx, sid, n))
        elif kind == "dirrefs":
            ino, places = p[2], p[3]
            a = self.getattr(ino)
            keep = next((pl for pl in places if pl[0] == a.parent), places[0])

            def fn(tx):
                for d, k in places:
                    if (d, k) != keep:
                        tx.hdel(_dkey(d), k)
            self.txn(fn)
        elif kind == "orphan":
            ino = p[2]
            try:
                lf = self.mkdir(ROOT_INODE, "lost+found", 0o700).inode
            except FileExistsError:
                lf = self.lookup(ROOT_INODE, "lost+found").inode

            def fn(tx):
                a = self._get_attr(tx, ino)
                la = self._get_attr(tx, lf)
                a.parent = lf
                if a.typ == TYPE_DIR:
                    la.nlink += 1
                else:
                    a.nlink = 1
                tx.hset(_dkey(lf), str(ino).encode(), pack_entry(a.typ, ino))
                tx.set(_ikey(ino), pack_attr(a))
                tx.set(_ikey(lf), pack_attr(la))
            self.txn(fn)
        else:
            return False
        return True


def backoff(attempt: int) -> None:
    """Sleep a little before retrying a conflicting transaction (jittered, capped)."""
    time.sleep(random.random() * min(0.0005 * (2 ** min(attempt, 8)), 0.05))
