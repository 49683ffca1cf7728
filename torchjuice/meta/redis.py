"""Redis engine (``redis://[:password@]host:port/db``, one volume per database).

Transactions are optimistic (WATCH/MULTI/EXEC): every key a write transaction reads is WATCHed in
the same round trip as the read (several reads known in advance go in one pipelined batch), writes
are buffered and sent in one MULTI ... EXEC; when EXEC reports that a watched key changed the whole
function runs again after a short jittered backoff. Read-only transactions read without WATCH (no
snapshot across round trips; each read is atomic). Path walks run server-side in one Lua script.

One connection per thread (redis-py ``Connection`` objects, RESP2); a forked child opens its own.
"""
from __future__ import annotations

import errno
import hashlib
import threading

import redis
import redis.exceptions as rexc

from .base import ATTR_CHANGES, BaseMeta, KVTx, _enc, attr_key, backoff, redact, unpack_entry
from .interface import ROOT_INODE, TYPE_DIR, TYPE_FILE, TYPE_SYMLINK

# BaseMeta._walk server-side, in one call: ARGV = start inode, "1" to also return the slices of
# chunk 0 when the walk ends on a regular file (a whole-file read's metadata: _walk_file), then
# the names. Returns {code, idx, inos, attr, symlink target, chunk-0 slices}.
_WALK_LUA = """
local cur = ARGV[1]
local want = ARGV[2] == '1'
local n = #ARGV - 2
local inos = {}
local typ = %(DIR)d
for i = 1, n do
  local e = redis.call('HGET', 'd' .. cur, ARGV[i + 2])
  if not e then return {%(ENOENT)d, i - 1, inos, false, false, false} end
  typ = string.byte(e, 1) - 48
  local ino = string.sub(e, 2)
  inos[i] = ino
  if typ == %(SYMLINK)d then
    local target = redis.call('GET', 's' .. ino)
    if i < n then return {-1, i - 1, inos, false, target, false} end
    return {0, i - 1, inos, redis.call('GET', 'i' .. ino), target, false}
  end
  if i < n and typ ~= %(DIR)d then return {%(ENOTDIR)d, i, inos, false, false, false} end
  cur = ino
end
local slices = false
if want and typ == %(FILE)d then slices = redis.call('LRANGE', 'c' .. cur .. '_0', 0, -1) end
return {0, n - 1, inos, redis.call('GET', 'i' .. cur), false, slices}
""" % {"ENOENT": errno.ENOENT, "ENOTDIR": errno.ENOTDIR, "DIR": TYPE_DIR, "FILE": TYPE_FILE,
       "SYMLINK": TYPE_SYMLINK}


# BaseMeta._files_at server-side, in one call (a DataLoader batch, over however many directories):
# ARGV = root inode, then per path its depth and names. Per path: false when a plain walk does not
# reach it (a name missing, a symlink or a file on the way), else {entry, attributes, chunk-0
# slices} (the last two only for a regular file).
_FILES_LUA = """
local out = {}
local p = 2
local k = 0
while p <= #ARGV do
  local depth = tonumber(ARGV[p])
  local cur = ARGV[1]
  local e = false
  for i = 1, depth do
    e = redis.call('HGET', 'd' .. cur, ARGV[p + i])
    if not e then break end
    if i < depth then
      if string.byte(e, 1) - 48 ~= %(DIR)d then e = false; break end
      cur = string.sub(e, 2)
    end
  end
  p = p + depth + 1
  k = k + 1
  if not e then
    out[k] = false
  elseif string.byte(e, 1) - 48 == %(FILE)d then
    local ino = string.sub(e, 2)
    out[k] = {e, redis.call('GET', 'i' .. ino) or false,
              redis.call('LRANGE', 'c' .. ino .. '_0', 0, -1)}
  else
    out[k] = {e, false, {}}
  end
end
return out
""" % {"DIR": TYPE_DIR, "FILE": TYPE_FILE}
_FILES_BATCH = 256                  # paths per call of that script
_WALK_SHA, _FILES_SHA = (hashlib.sha1(lua.encode()).hexdigest() for lua in (_WALK_LUA, _FILES_LUA))


class _Conflict(Exception):
    """EXEC found a watched key changed."""


def _ident(r):
    return r


def _pairs(r):
    if isinstance(r, dict):
        return r
    return dict(zip(r[::2], r[1::2]))


def _int0(r):
    return 0 if r is None else int(r)


# read op -> (command builder, post-processing)
_READS = {
    "get": (lambda k: ("GET", k), _ident),
    "counter": (lambda k: ("GET", k), _int0),
    "hget": (lambda k, f: ("HGET", k, f), _ident),
    "hgetall": (lambda k: ("HGETALL", k), _pairs),
    "hmget": (lambda k, fs: ("HMGET", k, *fs), _ident),
    "hlen": (lambda k: ("HLEN", k), _ident),
    "lrange": (lambda k: ("LRANGE", k, 0, -1), _ident),
    "llen": (lambda k: ("LLEN", k), _int0),
}


class _RedisTx(KVTx):
    def __init__(self, conn, readonly: bool, pre: list):
        self._c = conn
        self._ro = readonly
        self._pre = pre                 # commands to send first (a pending UNWATCH)
        self._watched: set = set()
        self._written: set = set()
        self._writes: list = []
        self._changed = False           # an inode's attributes written (attrChanges counted)
        self.broken = False             # responses left unread: the connection must go

    # -- plumbing ----------------------------------------------------------------------------------
    def _send(self, cmds: list, keys) -> list:
        pre, self._pre = self._pre, []
        if self._written and not self._written.isdisjoint(keys):
            raise RuntimeError(f"read after write of {sorted(self._written & set(keys))} in one "
                               "transaction")
        if not self._ro:
            new = [k for k in dict.fromkeys(keys) if k not in self._watched]
            if new:
                pre.append(("WATCH", *new))
                self._watched.update(new)
        c = self._c
        self.broken = True
        c.send_packed_command(c.pack_commands(pre + cmds))
        for _ in pre:
            c.read_response()
        out = [c.read_response() for _ in cmds]
        self.broken = False
        return out

    def batch(self, ops):
        cmds, keys, posts = [], [], []
        for op in ops:
            if op[0] == "gets":
                ks = list(op[1])
                if not ks:
                    cmds.append(("ECHO", ""))
                    posts.append(lambda r: [])
                else:
                    cmds.append(("MGET", *ks))
                    posts.append(_ident)
                keys.extend(ks)
                continue
            build, post = _READS[op[0]]
            if op[0] == "hmget" and not op[2]:
                cmds.append(("ECHO", ""))
                posts.append(lambda r: [])
            else:
                cmds.append(build(*op[1:]))
                posts.append(post)
            keys.append(op[1])
        res = self._send(cmds, keys)
        return [p(r) for p, r in zip(posts, res)]

    def _read1(self, name, *args):
        build, post = _READS[name]
        return post(self._send([build(*args)], (args[0],))[0])

    def _write(self, key, cmd) -> None:
        if self._ro:
            raise RuntimeError("write in a read-only transaction")
        self._written.add(key)
        self._writes.append(cmd)
        if attr_key(key) and not self._changed:     # counted once, at commit (base.ATTR_CHANGES)
            self._changed = True
            self._writes.append(("INCRBY", ATTR_CHANGES, 1))

    # -- reads -------------------------------------------------------------------------------------
    def get(self, k):
        return self._read1("get", k)

    def gets(self, keys):
        return self.batch([("gets", keys)])[0]

    def counter(self, k):
        return self._read1("counter", k)

    def hget(self, k, f):
        return self._read1("hget", k, f)

    def hgetall(self, k):
        return self._read1("hgetall", k)

    def hmget(self, k, fields):
        return self.batch([("hmget", k, fields)])[0]

    def hlen(self, k):
        return self._read1("hlen", k)

    def lrange(self, k):
        return self._read1("lrange", k)

    def llen(self, k):
        return self._read1("llen", k)

    def scan_keys(self, prefix):
        out, cursor = [], b"0"
        while True:
            cursor, keys = self._send([("SCAN", cursor, "MATCH", prefix + "*", "COUNT", 1000)],
                                      ())[0]
            out.extend(k.decode() for k in keys)
            if cursor in (b"0", 0, "0"):
                return sorted(set(out))

    def script(self, sha: str, src: str, args) -> list:
        try:
            return self._send([("EVALSHA", sha, 0, *args)], ())[0]
        except rexc.NoScriptError:
            return self._send([("EVAL", src, 0, *args)], ())[0]
        except rexc.ResponseError as e:
            if "NOSCRIPT" not in str(e):
                raise
            return self._send([("EVAL", src, 0, *args)], ())[0]

    # -- writes (buffered until commit) ----------------------------------------------------------
    def set(self, k, v):
        self._write(k, ("SET", k, v))

    def delete(self, k, kind=None):
        self._write(k, ("DEL", k))

    def incrby(self, k, n):
        self._write(k, ("INCRBY", k, n))
        return None

    def hset(self, k, f, v):
        self._write(k, ("HSET", k, f, v))

    def hdel(self, k, f):
        self._write(k, ("HDEL", k, f))

    def rpush(self, k, v):
        self._write(k, ("RPUSH", k, v))

    def commit(self) -> None:
        if not self._writes:
            return
        c = self._c
        pre, self._pre = self._pre, []
        cmds = pre + [("MULTI",)] + self._writes + [("EXEC",)]
        self.broken = True
        c.send_packed_command(c.pack_commands(cmds))
        for _ in range(len(cmds) - 1):
            c.read_response()           # OK / QUEUED (an error here raises; broken stays set)
        res = c.read_response()
        self.broken = False
        self._watched.clear()           # EXEC ends every WATCH
        if res is None:
            raise _Conflict()
        for r in res:
            if isinstance(r, Exception):
                raise r

    @property
    def watching(self) -> bool:
        return bool(self._watched or self._pre)


class RedisMeta(BaseMeta):
    """Metadata in one Redis database (see the module docstring)."""

    max_retries = 1000

    def __init__(self, url: str):
        super().__init__(url)
        try:
            pool = redis.ConnectionPool.from_url(url, socket_connect_timeout=3,
                                                 socket_timeout=60, protocol=2)
        except ValueError as e:
            from ..errors import InvalidURLError
            raise InvalidURLError(f"bad Redis URL {redact(url)!r}: {e}") from None
        self._conn_class = pool.connection_class
        self._conn_kwargs = dict(pool.connection_kwargs)
        self._local = threading.local()
        self._conns: list = []
        self._conns_lock = threading.Lock()

    # -- connections -------------------------------------------------------------------------------
    def _conn(self):
        c = getattr(self._local, "conn", None)
        if c is None:
            c = self._conn_class(**self._conn_kwargs)
            try:
                c.connect()
            except (rexc.ConnectionError, rexc.TimeoutError, OSError) as e:
                raise ConnectionError(f"cannot connect to Redis at {redact(self.url)}: {e}") \
                    from None
            self._register_conn(c)
            self._local.unwatch = False
        return c

    def _disconnect(self, c) -> None:
        c.disconnect()

    def _reset_engine(self) -> None:
        # redis-py only shuts a socket down in the process that opened it: dropping is safe
        self._conns = []
        self._conns_lock = threading.Lock()
        self._local = threading.local()

    # -- transactions -----------------------------------------------------------------------------
    def txn(self, fn, *, readonly: bool = False):
        attempt = 0
        while True:
            c = self._conn()
            local = self._local
            tx = _RedisTx(c, readonly, [("UNWATCH",)] if local.unwatch else [])
            local.unwatch = False
            try:
                result = fn(tx)
                tx.commit()
                local.unwatch = tx.watching
                return result
            except _Conflict:
                attempt += 1
                if attempt > self.max_retries:
                    raise OSError(errno.EAGAIN, f"transaction kept conflicting after "
                                                f"{attempt} tries") from None
                backoff(attempt)
            except (rexc.ConnectionError, rexc.TimeoutError) as e:
                self._drop_conn(c)
                raise ConnectionError(f"lost Redis at {redact(self.url)}: {e}") from None
            except BaseException:
                if tx.broken:
                    self._drop_conn(c)
                else:
                    local.unwatch = tx.watching
                raise

    def _incr(self, key: str, n: int) -> int:
        def fn(tx):
            return tx._send([("INCRBY", key, n)], ())[0]
        return int(self.txn(fn, readonly=True))

    def _walk_script(self, tx, start: int, names: list[str], chunk0: bool):
        args = [start, b"1" if chunk0 else b"0", *map(_enc, names)]
        code, idx, inos, raw, target, slices = tx.script(_WALK_SHA, _WALK_LUA, args)
        return code, idx, [int(i) for i in inos], raw, target, slices

    def _files_at(self, tx, items: list[tuple[int, list[str]]]) -> dict:
        # one round trip for the whole batch, not a walk and a lookup per directory
        if not isinstance(tx, _RedisTx) or not tx._ro:
            return super()._files_at(tx, items)
        out: dict = {}
        for k in range(0, len(items), _FILES_BATCH):       # a script blocks the server: bounded
            part = items[k:k + _FILES_BATCH]
            args: list = [ROOT_INODE]
            for _i, names in part:
                args.append(len(names))
                args.extend(map(_enc, names))
            for (i, _names), got in zip(part, tx.script(_FILES_SHA, _FILES_LUA, args)):
                if got:
                    entry, attr, slices = got
                    out[i] = (*unpack_entry(entry), attr, list(slices))
        return out

    def _walk(self, tx, start: int, names: list[str]):
        if not isinstance(tx, _RedisTx) or not tx._ro:
            return super()._walk(tx, start, names)
        return self._walk_script(tx, start, names, False)[:5]

    def _walk_file(self, tx, names: list[str]):
        if not isinstance(tx, _RedisTx) or not tx._ro:
            return super()._walk_file(tx, names)
        return self._walk_script(tx, ROOT_INODE, names, True)
