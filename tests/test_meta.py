"""Conformance suite of the metadata engines: the same tests against SQLite, Redis and PostgreSQL
(real servers on loopback, a fresh empty database for every test)."""
from __future__ import annotations

import errno
import multiprocessing
import os
import pickle
import threading
import time

import pytest

from servers import free_port
from torchjuice.errors import AlreadyFormattedError, NotFormattedError
from torchjuice.meta import (CHUNK_SIZE, RENAME_EXCHANGE, RENAME_NOREPLACE, ROOT_INODE, TYPE_DIR,
                             TYPE_FILE, TYPE_SYMLINK, XATTR_CREATE, XATTR_REPLACE, Format, Slice,
                             new_meta)

FMT = Format(name="vol", uuid="1234", storage="mem://bucket", trash_days=0)   # no trash here


def _errno(code):
    """pytest.raises for an OSError carrying ``code``."""
    class _Ctx:
        def __enter__(self):
            self._r = pytest.raises(OSError)
            self.info = self._r.__enter__()
            return self.info

        def __exit__(self, *exc):
            ok = self._r.__exit__(*exc)
            assert self.info.value.errno == code, \
                f"expected {errno.errorcode[code]}, got {self.info.value!r}"
            return ok
    return _Ctx()


@pytest.fixture
def m(meta_url):
    meta = new_meta(meta_url)
    meta.init(FMT)
    yield meta
    meta.close()


def _slice(m, length, pos=0):
    return Slice(pos=pos, id=m.new_slice_id(), size=length, off=0, len=length)


# -- volume ----------------------------------------------------------------------------------------
def test_format_load_and_root(meta_url):
    meta = new_meta(meta_url)
    with pytest.raises(NotFormattedError) as ei:
        meta.load()
    assert meta_url.split("://")[1].split("/")[0].split("@")[-1] in str(ei.value)
    if meta_url.startswith("sqlite3://"):
        assert not os.path.exists(meta_url[len("sqlite3://"):])   # load() creates nothing
    meta.init(FMT)
    assert meta.load() == FMT
    root = meta.getattr(ROOT_INODE)
    assert (root.typ, root.mode, root.nlink, root.parent) == (TYPE_DIR, 0o755, 2, ROOT_INODE)
    assert root.is_dir and root.st_mode == 0o40755
    assert meta.statfs() == (4096, 1)
    with pytest.raises(AlreadyFormattedError):
        meta.init(FMT)
    with pytest.raises(FileExistsError):
        meta.init(FMT)
    # the first inode is 2, the first slice id is 1
    d = meta.mkdir(ROOT_INODE, "kept")
    assert d.inode == 2
    assert meta.new_slice_id() == 1
    # force: settings updated, data kept
    fmt2 = Format(name="vol", uuid="1234", storage="mem://other", block_size=1 << 20,
                  compression="lz4")
    meta.init(fmt2, force=True)
    other = new_meta(meta_url)
    assert other.load() == fmt2
    assert other.lookup(ROOT_INODE, "kept").inode == d.inode
    # a second client draws fresh inode numbers; a pickled engine works on the other side
    assert other.create(ROOT_INODE, "f").inode > d.inode
    clone = pickle.loads(pickle.dumps(other))
    assert clone.resolve("/kept").inode == d.inode
    for x in (clone, other, meta):
        x.close()


# -- names -----------------------------------------------------------------------------------------
def test_mknod_lookup_getattr(m):
    root0 = m.getattr(ROOT_INODE)
    time.sleep(0.01)
    f = m.mknod(ROOT_INODE, "f", TYPE_FILE, 0o640, uid=7, gid=8)
    assert (f.typ, f.mode, f.uid, f.gid, f.nlink, f.length, f.parent) == \
        (TYPE_FILE, 0o640, 7, 8, 1, 0, ROOT_INODE)
    assert f.is_file and f.st_mode == 0o100640
    root1 = m.getattr(ROOT_INODE)
    assert root1.nlink == 2 and root1.mtime > root0.mtime and root1.ctime > root0.ctime
    d = m.mkdir(ROOT_INODE, "d", 0o700)
    assert (d.typ, d.mode, d.nlink, d.parent) == (TYPE_DIR, 0o700, 2, ROOT_INODE)
    assert m.getattr(ROOT_INODE).nlink == 3
    s = m.symlink(d.inode, "s", "../f")
    assert s.is_symlink and s.length == 4 and s.st_mode & 0o170000 == 0o120000
    assert m.getattr(d.inode).nlink == 2           # a symlink is no subdirectory
    assert m.lookup(ROOT_INODE, "f") == m.getattr(f.inode) == f
    assert m.lookup(d.inode, "s").inode == s.inode
    assert m.lookup(d.inode, ".").inode == d.inode
    assert m.lookup(d.inode, "..").inode == ROOT_INODE
    u = m.create(d.inode, "ünï cødé ☃")
    assert m.lookup(d.inode, "ünï cødé ☃").inode == u.inode
    assert m.create(d.inode, "x" * 255).inode > 0
    # errors
    with _errno(errno.EEXIST):
        m.create(ROOT_INODE, "f")
    with _errno(errno.EEXIST):
        m.mkdir(ROOT_INODE, "d")
    with _errno(errno.ENOTDIR):
        m.create(f.inode, "x")
    with _errno(errno.ENOENT):
        m.create(999_999, "x")
    for bad in ("", "a/b", "a\0b", ".", ".."):
        with _errno(errno.EINVAL):
            m.create(ROOT_INODE, bad)
    with _errno(errno.ENAMETOOLONG):
        m.create(ROOT_INODE, "x" * 256)
    with _errno(errno.EINVAL):
        m.mknod(ROOT_INODE, "bad", 9)
    with _errno(errno.EINVAL):
        m.mknod(ROOT_INODE, "bad", TYPE_SYMLINK, target="")
    with _errno(errno.ENOENT):
        m.lookup(ROOT_INODE, "missing")
    with _errno(errno.ENOTDIR):
        m.lookup(f.inode, "x")
    with _errno(errno.ENOENT):
        m.lookup(999_999, "x")
    with _errno(errno.ENOENT):
        m.getattr(999_999)
    with pytest.raises(FileNotFoundError):
        m.getattr(999_999)
    assert m.statfs()[1] == 6
    assert m.check() == []


def test_setattr(m):
    f = m.create(ROOT_INODE, "f")
    time.sleep(0.01)
    a = m.setattr(f.inode, mode=0o4755, uid=1000, gid=100, atime=1.5, mtime=2.5)
    assert (a.mode, a.uid, a.gid, a.atime, a.mtime) == (0o4755, 1000, 100, 1.5, 2.5)
    assert a.ctime > f.ctime
    assert m.getattr(f.inode) == a
    b = m.setattr(f.inode, mode=0o600)
    assert (b.mode, b.uid, b.mtime) == (0o600, 1000, 2.5)
    assert m.setattr(f.inode) == b
    with _errno(errno.ENOENT):
        m.setattr(999_999, mode=0o644)


def test_symlinks_and_resolve(m):
    a = m.mkdir(ROOT_INODE, "a")
    b = m.mkdir(a.inode, "b")
    f = m.create(b.inode, "f")
    m.symlink(a.inode, "rel", "b")                 # relative: against the link's directory
    m.symlink(ROOT_INODE, "abs", "/a/b")          # absolute: against the volume root
    m.symlink(b.inode, "up", "../../a/./b/f")
    m.symlink(ROOT_INODE, "chain", "abs/f")
    m.symlink(ROOT_INODE, "dangling", "nowhere")
    m.symlink(ROOT_INODE, "self", "self")
    m.symlink(ROOT_INODE, "ping", "pong")
    m.symlink(ROOT_INODE, "pong", "ping")
    m.symlink(ROOT_INODE, "tofile", "a/b/f")
    assert m.resolve("/").inode == ROOT_INODE
    assert m.resolve("/a/b/f") == f
    assert m.resolve("/a//b/f/").inode == f.inode
    assert m.resolve("/a/rel/f").inode == f.inode
    assert m.resolve("/abs/f").inode == f.inode
    assert m.resolve("/a/b/up").inode == f.inode
    assert m.resolve("/chain").inode == f.inode
    assert m.resolve("/abs").inode == b.inode
    link = m.resolve("/abs", follow=False)
    assert link.is_symlink and m.readlink(link.inode) == "/a/b"
    assert m.resolve("/a/rel/f", follow=False).inode == f.inode   # middle links always followed
    assert m.resolve("/dangling", follow=False).is_symlink
    with _errno(errno.ENOENT):
        m.resolve("/dangling")
    with _errno(errno.ENOENT):
        m.resolve("/a/missing/f")
    with _errno(errno.ENOTDIR):
        m.resolve("/a/b/f/x")
    with _errno(errno.ENOTDIR):
        m.resolve("/tofile/x")
    for loop in ("/self", "/ping", "/self/x"):
        with _errno(errno.ELOOP):
            m.resolve(loop)
    assert m.resolve("/self", follow=False).is_symlink
    with _errno(errno.EINVAL):
        m.resolve("a/b")
    with _errno(errno.ENAMETOOLONG):
        m.resolve("/" + "x" * 256)
    with _errno(errno.EINVAL):
        m.readlink(f.inode)
    with _errno(errno.ENOENT):
        m.readlink(999_999)
    # 40 links are followed, the 41st is ELOOP
    prev = "a/b/f"
    for i in range(41):
        m.symlink(ROOT_INODE, f"s{i}", prev)
        prev = f"s{i}"
    assert m.resolve("/s39").inode == f.inode
    with _errno(errno.ELOOP):
        m.resolve("/s40")


def test_unlink_and_rmdir(m):
    base_used, base_inodes = m.statfs()
    d = m.mkdir(ROOT_INODE, "d")
    e = m.mkdir(d.inode, "e")
    f = m.create(d.inode, "f")
    s = m.symlink(d.inode, "s", "f")
    freed = []
    m.on_delete_slices = freed.extend
    sl = _slice(m, 10)
    m.write_chunk(f.inode, 0, sl)
    assert m.getattr(d.inode).nlink == 3
    with _errno(errno.EISDIR):
        m.unlink(d.inode, "e")
    with _errno(errno.ENOENT):
        m.unlink(d.inode, "missing")
    with _errno(errno.ENOTDIR):
        m.unlink(f.inode, "x")
    with _errno(errno.ENOENT):
        m.unlink(999_999, "x")
    with _errno(errno.ENOTEMPTY):
        m.rmdir(ROOT_INODE, "d")
    with _errno(errno.ENOTDIR):
        m.rmdir(d.inode, "f")
    with _errno(errno.ENOENT):
        m.rmdir(d.inode, "missing")
    with _errno(errno.ENOTDIR):
        m.rmdir(f.inode, "x")
    m.unlink(d.inode, "s")
    with _errno(errno.ENOENT):
        m.getattr(s.inode)
    assert freed == []
    before = m.getattr(d.inode)
    time.sleep(0.01)
    m.unlink(d.inode, "f")
    assert freed == [(sl.id, sl.size)]
    assert m.getattr(d.inode).mtime > before.mtime
    with _errno(errno.ENOENT):
        m.getattr(f.inode)
    with _errno(errno.ENOENT):
        m.read_chunk(f.inode, 0)
    m.rmdir(d.inode, "e")
    assert m.getattr(d.inode).nlink == 2
    m.rmdir(ROOT_INODE, "d")
    assert m.getattr(ROOT_INODE).nlink == 2
    assert m.readdir(ROOT_INODE) == []
    assert m.statfs() == (base_used, base_inodes)
    assert m.list_slices() == []
    assert m.check() == []


def test_rename_moves_and_replaces(m):
    a = m.mkdir(ROOT_INODE, "a")
    b = m.mkdir(ROOT_INODE, "b")
    f = m.create(a.inode, "f")
    # within a directory
    m.rename(a.inode, "f", a.inode, "g")
    assert m.lookup(a.inode, "g").inode == f.inode
    with _errno(errno.ENOENT):
        m.lookup(a.inode, "f")
    # across directories: the file's parent follows
    m.rename(a.inode, "g", b.inode, "g")
    assert m.getattr(f.inode).parent == b.inode
    assert [n for n, _ in m.readdir(a.inode)] == []
    # a directory across directories: parents' nlink and its parent follow
    sub = m.mkdir(a.inode, "sub")
    m.create(sub.inode, "inside")
    assert m.getattr(a.inode).nlink == 3
    m.rename(a.inode, "sub", b.inode, "sub2")
    assert m.getattr(a.inode).nlink == 2 and m.getattr(b.inode).nlink == 3
    assert m.getattr(sub.inode).parent == b.inode
    assert m.resolve("/b/sub2/inside").parent == sub.inode
    # replace a file: its last link goes, its slices are freed
    freed = []
    m.on_delete_slices = freed.extend
    victim = m.create(a.inode, "victim")
    sl = _slice(m, 100)
    m.write_chunk(victim.inode, 0, sl)
    m.rename(b.inode, "g", a.inode, "victim")
    assert m.lookup(a.inode, "victim").inode == f.inode
    assert freed == [(sl.id, 100)]
    with _errno(errno.ENOENT):
        m.getattr(victim.inode)
    # replace an empty directory
    empty = m.mkdir(a.inode, "empty")
    assert m.getattr(a.inode).nlink == 3
    m.rename(b.inode, "sub2", a.inode, "empty")
    assert m.lookup(a.inode, "empty").inode == sub.inode
    with _errno(errno.ENOENT):
        m.getattr(empty.inode)
    assert m.getattr(a.inode).nlink == 3 and m.getattr(b.inode).nlink == 2
    # onto itself, onto another link of the same inode: nothing happens
    m.rename(a.inode, "victim", a.inode, "victim")
    m.link(f.inode, b.inode, "hard")
    m.rename(a.inode, "victim", b.inode, "hard")
    assert m.lookup(a.inode, "victim").inode == m.lookup(b.inode, "hard").inode == f.inode
    assert m.getattr(f.inode).nlink == 2
    # a symlink moves too
    m.symlink(a.inode, "ln", "victim")
    m.rename(a.inode, "ln", b.inode, "ln")
    assert m.resolve("/b/ln", follow=False).is_symlink
    assert freed == [(sl.id, 100)]
    assert m.check() == []


def test_rename_errors_and_flags(m):
    a = m.mkdir(ROOT_INODE, "a")
    b = m.mkdir(a.inode, "b")
    c = m.mkdir(b.inode, "c")
    f = m.create(ROOT_INODE, "f")
    g = m.create(b.inode, "g")
    full = m.mkdir(ROOT_INODE, "full")
    m.create(full.inode, "x")
    empty = m.mkdir(ROOT_INODE, "empty")
    with _errno(errno.ENOENT):
        m.rename(ROOT_INODE, "missing", ROOT_INODE, "x")
    with _errno(errno.ENOENT):
        m.rename(999_999, "f", ROOT_INODE, "x")
    with _errno(errno.ENOTDIR):
        m.rename(f.inode, "x", ROOT_INODE, "y")
    with _errno(errno.ENOTEMPTY):
        m.rename(ROOT_INODE, "empty", ROOT_INODE, "full")
    with _errno(errno.EISDIR):
        m.rename(ROOT_INODE, "f", ROOT_INODE, "empty")
    with _errno(errno.ENOTDIR):
        m.rename(ROOT_INODE, "empty", ROOT_INODE, "f")
    with _errno(errno.EINVAL):
        m.rename(ROOT_INODE, "a", c.inode, "a2")    # into its own subtree
    with _errno(errno.EINVAL):
        m.rename(ROOT_INODE, "a", a.inode, "a2")    # into itself
    with _errno(errno.EINVAL):
        m.rename(ROOT_INODE, "f", ROOT_INODE, "f2", flags=RENAME_NOREPLACE | RENAME_EXCHANGE)
    with _errno(errno.EINVAL):
        m.rename(ROOT_INODE, "f", ROOT_INODE, "bad/name")
    # NOREPLACE
    with _errno(errno.EEXIST):
        m.rename(ROOT_INODE, "f", b.inode, "g", flags=RENAME_NOREPLACE)
    m.rename(ROOT_INODE, "f", ROOT_INODE, "f2", flags=RENAME_NOREPLACE)
    assert m.lookup(ROOT_INODE, "f2").inode == f.inode
    # EXCHANGE: two files in different directories swap names
    with _errno(errno.ENOENT):
        m.rename(ROOT_INODE, "f2", ROOT_INODE, "nothing", flags=RENAME_EXCHANGE)
    m.rename(ROOT_INODE, "f2", b.inode, "g", flags=RENAME_EXCHANGE)
    assert m.lookup(ROOT_INODE, "f2").inode == g.inode
    assert m.lookup(b.inode, "g").inode == f.inode
    assert m.getattr(f.inode).parent == b.inode and m.getattr(g.inode).parent == ROOT_INODE
    # EXCHANGE a file with a directory: parent nlinks follow the directory
    root_nlink = m.getattr(ROOT_INODE).nlink
    m.rename(ROOT_INODE, "empty", b.inode, "g", flags=RENAME_EXCHANGE)
    assert m.lookup(ROOT_INODE, "empty").inode == f.inode
    assert m.lookup(b.inode, "g").inode == empty.inode
    assert m.getattr(empty.inode).parent == b.inode
    assert m.getattr(ROOT_INODE).nlink == root_nlink - 1
    assert m.getattr(b.inode).nlink == 4
    # EXCHANGE may not put a directory below itself
    with _errno(errno.EINVAL):
        m.rename(b.inode, "c", ROOT_INODE, "a", flags=RENAME_EXCHANGE)
    # nothing above changed the tree
    assert m.resolve("/a/b/c").inode == c.inode
    assert m.check() == []


def test_hard_links(m):
    d = m.mkdir(ROOT_INODE, "d")
    f = m.create(ROOT_INODE, "f")
    freed = []
    m.on_delete_slices = freed.extend
    sl = _slice(m, 5)
    m.write_chunk(f.inode, 0, sl)
    a = m.link(f.inode, d.inode, "g")
    assert a.nlink == 2 and a.parent == 0 and a.inode == f.inode
    assert m.lookup(d.inode, "g") == m.getattr(f.inode)
    assert m.getattr(d.inode).nlink == 2
    names = {n: at.inode for n, at in m.readdir(d.inode)}
    assert names == {"g": f.inode}
    with _errno(errno.EPERM):
        m.link(d.inode, ROOT_INODE, "dlink")
    with _errno(errno.EEXIST):
        m.link(f.inode, d.inode, "g")
    with _errno(errno.ENOENT):
        m.link(999_999, d.inode, "x")
    with _errno(errno.ENOTDIR):
        m.link(f.inode, f.inode, "x")
    assert m.link(f.inode, ROOT_INODE, "h").nlink == 3
    m.unlink(ROOT_INODE, "f")
    assert m.getattr(f.inode).nlink == 2 and freed == []
    m.unlink(d.inode, "g")
    assert m.getattr(f.inode).nlink == 1 and freed == []
    assert m.read_chunk(f.inode, 0) == [sl]
    assert m.check() == []
    m.unlink(ROOT_INODE, "h")
    assert freed == [(sl.id, 5)]
    with _errno(errno.ENOENT):
        m.getattr(f.inode)
    assert m.check() == []


def test_readdir(m):
    d = m.mkdir(ROOT_INODE, "d")
    assert m.readdir(d.inode) == []
    names = [f"n{i:03d}" for i in range(150)][::-1] + ["Z", "a", "é"]
    made = {}
    for n in names:
        made[n] = m.mkdir(d.inode, n) if n.startswith("n1") else m.create(d.inode, n)
    got = m.readdir(d.inode)
    assert [n for n, _ in got] == sorted(names)
    for n, a in got:
        assert a == m.getattr(made[n].inode)
    f = made["a"]
    with _errno(errno.ENOTDIR):
        m.readdir(f.inode)
    with _errno(errno.ENOENT):
        m.readdir(999_999)


def test_attr_changes_counts_every_change_of_attributes(m, meta_url, tmp_path):
    """attr_changes() goes up with each transaction that changes any inode's attributes, and
    only then: equal values mean no attributes changed in between (Volume.read_listed relies on
    it). It never goes back: a volume made or loaded starts at the time in microseconds."""
    start = m.attr_changes()
    assert start >= (time.time() - 60) * 1e6
    d = m.mkdir(ROOT_INODE, "d")
    f = m.create(d.inode, "f")
    g = m.create(d.inode, "g")
    changes = [
        lambda: m.write_chunk(f.inode, 0, _slice(m, 10)),
        lambda: m.truncate(f.inode, 3),
        lambda: m.setattr(f.inode, mode=0o600),
        lambda: m.rename(d.inode, "f", d.inode, "f2"),
        lambda: m.link(g.inode, ROOT_INODE, "hard"),
        lambda: m.symlink(d.inode, "ln", "f2"),
        lambda: m.create_files(d.inode, ["p", "q"]),
        lambda: m.unlink(d.inode, "g"),
        lambda: m.mkdir(ROOT_INODE, "e"),
        lambda: m.rmdir(ROOT_INODE, "e"),
    ]
    for change in changes:
        before = m.attr_changes()
        change()
        assert m.attr_changes() == before + 1        # one transaction, counted once
    before = m.attr_changes()
    m.getattr(f.inode), m.readdir(d.inode), m.resolve("/d/f2"), m.raw_attrs([f.inode])
    m.setxattr(f.inode, "user.k", b"v")             # not attributes
    m.new_slice_id()
    assert m.attr_changes() == before
    with _errno(errno.ENOENT):                       # a failed change counts nothing
        m.unlink(d.inode, "missing")
    assert m.attr_changes() == before
    assert m.raw_attrs([f.inode, d.inode], since=before) is None     # nothing changed since
    m.setattr(d.inode, mode=0o700)
    assert m.raw_attrs([f.inode, d.inode], since=before) == m.raw_attrs([f.inode, d.inode])
    before = m.attr_changes()
    data = m.dump()
    m.load_dump(data, force=True)                    # the engine's keys go, the count stays
    assert m.attr_changes() > before
    copy = new_meta(f"sqlite3://{tmp_path}/copy/meta.db")
    copy.load_dump(data)
    assert copy.attr_changes() >= start
    copy.close()


# -- data ------------------------------------------------------------------------------------------
def test_chunks_write_read_truncate(m):
    freed = []
    m.on_delete_slices = freed.extend
    used0, _ = m.statfs()
    f = m.create(ROOT_INODE, "f")
    assert m.statfs()[0] == used0 + 4096
    assert m.read_chunk(f.inode, 0) == []
    s1, s2 = _slice(m, 1000), _slice(m, 100, pos=500)
    a = m.write_chunk(f.inode, 0, s1)
    assert a.length == 1000
    a = m.write_chunk(f.inode, 0, s2, mtime=1234.0)
    assert a.length == 1000 and a.mtime == 1234.0        # overwrite inside: no growth
    assert m.read_chunk(f.inode, 0) == [s1, s2]            # oldest first
    # shrink inside the chunk: a hole covers the cut bytes [900, 1000) (zeros if it regrows)
    a = m.truncate(f.inode, 900)
    assert a.length == 900 and freed == []
    hole1 = Slice(pos=900, id=0, size=0, off=0, len=100)
    assert m.read_chunk(f.inode, 0) == [s1, s2, hole1]
    s3 = _slice(m, 5000, pos=100)
    a = m.write_chunk(f.inode, 2, s3)
    assert a.length == 2 * CHUNK_SIZE + 5100
    assert m.getattr(f.inode) == a
    assert m.statfs()[0] == used0 + 2 * CHUNK_SIZE + 8192
    assert sorted(m.list_slices()) == sorted([(s.id, s.size) for s in (s1, s2, s3)])
    # shrink into chunk 0: chunk 2 dropped and freed; a hole covers the rest of chunk 0
    a = m.truncate(f.inode, 600)
    assert a.length == 600 and m.getattr(f.inode).length == 600
    assert freed == [(s3.id, s3.size)]
    assert m.read_chunk(f.inode, 2) == []
    assert m.read_chunk(f.inode, 0) == [s1, s2, hole1,
                                        Slice(pos=600, id=0, size=0, off=0, len=CHUNK_SIZE - 600)]
    assert m.statfs()[0] == used0 + 4096
    # grow: the length moves, nothing is written
    a = m.truncate(f.inode, CHUNK_SIZE + 10)
    assert a.length == CHUNK_SIZE + 10
    assert m.read_chunk(f.inode, 1) == []
    # shrink to a chunk boundary: the partial chunk 1 has no slices, no hole past what exists
    a = m.truncate(f.inode, CHUNK_SIZE)
    assert m.read_chunk(f.inode, 1) == []
    # shrink where the old end is past the chunk: the hole runs to the chunk's end
    m.write_chunk(f.inode, 1, Slice(pos=0, id=m.new_slice_id(), size=64, off=0, len=64))
    m.truncate(f.inode, CHUNK_SIZE - 100)
    assert m.read_chunk(f.inode, 0)[-1] == Slice(pos=CHUNK_SIZE - 100, id=0, size=0, off=0,
                                                 len=100)
    assert m.read_chunk(f.inode, 1) == []
    assert len(freed) == 2
    m.truncate(f.inode, 0)
    assert m.read_chunk(f.inode, 0) == [] and len(freed) == 4
    assert m.statfs()[0] == used0 + 4096
    # errors
    d = m.mkdir(ROOT_INODE, "d")
    with _errno(errno.EISDIR):
        m.truncate(d.inode, 0)
    with _errno(errno.EISDIR):
        m.write_chunk(d.inode, 0, _slice(m, 1))
    with _errno(errno.EINVAL):
        m.truncate(f.inode, -1)
    with _errno(errno.EINVAL):
        m.write_chunk(f.inode, 0, Slice(pos=CHUNK_SIZE - 1, id=9, size=10, off=0, len=10))
    with _errno(errno.ENOENT):
        m.truncate(999_999, 0)
    with _errno(errno.ENOENT):
        m.write_chunk(999_999, 0, _slice(m, 1))
    with _errno(errno.ENOENT):
        m.read_chunk(999_999, 0)
    assert m.check() == []


def test_create_files_in_one_transaction(m):
    """A batch of creates: new names made, existing and repeated ones left (None), the parent
    and the counters as for create one by one."""
    d = m.mkdir(ROOT_INODE, "d")
    old = m.create(d.inode, "old")
    calls = []
    real = m.txn
    m.txn = lambda fn, **kw: calls.append(kw) or real(fn, **kw)
    try:
        got = m.create_files(d.inode, ["a", "old", "b", "a", "c"], mode=0o600)
    finally:
        del m.txn
    assert len(calls) == 1
    assert [g is None for g in got] == [False, True, False, True, False]
    made = [g for g in got if g is not None]
    assert len({a.inode for a in made}) == 3 and old.inode not in {a.inode for a in made}
    for name, a in zip(["a", "b", "c"], made):
        assert m.lookup(d.inode, name) == a
        assert a.is_file and a.length == 0 and a.nlink == 1 and a.mode & 0o777 == 0o600
    assert sorted(n for n, _ in m.readdir(d.inode)) == ["a", "b", "c", "old"]
    assert m.create_files(d.inode, []) == []
    with _errno(errno.ENOTDIR):
        m.create_files(old.inode, ["x"])
    with _errno(errno.ENOENT):
        m.create_files(999_999, ["x"])
    with _errno(errno.EINVAL):
        m.create_files(d.inode, ["bad/name"])
    assert m.check() == []


def test_resolve_slices_many(m):
    """One transaction for many paths: each answer is resolve_slices' own, errors per path."""
    d = m.mkdir(ROOT_INODE, "d")
    files = []
    for i in range(5):
        f = m.create(d.inode, f"f{i}")
        for k in range(i):                              # 0..4 slices in chunk 0
            f = m.write_chunk(f.inode, 0, _slice(m, 10 + k, pos=20 * k))
        files.append(f)
    big = m.create(d.inode, "big")
    m.write_chunk(big.inode, 0, _slice(m, 100))
    m.write_chunk(big.inode, 2, _slice(m, 10, pos=7))
    m.symlink(ROOT_INODE, "link", "d/f3")
    m.symlink(d.inode, "inlink", "f1")
    m.symlink(ROOT_INODE, "ldir", "d")
    nested = []                          # a shuffled batch: files in many directories, depths 1-4
    for a in range(3):
        da = m.mkdir(ROOT_INODE, f"n{a}")
        for b in range(3):
            db = m.mkdir(da.inode, f"\u00e9{b}")
            f = m.create(db.inode, "x\udcff")            # a name that is not UTF-8
            m.write_chunk(f.inode, 0, _slice(m, 30 + b))
            m.create(ROOT_INODE if b else da.inode, f"top{a}{b}")
            nested += [f"/n{a}/\u00e9{b}/x\udcff", f"/n{a}/top{a}{b}" if not b else f"/top{a}{b}"]
    m.symlink(ROOT_INODE, "n9", "n1")
    paths = ["/d/f0", "/d/f1", "/nope", "/d/f4", "/d/big", "/link", "/d/f2/x", "/d", "/d/f3",
             "/d/nope", "/d/inlink", "/ldir/f2", "/nope/f1", "/.trash", "/d/f1", *nested,
             "/n9/\u00e90/x\udcff", "/n0/\u00e91/x\udcff/y", "/d/f1/x/y/z", "/n2/nope/x"]
    calls = []
    real = m.txn
    m.txn = lambda fn, **kw: calls.append(kw) or real(fn, **kw)
    try:
        got = m.resolve_slices_many(paths)
    finally:
        del m.txn
    assert calls == [{"readonly": True}]
    assert len(got) == len(paths)
    for p, g in zip(paths, got):
        if p in ("/nope", "/d/nope", "/nope/f1", "/n2/nope/x"):
            assert isinstance(g, FileNotFoundError), p
        elif p in ("/d/f2/x", "/n0/\u00e91/x\udcff/y", "/d/f1/x/y/z"):
            assert isinstance(g, NotADirectoryError)
        else:
            assert g == m.resolve_slices(p), p
    assert got[0][1] == [] and len(got[3][1][0]) == 4 and len(got[4][1]) == 3
    (bad,) = m.resolve_slices_many(["relative"])
    assert isinstance(bad, OSError) and bad.errno == errno.EINVAL
    assert m.resolve_slices_many([]) == []


def _spread_files(m) -> list[str]:
    """16 files /aA/bB/f, one per directory, of length 10 + A + B (a shuffled batch finds them so)."""
    paths = []
    for a in range(4):
        da = m.mkdir(ROOT_INODE, f"a{a}")
        for b in range(4):
            db = m.mkdir(da.inode, f"b{b}")
            f = m.create(db.inode, "f")
            m.write_chunk(f.inode, 0, _slice(m, 10 + a + b))
            paths.append(f"/a{a}/b{b}/f")
    return paths


def test_a_batch_over_many_directories_is_one_select(tmp_path):
    """SQL: the files of a batch spread over many directories (a shuffled DataLoader batch) are
    walked and read by one SELECT, not a walk and a lookup per directory."""
    m = new_meta(f"sqlite3://{tmp_path}/m.db")
    m.init(FMT)
    paths = _spread_files(m)
    statements: list[str] = []
    m._conn().set_trace_callback(statements.append)
    try:
        got = m.resolve_slices_many(paths[::-1])
    finally:
        m._conn().set_trace_callback(None)
    assert [g[0].length for g in got] == [10 + a + b for a in range(3, -1, -1) for b in range(3, -1, -1)]
    reads = [q for q in statements if q.lstrip().upper().startswith(("SELECT", "WITH"))]
    assert len(reads) == 1, reads
    m.close()


def test_a_big_files_chunks_come_in_order(m):
    """A file of many chunks, some of them holes: its slice lists come back in chunk order, each
    chunk's slices in the order written (the chunks are read together, see the next test)."""
    from torchjuice.meta.interface import CHUNK_SIZE
    d = m.mkdir(ROOT_INODE, "d")
    f = m.create(d.inode, "big")
    wrote = {}
    for i in (0, 1, 2, 4, 7, 9):                     # chunks 3, 5, 6 and 8: holes
        wrote[i] = [_slice(m, 100 + i, pos=0), _slice(m, 50, pos=10 * i)]
        for s in wrote[i]:
            m.write_chunk(f.inode, i, s)
    a, chunks = m.resolve_slices("/d/big")
    assert a.length == 9 * CHUNK_SIZE + 90 + 50 and len(chunks) == 10
    for i, got in enumerate(chunks):
        assert [(s.id, s.pos, s.len) for s in got] == \
            [(s.id, s.pos, s.len) for s in wrote.get(i, [])], i


def test_a_big_files_chunks_are_one_select(tmp_path):
    """SQLite: the chunks of a big file after the first are read by one SELECT (chunk 0 comes with
    the walk), not one each (a 1.5 GB model has 25)."""
    sql = new_meta(f"sqlite3://{tmp_path}/one.db")
    sql.init(FMT)
    g = sql.create(ROOT_INODE, "big")
    for i in range(10):
        sql.write_chunk(g.inode, i, _slice(sql, 10))
    statements: list[str] = []
    sql._conn().set_trace_callback(statements.append)
    try:
        a, chunks = sql.resolve_slices("/big")
    finally:
        sql._conn().set_trace_callback(None)
    assert len(chunks) == 10 and all(len(c) == 1 for c in chunks)
    reads = [q for q in statements if q.lstrip().upper().startswith(("SELECT", "WITH"))]
    assert len(reads) == 2, reads
    sql.close()


def test_a_batch_over_many_directories_is_one_round_trip_on_redis(request, tmp_path):
    """Redis: the files of a batch spread over many directories are walked and read by one
    script call, one round trip."""
    from torchjuice.meta.redis import _RedisTx
    m = new_meta(request.getfixturevalue("redis_server").url())
    m.init(FMT)
    paths = _spread_files(m)
    from torchjuice.meta.redis import _FILES_LUA, _FILES_SHA
    m.resolve_slices_many(paths[:1])                   # the script loaded into the server
    trips = []
    real = _RedisTx._send
    _RedisTx._send = lambda self, cmds, keys: trips.append(cmds) or real(self, cmds, keys)
    try:
        got = m.resolve_slices_many(paths + ["/a0/nope/f", "/a1/b1/f/x"])
    finally:
        _RedisTx._send = real
    assert [g[0].length for g in got[:-2]] == [10 + a + b for a in range(4) for b in range(4)]
    assert isinstance(got[-2], FileNotFoundError) and isinstance(got[-1], NotADirectoryError)
    # the batch: one trip (the two bad paths are walked again, to name their errors)
    assert len([t for t in trips if t[0][1] in (_FILES_SHA, _FILES_LUA)]) == 1, trips
    m.close()


def test_resolve_slices(m, meta_url):
    """Path, attributes and every chunk's slices in one call; the same answers (and errors) as
    resolve + read_chunk; another client's commit is seen by the next call."""
    d = m.mkdir(ROOT_INODE, "d")
    f = m.create(d.inode, "f")
    m.symlink(ROOT_INODE, "link", "d/f")
    m.symlink(ROOT_INODE, "dangling", "nowhere")
    assert m.resolve_slices("/d/f") == (f, [])                      # empty file: no chunks
    s1, s2 = _slice(m, 1000), _slice(m, 100, pos=500)
    m.write_chunk(f.inode, 0, s1)
    m.write_chunk(f.inode, 0, s2)
    s3 = _slice(m, 10, pos=7)
    a = m.write_chunk(f.inode, 2, s3)                                 # chunk 1 is a hole
    got, chunks = m.resolve_slices("/d/f")
    assert got == a == m.resolve("/d/f")
    assert chunks == [[s1, s2], [], [s3]] == [m.read_chunk(f.inode, i) for i in range(3)]
    assert m.resolve_slices("/link") == (a, chunks)                   # symlinks followed
    # small files (one chunk): the engines' one-call paths
    small = m.create(d.inode, "small1")
    assert m.resolve_slices("/d/small1") == (m.getattr(small.inode), [])
    parts = [_slice(m, 100), _slice(m, 10, pos=50), _slice(m, 5, pos=200)]
    for p in parts:
        got = m.write_chunk(small.inode, 0, p)
    assert m.resolve_slices("/d/small1") == (got, [parts])
    assert m.resolve_slices("/d/small1") == (m.resolve("/d/small1"), [m.read_chunk(small.inode, 0)])
    m.symlink(d.inode, "tosmall", "small1")
    assert m.resolve_slices("/d/tosmall") == (got, [parts])
    if meta_url.startswith("redis://"):           # the walk and chunk 0 come in one script call
        from torchjuice.meta import redis as rmod
        sent = []
        real_send = rmod._RedisTx._send
        rmod._RedisTx._send = lambda tx, cmds, keys: sent.append(cmds) or real_send(tx, cmds, keys)
        try:
            small = m.create(d.inode, "small")
            m.write_chunk(small.inode, 0, _slice(m, 10))
            sent.clear()
            assert m.resolve_slices("/d/small")[1][0][0].size == 10
        finally:
            rmod._RedisTx._send = real_send
        assert len(sent) == 1 and sent[0][0][0] in ("EVALSHA", "EVAL")
    assert m.resolve_slices("/d/./f") == m.resolve_slices("/d/../d/f") == (a, chunks)
    assert m.resolve_slices("/.trash")[0].is_dir
    link, none = m.resolve_slices("/link", follow=False)
    assert link.is_symlink and none == []
    assert m.resolve_slices("/d") == (m.getattr(d.inode), [])         # a directory: no slices
    assert m.resolve_slices("/")[0].inode == ROOT_INODE
    # close-to-open: what another client commits is seen by the next call
    other = new_meta(meta_url)
    try:
        s4 = _slice(other, 3 * CHUNK_SIZE, pos=0)
        s4 = Slice(pos=0, id=s4.id, size=CHUNK_SIZE, off=0, len=CHUNK_SIZE)
        other.write_chunk(f.inode, 0, s4)
        assert m.resolve_slices("/d/f")[1][0] == [s1, s2, s4]
        other.truncate(f.inode, 10)
        a, chunks = m.resolve_slices("/d/f")
        assert a.length == 10 and len(chunks) == 1
    finally:
        other.close()
    for path, code in (("/missing", errno.ENOENT), ("/dangling", errno.ENOENT),
                       ("/d/f/x", errno.ENOTDIR), ("d/f", errno.EINVAL),
                       ("/" + "x" * 256, errno.ENAMETOOLONG)):
        with _errno(code):
            m.resolve_slices(path)


def test_delete_deferred_while_open(m, meta_url):
    freed = []
    m.on_delete_slices = freed.extend
    f = m.create(ROOT_INODE, "f")
    sl = _slice(m, 10)
    m.write_chunk(f.inode, 0, sl)
    m.open_file(f.inode)
    m.open_file(f.inode)
    m.unlink(ROOT_INODE, "f")
    assert freed == []
    a = m.getattr(f.inode)                     # the open file lives on, unlinked
    assert a.nlink == 0 and m.read_chunk(f.inode, 0) == [sl]
    with _errno(errno.ENOENT):
        m.lookup(ROOT_INODE, "f")
    m.close_file(f.inode)
    assert freed == []
    assert m.check() == []
    m.close_file(f.inode)
    assert freed == [(sl.id, 10)]
    with _errno(errno.ENOENT):
        m.getattr(f.inode)
    # a rename that replaces an open file defers the same way
    g = m.create(ROOT_INODE, "g")
    sl2 = _slice(m, 20)
    m.write_chunk(g.inode, 0, sl2)
    m.create(ROOT_INODE, "h")
    m.open_file(g.inode)
    m.rename(ROOT_INODE, "h", ROOT_INODE, "g")
    assert len(freed) == 1 and m.getattr(g.inode).nlink == 0
    m.close_file(g.inode)
    assert freed[1:] == [(sl2.id, 20)]
    # closing a file still linked frees nothing; closing one never opened here does nothing
    m.open_file(m.lookup(ROOT_INODE, "g").inode)
    m.close_file(m.lookup(ROOT_INODE, "g").inode)
    m.close_file(m.lookup(ROOT_INODE, "g").inode)
    assert len(freed) == 2
    assert m.check() == []
    # a client that dies with an unlinked file open: its stale session's files are freed
    m.new_session()
    k = m.create(ROOT_INODE, "k")
    sl3 = _slice(m, 30)
    m.write_chunk(k.inode, 0, sl3)
    m.open_file(k.inode)
    m.unlink(ROOT_INODE, "k")
    other = new_meta(meta_url)
    other.load()
    other_freed = []
    other.on_delete_slices = other_freed.extend
    assert other.clean_stale_sessions(timeout=60) == []
    assert other.getattr(k.inode).nlink == 0
    assert other.clean_stale_sessions(timeout=-1) == [m.sid]
    assert other_freed == [(sl3.id, 30)]
    with _errno(errno.ENOENT):
        other.getattr(k.inode)
    assert m.check() == []
    other.close()


def test_xattrs(m):
    f = m.create(ROOT_INODE, "f")
    assert m.listxattr(f.inode) == []
    with _errno(errno.ENODATA):
        m.getxattr(f.inode, "user.a")
    m.setxattr(f.inode, "user.a", b"1")
    m.setxattr(f.inode, "user.b", b"\x00\xff" * 100)
    assert m.getxattr(f.inode, "user.a") == b"1"
    assert m.getxattr(f.inode, "user.b") == b"\x00\xff" * 100
    assert m.listxattr(f.inode) == ["user.a", "user.b"]
    with _errno(errno.EEXIST):
        m.setxattr(f.inode, "user.a", b"2", XATTR_CREATE)
    with _errno(errno.ENODATA):
        m.setxattr(f.inode, "user.c", b"2", XATTR_REPLACE)
    m.setxattr(f.inode, "user.a", b"2", XATTR_REPLACE)
    m.setxattr(f.inode, "user.c", b"", XATTR_CREATE)
    assert m.getxattr(f.inode, "user.a") == b"2" and m.getxattr(f.inode, "user.c") == b""
    m.removexattr(f.inode, "user.a")
    with _errno(errno.ENODATA):
        m.removexattr(f.inode, "user.a")
    assert m.listxattr(f.inode) == ["user.b", "user.c"]
    d = m.mkdir(ROOT_INODE, "d")
    m.setxattr(d.inode, "user.dir", b"x")
    assert m.listxattr(d.inode) == ["user.dir"]
    for call in (lambda: m.getxattr(999_999, "user.a"), lambda: m.listxattr(999_999),
                 lambda: m.setxattr(999_999, "user.a", b""),
                 lambda: m.removexattr(999_999, "user.a")):
        with _errno(errno.ENOENT):
            call()
    m.unlink(ROOT_INODE, "f")                   # xattrs go with the inode
    g = m.create(ROOT_INODE, "g")
    assert m.listxattr(g.inode) == []


# -- clients ---------------------------------------------------------------------------------------
def test_ids_unique_across_clients_and_threads(meta_url, m):
    other = new_meta(meta_url)
    other.load()
    ids: list[list[int]] = []
    inos: list[list[int]] = []

    def take(meta, k):
        got = [meta.new_slice_id() for _ in range(1200)]
        made = [meta.create(ROOT_INODE, f"t{k}_{i}").inode for i in range(60)]
        ids.append(got)
        inos.append(made)

    threads = [threading.Thread(target=take, args=(meta, k))
               for k, meta in enumerate([m, m, other, other])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [i for got in ids for i in got]
    assert len(flat) == 4800 and len(set(flat)) == 4800 and min(flat) >= 1
    flat = [i for got in inos for i in got]
    assert len(set(flat)) == 240 and min(flat) >= 2
    assert m.statfs()[1] == 241
    if hasattr(os, "fork"):
        # a forked child gets its own batches and connections
        r, w = os.pipe()
        mine = m.new_slice_id()
        pid = os.fork()
        if pid == 0:
            try:
                got = [m.new_slice_id() for _ in range(3)]
                got.append(m.create(ROOT_INODE, "from-child").inode)
                os.write(w, repr(got).encode())
            finally:
                os._exit(0)
        os.close(w)
        child = eval(os.read(r, 1000).decode())
        os.waitpid(pid, 0)
        os.close(r)
        mine2 = [m.new_slice_id() for _ in range(3)]
        assert not set(child[:3]) & (set(mine2) | {mine} | set(ids[0]) | set(ids[1]))
        assert m.lookup(ROOT_INODE, "from-child").inode == child[3]
        m.create(ROOT_INODE, "parent-still-works")
    assert m.check() == []
    other.close()


def test_sessions(meta_url, m):
    assert m.list_sessions() == []
    m.heartbeat_interval = 0.05
    sid = m.new_session({"mount": "/mnt/x"})
    s = m.list_sessions()
    assert [x["sid"] for x in s] == [sid] and s[0]["info"] == {"mount": "/mnt/x"}
    hb = s[0]["heartbeat"]
    assert abs(hb - time.time()) < 5
    deadline = time.time() + 5
    while m.list_sessions()[0]["heartbeat"] == hb and time.time() < deadline:
        time.sleep(0.02)
    assert m.list_sessions()[0]["heartbeat"] > hb          # the heartbeat thread refreshes it
    other = new_meta(meta_url)
    sid2 = other.new_session()
    assert sid2 != sid
    assert [x["sid"] for x in m.list_sessions()] == sorted([sid, sid2])
    m.close_session()
    assert [x["sid"] for x in other.list_sessions()] == [sid2]
    other.close()                                          # close() drops the session too
    assert m.list_sessions() == []
    time.sleep(0.15)
    assert m.list_sessions() == []                         # no heartbeat resurrects it


def _racer(url: str, p: int, n: int, start) -> None:
    """One client of the two-process race (top level: run by a 'spawn' child)."""
    m = new_meta(url)
    m.load()
    work = m.resolve("/work").inode
    sub = m.resolve("/work/sub").inode
    start.wait(60)                                           # both start together
    for i in range(n):
        name = f"a{p}_{i}"
        a = m.create(work, name)
        k = i % 3
        if k == 0:
            m.rename(work, name, work, f"s{i % 4}")          # both fight over s0..s3
        elif k == 1:
            m.link(a.inode, work, f"h{p}_{i}")
            m.unlink(work, name)
        else:
            d = m.mkdir(work, f"d{p}_{i}")
            m.rename(work, name, d.inode, "f")
            m.rename(work, f"d{p}_{i}", sub, f"dd{p}_{i}")
        if i % 5 == 0:                                       # both fight over one directory
            try:
                m.mkdir(work, "race")
            except FileExistsError:
                pass
            try:
                m.rmdir(work, "race")
            except FileNotFoundError:
                pass
    m.close()


def test_two_processes_race(m, meta_url):
    n = 300
    work = m.mkdir(ROOT_INODE, "work")
    m.mkdir(work.inode, "sub")
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_racer, args=(meta_url, p, n, start)) for p in (0, 1)]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join(120)
        assert pr.exitcode == 0
    names = {nm for nm, _ in m.readdir(work.inode)} - {"race"}
    want = {"sub"} | {f"s{i % 4}" for i in range(0, n, 3)}
    want |= {f"h{p}_{i}" for p in (0, 1) for i in range(n) if i % 3 == 1}
    assert names == want
    subs = {nm: a for nm, a in m.readdir(m.lookup(work.inode, "sub").inode)}
    assert set(subs) == {f"dd{p}_{i}" for p in (0, 1) for i in range(n) if i % 3 == 2}
    for nm, a in subs.items():
        assert [x for x, _ in m.readdir(a.inode)] == ["f"]
    assert m.check() == []


def test_threads_no_lost_updates(meta_url, m):
    """Two clients x two threads append slices to one file and make directories in one."""
    f = m.create(ROOT_INODE, "shared")
    d = m.mkdir(ROOT_INODE, "d")
    other = new_meta(meta_url)
    other.load()

    def work(meta, k):
        for i in range(40):
            meta.write_chunk(f.inode, 0, Slice(pos=(k * 40 + i) * 10, id=meta.new_slice_id(),
                                              size=10, off=0, len=10))
            meta.mkdir(d.inode, f"t{k}_{i}")            # each bumps the parent's nlink

    threads = [threading.Thread(target=work, args=(meta, k))
               for k, meta in enumerate([m, m, other, other])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(m.read_chunk(f.inode, 0)) == 160
    assert m.getattr(f.inode).length == 1600
    assert len(m.readdir(d.inode)) == 160
    assert m.getattr(d.inode).nlink == 2 + 160
    assert m.check() == []
    other.close()


@pytest.mark.parametrize("engine", ["redis", "postgres"])
def test_dead_server(engine):
    port = free_port()
    url = (f"redis://127.0.0.1:{port}/1" if engine == "redis"
           else f"postgres://postgres@127.0.0.1:{port}/nothing")
    meta = new_meta(url)
    t = time.time()
    with pytest.raises(ConnectionError) as ei:
        meta.load()
    assert time.time() - t < 8
    assert str(port) in str(ei.value)


def test_dump_and_load_dump(m, tmp_path):
    d = m.mkdir(ROOT_INODE, "d", 0o700, uid=5)
    f = m.create(d.inode, "f ☃")
    m.write_chunk(f.inode, 0, _slice(m, 100))
    m.write_chunk(f.inode, 1, _slice(m, 50, pos=10))
    m.truncate(f.inode, CHUNK_SIZE + 30)
    m.link(f.inode, ROOT_INODE, "hard")
    m.symlink(d.inode, "ln", "../hard")
    m.setxattr(f.inode, "user.k", b"\x00\x01")
    m.mkdir(d.inode, "empty")
    data = m.dump()
    assert set(data["inodes"]) == {str(i) for i in (1, d.inode, f.inode, d.inode + 2,
                                                     d.inode + 3)}
    copy = new_meta(f"sqlite3://{tmp_path}/copy/meta.db")
    copy.load_dump(data)
    assert copy.load() == FMT
    assert copy.dump() == data
    assert copy.check() == []
    assert copy.resolve("/d/ln").inode == f.inode
    assert copy.read_chunk(f.inode, 0) == m.read_chunk(f.inode, 0)
    assert copy.create(ROOT_INODE, "new").inode not in {int(i) for i in data["inodes"]}
    assert copy.new_slice_id() > max(i for i, _ in m.list_slices())
    with pytest.raises(AlreadyFormattedError):
        copy.load_dump(data)
    with pytest.raises(AlreadyFormattedError):
        m.load_dump(data)
    copy.close()


# -- connections: threads that end, forks ------------------------------------------------------------
def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_thread_s_connection_closes_when_the_thread_ends(m):
    """Threads come and go (the background cleanup runs in a new one each interval, trio's
    worker threads exit when idle): each one's connection is closed with it, not kept until the
    client closes (SQLite: two descriptors per connection, one more pair a minute before)."""
    import gc
    m.statfs()                                  # this thread's connection
    base_conns, base_fds = len(m._conns), _open_fds()
    for _ in range(20):
        t = threading.Thread(target=m.statfs)
        t.start()
        t.join()
    gc.collect()
    assert len(m._conns) == base_conns
    assert _open_fds() <= base_fds + 2          # the engine's own (a socket may reconnect)
    assert m.statfs()[1] >= 1                   # this thread's connection still works


def test_fork_while_another_thread_is_in_a_transaction(tmp_path):
    """SQLite marks a lock as held in a process-wide table: a child forked while another thread
    was inside a write transaction found the database locked for good (for half an hour of
    retries). The fork now waits for the transaction to end."""
    url = f"sqlite3://{tmp_path}/fork.db"
    meta = new_meta(url)
    meta.init(FMT)
    inside, go_on = threading.Event(), threading.Event()

    def slow_write(tx):
        tx.set("k", b"parent")
        inside.set()
        go_on.wait(10)

    writer = threading.Thread(target=meta.txn, args=(slow_write,))
    writer.start()
    assert inside.wait(10)
    threading.Timer(0.3, go_on.set).start()      # the fork waits for this transaction
    pid = os.fork()
    if pid == 0:                                # the child: a client of its own writes
        code = 1
        try:
            child = new_meta(url)
            child.busy_timeout_ms, child.max_retries = 500, 2
            child.txn(lambda tx: tx.set("k", b"child"))
            code = 0 if child.txn(lambda tx: tx.get("k"), readonly=True) == b"child" else 2
        finally:
            os._exit(code)
    writer.join()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert meta.txn(lambda tx: tx.get("k"), readonly=True) == b"child"
    meta.close()
