"""The POSIX mount (``torchjuice mount``), tried as programs use a file system.

Mounts run as separate processes (``python -m torchjuice.cli mount ... -d``), as users start them;
teardown always unmounts (``fusermount3 -u``) and ends the process. Differential tests run one
seeded random sequence of file operations on the mount and on a local directory and compare every
result and errno, then the whole tree. Without a usable /dev/fuse the tests skip, except under
``TORCHJUICE_REQUIRE_SERVERS=1`` (CI), where that is a failure.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import tarfile
import time
import zipfile

import pytest

import torchjuice as tj
from conftest import make_meta_url

CLI = [sys.executable, "-m", "torchjuice.cli"]


# -- mounting ----------------------------------------------------------------------------------------
def _fuse_problem() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (apt-get install fuse3)"
    try:
        import pyfuse3  # noqa: F401
    except ImportError as e:
        return f"pyfuse3 is not installed ({e})"
    if os.geteuid() != 0 and not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not usable by this user"
    return None


@pytest.fixture(scope="module")
def fuse_ok():
    problem = _fuse_problem()
    if problem:
        if os.environ.get("TORCHJUICE_REQUIRE_SERVERS") == "1":
            pytest.fail(f"FUSE unusable: {problem} (TORCHJUICE_REQUIRE_SERVERS=1)")
        pytest.skip(f"FUSE unusable: {problem}")


class Mount:
    """A ``torchjuice mount -d`` process; ``close()`` unmounts and ends it."""

    def __init__(self, meta_url: str, mountpoint, *args, home=None):
        self.mp = str(mountpoint)
        self.env = {**os.environ, **({"TORCHJUICE_HOME": str(home)} if home else {})}
        self.log = os.path.join(self.env.get("TORCHJUICE_HOME", "/tmp"), "logs",
                                f"mount-{os.getpid()}-{abs(hash(self.mp))}.log")
        os.makedirs(self.mp, exist_ok=True)
        p = subprocess.run(CLI + ["mount", meta_url, self.mp, "-d", "--log", self.log, *args],
                           capture_output=True, text=True, env=self.env, timeout=90)
        if p.returncode != 0:
            _unmount(self.mp)
            raise AssertionError(f"mount failed: {p.stderr}\n{self.log_tail()}")
        with open(os.path.join(self.mp, ".torchjuice")) as f:
            self.info = json.load(f)
        self.pid = self.info["pid"]

    def log_tail(self) -> str:
        try:
            with open(self.log) as f:
                return "".join(f.readlines()[-30:])
        except OSError:
            return ""

    def close(self) -> None:
        _unmount(self.mp)
        deadline = time.time() + 30
        while time.time() < deadline and _alive(self.pid):
            time.sleep(0.05)
        if _alive(self.pid):
            os.kill(self.pid, 9)
            raise AssertionError(f"mount process {self.pid} did not exit\n{self.log_tail()}")

    def path(self, *parts) -> str:
        return os.path.join(self.mp, *parts)


def _unmount(mp: str) -> None:
    if subprocess.run(["fusermount3", "-u", mp], capture_output=True).returncode != 0:
        subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@contextlib.contextmanager
def _home(home):
    """TORCHJUICE_HOME for a module-scoped volume (set up before the per-test home exists)."""
    old = os.environ.get("TORCHJUICE_HOME")
    os.environ["TORCHJUICE_HOME"] = str(home)
    try:
        yield
    finally:
        if old is None:
            del os.environ["TORCHJUICE_HOME"]
        else:
            os.environ["TORCHJUICE_HOME"] = old


def _volume(meta_url: str, root) -> str:
    # no trash: a removed file goes at once, as on a local file system (nlink 0 while open)
    tj.format(meta_url, "fusevol", storage=f"file://{root}/bucket", trash_days=0)
    return meta_url


@pytest.fixture(scope="module")
def sqlite_mount(fuse_ok, request, tmp_path_factory):
    """One mount of an SQLite volume shared by the tests of this module (each uses its own
    directory in it)."""
    root = tmp_path_factory.mktemp("fusevol")
    home = root / "home"
    with _home(home):
        url = _volume(make_meta_url("sqlite", request, root), root)
    m = Mount(url, root / "mnt", home=home)
    m.meta_url, m.root = url, root
    yield m
    m.close()


@pytest.fixture
def workdir(sqlite_mount, request):
    d = sqlite_mount.path(request.node.name.replace("[", "_").replace("]", ""))
    os.mkdir(d)
    return d


# -- the basics --------------------------------------------------------------------------------------
def test_mount_umount_cli_and_control_file(fuse_ok, tmp_path):
    url = _volume(f"sqlite3://{tmp_path}/m.db", tmp_path)
    mp = tmp_path / "mnt"
    m = Mount(url, mp)
    try:
        assert os.path.ismount(mp)
        assert m.info["volume"] == "fusevol" and m.info["meta"] == url
        assert ".torchjuice" not in os.listdir(mp)          # hidden: looked up, never listed
        with pytest.raises(PermissionError):
            os.unlink(mp / ".torchjuice")
        with pytest.raises(OSError):
            open(mp / ".torchjuice", "w")
        (mp / "hello.txt").write_text("hi")
        p = subprocess.run(CLI + ["mount", url, str(mp), "-d"], capture_output=True, text=True)
        assert p.returncode == 1 and "already mounted" in p.stderr
        p = subprocess.run(CLI + ["umount", str(mp)], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert not os.path.ismount(mp) and not _alive(m.pid)
    finally:
        _unmount(str(mp))
    with tj.connect(url) as vol:
        assert vol.read_bytes("/hello.txt") == b"hi"


def test_foreground_mount_ends_on_sigterm(fuse_ok, tmp_path):
    url = _volume(f"sqlite3://{tmp_path}/m.db", tmp_path)
    mp = tmp_path / "mnt"
    mp.mkdir()
    proc = subprocess.Popen(CLI + ["mount", url, str(mp)], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        while line and "mounted volume" not in line:
            line = proc.stderr.readline()
        assert os.path.ismount(mp), line
        (mp / "f").write_bytes(b"x" * 10)
        proc.terminate()
        assert proc.wait(30) == 0
        assert not os.path.ismount(mp)
    finally:
        if proc.poll() is None:
            proc.kill()
        _unmount(str(mp))


def test_mount_errors_are_one_line(fuse_ok, tmp_path):
    p = subprocess.run(CLI + ["mount", "nosuchvol", str(tmp_path / "m"), "-d"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "no volume named 'nosuchvol'" in p.stderr
    assert "Traceback" not in p.stderr
    p = subprocess.run(CLI + ["umount", str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 1 and "Traceback" not in p.stderr


def test_umount_clears_a_dead_mount(fuse_ok, tmp_path):
    url = _volume(f"sqlite3://{tmp_path}/m.db", tmp_path)
    mp = tmp_path / "mnt"
    m = Mount(url, mp)
    try:
        (mp / "kept").write_bytes(b"committed")
        os.kill(m.pid, 9)                 # the mount process dies: the kernel mount stays, dead
        deadline = time.time() + 10
        while _alive(m.pid) and time.time() < deadline:
            time.sleep(0.05)
        with pytest.raises(OSError) as e:
            os.listdir(mp)
        assert e.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
        p = subprocess.run(CLI + ["mount", url, str(mp), "-d"], capture_output=True, text=True)
        assert p.returncode == 1 and "umount" in p.stderr
        p = subprocess.run(CLI + ["umount", str(mp)], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        m = Mount(url, mp)
        assert (mp / "kept").read_bytes() == b"committed"
    finally:
        m.close()


# -- differential: the same random operations on the mount and on a local directory -----------------
DIRS = ["d1", "d2", "d1/d3"]
FILES = ["a", "b", "c", "d1/a", "d1/b", "d2/a", "d2/c", "d1/d3/a", "d1/d3/b"]
LINKS = ["l1", "d1/l2", "d2/l3", "h1", "d2/h2"]        # symlink and hard-link names
TARGETS = ["a", "b", "d1", "../a", "d1/a", "d3", "nowhere", "l1", "../d2/a"]

_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(src: str, dst: str, flags: int) -> None:
    AT_FDCWD = -100
    if _libc.renameat2(AT_FDCWD, src.encode(), AT_FDCWD, dst.encode(), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), src)


def gen_ops(seed: int, n: int) -> list[tuple]:
    r = random.Random(seed)

    def f():    # mostly a file name, sometimes a directory (for the type errors)
        return r.choice(FILES) if r.random() < 0.85 else r.choice(DIRS)

    def ln():
        return r.choice(LINKS) if r.random() < 0.8 else f()

    def d():
        return r.choice(DIRS) if r.random() < 0.85 else r.choice(FILES)

    ops = [("mkdir", "d1", 0o755)]
    for _ in range(n):
        k = r.random()
        if k < 0.08:
            ops.append(("mkdir", d(), r.choice([0o755, 0o700])))
        elif k < 0.28:
            size = r.choice([0, 1, 100, 4096, 5000, 70_000, 300_000])
            ops.append(("write", f(), r.choice([0, 0, 10, 4095, 65536, 200_000]), size,
                        r.randrange(1 << 30)))
        elif k < 0.32:
            ops.append(("append", f(), r.choice([1, 1000, 9000]), r.randrange(1 << 30)))
        elif k < 0.40:
            ops.append(("read", r.choice([f(), f(), ln()])))
        elif k < 0.44:
            ops.append(("truncate", f(), r.choice([0, 1, 5000, 100_000, 400_000])))
        elif k < 0.50:
            ops.append(("rename", f(), f()))
        elif k < 0.53:
            ops.append(("rename", d(), d()))
        elif k < 0.56:
            ops.append(("renameat2", f(), f(), r.choice([1, 2])))    # NOREPLACE, EXCHANGE
        elif k < 0.57:
            ops.append(("renameat2", d(), d(), r.choice([1, 2])))
        elif k < 0.61:
            ops.append(("unlink", r.choice([f(), ln()])))
        elif k < 0.64:
            ops.append(("rmdir", d()))
        elif k < 0.68:
            ops.append(("symlink", r.choice(TARGETS), ln()))
        elif k < 0.71:
            ops.append(("link", f(), ln()))
        elif k < 0.74:
            ops.append(("chmod", f(), r.choice([0o600, 0o644, 0o755, 0o4755])))
        elif k < 0.80:
            ops.append(("listdir", r.choice(["", "d1", "d2", "d1/d3", "a", "l1"])))
        elif k < 0.85:
            ops.append(("stat", r.choice([f(), ln()])))
        elif k < 0.88:
            ops.append(("readlink", ln()))
        elif k < 0.90:
            ops.append(("create_excl", f()))
        elif k < 0.93:
            ops.append(("utime", f(), 1_600_000_000_123_456_000 + r.randrange(10**9) * 1000))
        elif k < 0.97:
            ops.append(("two_fds", f(), r.randrange(1 << 30)))
        else:
            ops.append(("unlink_open", f(), r.randrange(1 << 30)))
    return ops


def _stat(st) -> tuple:
    kind = stat.S_IFMT(st.st_mode)
    return (kind, stat.S_IMODE(st.st_mode), st.st_nlink,
            None if kind == stat.S_IFDIR else st.st_size)


def apply_op(root: str, op: tuple):
    name, *args = op
    P = lambda p: os.path.join(root, p)  # noqa: E731
    try:
        if name == "mkdir":
            os.mkdir(P(args[0]), args[1])
        elif name == "write":
            p, off, size, seed = args
            data = random.Random(seed).randbytes(size)
            fd = os.open(P(p), os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                return os.pwrite(fd, data, off)
            finally:
                os.close(fd)
        elif name == "append":
            p, size, seed = args
            with open(P(p), "ab") as f:
                return f.write(random.Random(seed).randbytes(size))
        elif name == "read":
            with open(P(args[0]), "rb") as f:
                data = f.read()
            return len(data), hash(data)
        elif name == "truncate":
            os.truncate(P(args[0]), args[1])
        elif name == "rename":
            os.rename(P(args[0]), P(args[1]))
        elif name == "renameat2":
            renameat2(P(args[0]), P(args[1]), args[2])
        elif name == "unlink":
            os.unlink(P(args[0]))
        elif name == "rmdir":
            os.rmdir(P(args[0]))
        elif name == "symlink":
            os.symlink(args[0], P(args[1]))
        elif name == "link":
            os.link(P(args[0]), P(args[1]))
        elif name == "chmod":
            os.chmod(P(args[0]), args[1])
        elif name == "listdir":
            return sorted(os.listdir(P(args[0])))
        elif name == "stat":
            return _stat(os.stat(P(args[0]))), _stat(os.lstat(P(args[0])))
        elif name == "readlink":
            return os.readlink(P(args[0]))
        elif name == "create_excl":
            os.close(os.open(P(args[0]), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
        elif name == "utime":
            os.utime(P(args[0]), ns=(args[1], args[1]))
            st = os.stat(P(args[0]))
            return round(st.st_mtime_ns / 1000), round(st.st_atime_ns / 1000)
        elif name == "two_fds":
            # two descriptors of one file see each other's writes at once; ftruncate and fstat
            data = random.Random(args[1]).randbytes(3000)
            fd1 = os.open(P(args[0]), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fd2 = os.open(P(args[0]), os.O_RDONLY)
                try:
                    os.pwrite(fd1, data, 100)
                    got = os.pread(fd2, 5000, 0)
                    os.ftruncate(fd1, 2000)
                    return hash(got), os.fstat(fd2).st_size, hash(os.pread(fd2, 5000, 0))
                finally:
                    os.close(fd2)
            finally:
                os.close(fd1)
        elif name == "unlink_open":
            data = random.Random(args[1]).randbytes(2000)
            fd = os.open(P(args[0]), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, data)
                os.unlink(P(args[0]))
                return os.pread(fd, 4000, 0) == data, os.fstat(fd).st_nlink
            finally:
                os.close(fd)
        else:
            raise AssertionError(name)
        return None
    except OSError as e:
        return ("errno", errno.errorcode.get(e.errno, e.errno))


def snapshot(root: str) -> dict:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_nlink)
            else:
                with open(p, "rb") as f:
                    out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_nlink, hash(f.read()))
    return out


def run_differential(mount_dir: str, local_dir: str, seeds, n_ops: int) -> int:
    done = 0
    for seed in seeds:
        m_root, l_root = os.path.join(mount_dir, f"s{seed}"), os.path.join(local_dir, f"s{seed}")
        os.mkdir(m_root)
        os.mkdir(l_root)
        for i, op in enumerate(gen_ops(seed, n_ops)):
            got, want = apply_op(m_root, op), apply_op(l_root, op)
            assert got == want, f"seed {seed} op {i} {op}: mount {got!r}, local {want!r}"
            done += 1
        assert snapshot(m_root) == snapshot(l_root), f"seed {seed}: trees differ"
    return done


@pytest.fixture(scope="module")
def redis_mount(fuse_ok, request, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuseredis")
    home = root / "home"
    with _home(home):
        url = _volume(make_meta_url("redis", request, root), root)
    m = Mount(url, root / "mnt", home=home)
    yield m
    m.close()


@pytest.fixture(scope="module")
def s3_mount(fuse_ok, request, tmp_path_factory):
    """SQLite + the S3 server: reads, truncates and deletes take the worker-thread paths."""
    root = tmp_path_factory.mktemp("fuses3")
    home = root / "home"
    with _home(home):
        url = make_meta_url("sqlite", request, root)
        tj.format(url, "fusevol", storage=request.getfixturevalue("s3_server").url(),
                  trash_days=0)
    m = Mount(url, root / "mnt", "--cache-dir", str(root / "cache"), home=home)
    yield m
    m.close()


@pytest.mark.parametrize("engine", ["sqlite", "redis"])
def test_differential_random_operations(engine, request, tmp_path):
    m = request.getfixturevalue(f"{engine}_mount")
    d = m.path(f"diff-{engine}")
    os.mkdir(d)
    local = tmp_path / "local"
    local.mkdir()
    old = os.umask(0o022)
    try:
        n = run_differential(d, str(local), seeds=range(8), n_ops=200)
    finally:
        os.umask(old)
    assert n == 8 * 201


def test_differential_on_s3_store(s3_mount, tmp_path):
    d = s3_mount.path("diff-s3")
    os.mkdir(d)
    local = tmp_path / "local"
    local.mkdir()
    old = os.umask(0o022)
    try:
        assert run_differential(d, str(local), seeds=range(100, 104), n_ops=150) == 4 * 151
    finally:
        os.umask(old)


# -- POSIX details -----------------------------------------------------------------------------------
def test_xattrs_statfs_times_and_errnos(workdir):
    f = os.path.join(workdir, "x")
    open(f, "wb").close()
    os.setxattr(f, "user.k", b"v1")
    assert os.getxattr(f, "user.k") == b"v1"
    with pytest.raises(FileExistsError):
        os.setxattr(f, "user.k", b"v2", os.XATTR_CREATE)
    with pytest.raises(OSError) as e:
        os.setxattr(f, "user.other", b"v", os.XATTR_REPLACE)
    assert e.value.errno == errno.ENODATA
    os.setxattr(f, "user.k", b"v2", os.XATTR_REPLACE)
    assert os.listxattr(f) == ["user.k"] and os.getxattr(f, "user.k") == b"v2"
    os.removexattr(f, "user.k")
    with pytest.raises(OSError) as e:
        os.getxattr(f, "user.k")
    assert e.value.errno == errno.ENODATA
    sv = os.statvfs(workdir)
    assert sv.f_namemax == 255 and sv.f_bavail > 0 and sv.f_files > 0
    os.utime(f, ns=(1_000_000_000_500_000_000, 1_500_000_000_250_000_000))
    st = os.stat(f)
    assert abs(st.st_mtime_ns - 1_500_000_000_250_000_000) < 1000
    assert abs(st.st_atime_ns - 1_000_000_000_500_000_000) < 1000
    assert st.st_blksize >= 65536
    with pytest.raises(IsADirectoryError):
        open(workdir, "rb").read()
    with pytest.raises(NotADirectoryError):
        os.listdir(f)
    with pytest.raises(OSError) as e:
        os.mkdir(os.path.join(workdir, "n" * 256))
    assert e.value.errno == errno.ENAMETOOLONG
    with pytest.raises(OSError) as e:
        os.mkfifo(os.path.join(workdir, "fifo"))
    assert e.value.errno == errno.EPERM


def test_flock_and_fcntl_locks_in_one_mount(workdir):
    f = os.path.join(workdir, "lock")
    open(f, "wb").close()
    a, b = open(f, "rb+"), open(f, "rb+")
    try:
        fcntl.flock(a, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(BlockingIOError):
            fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(a, fcntl.LOCK_UN)
        fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        a.close()
        b.close()
    # POSIX record locks conflict between processes
    fd = os.open(f, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
        code = ("import fcntl,os,sys\nfd=os.open(sys.argv[1],os.O_RDWR)\n"
                "try:\n fcntl.lockf(fd,fcntl.LOCK_EX|fcntl.LOCK_NB,10,0)\nexcept OSError:\n"
                " sys.exit(3)\nsys.exit(0)")
        assert subprocess.run([sys.executable, "-c", code, f]).returncode == 3
        fcntl.lockf(fd, fcntl.LOCK_UN, 10, 0)
        assert subprocess.run([sys.executable, "-c", code, f]).returncode == 0
    finally:
        os.close(fd)


def test_permissions_are_checked_for_other_users(workdir):
    secret = os.path.join(workdir, "secret")
    with open(secret, "w") as f:
        f.write("s")
    os.chmod(secret, 0o600)
    public = os.path.join(workdir, "public")
    with open(public, "w") as f:
        f.write("p")
    os.chmod(public, 0o644)
    os.chmod(workdir, 0o755)
    # the child starts inside the mount (its ancestors here are root's private temp dirs)
    code = ("import os,sys\nos.setgroups([])\nos.setgid(65534)\nos.setuid(65534)\nout=[]\n"
            "for p,m in [('secret','r'),('public','r'),('public','a')]:\n"
            " try:\n  open(p,m).close(); out.append('ok')\n"
            " except PermissionError: out.append('EACCES')\n"
            "try:\n os.mkdir('nobody-dir')\n out.append('ok')\n"
            "except PermissionError: out.append('EACCES')\nprint(out)")
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to another user")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=workdir)
    assert p.stdout.strip() == "['EACCES', 'ok', 'EACCES', 'EACCES']", p.stderr
    # files created by a user belong to that user
    os.chmod(workdir, 0o777)
    code = "import os\nos.setgroups([])\nos.setgid(65534)\nos.setuid(65534)\nopen('mine','w').close()"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=workdir)
    st = os.stat(os.path.join(workdir, "mine"))
    assert (st.st_uid, st.st_gid) == (65534, 65534)


def test_sqlite_mmap_sparse_files_and_appends(workdir):
    import mmap
    import sqlite3
    db = sqlite3.connect(os.path.join(workdir, "db.sqlite"))      # fcntl locks, fsync, pwrite
    db.execute("pragma journal_mode=wal")
    db.execute("create table t(x)")
    db.executemany("insert into t values (?)", [(i,) for i in range(5000)])
    db.commit()
    assert db.execute("select count(*), sum(x) from t").fetchone() == (5000, 12497500)
    db.close()
    # a sparse file across the 64 MiB chunk boundary, read back with read() and mmap
    f = os.path.join(workdir, "sparse")
    with open(f, "wb") as fh:
        fh.seek(70 << 20)
        fh.write(b"end")
        fh.seek((64 << 20) - 2)
        fh.write(b"abcd")
    assert os.stat(f).st_size == (70 << 20) + 3
    with open(f, "rb") as fh:
        fh.seek((64 << 20) - 4)
        assert fh.read(8) == b"\0\0abcd\0\0"
        m = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)
        assert m[70 << 20:] == b"end" and m[1 << 20: (1 << 20) + 4] == b"\0" * 4
        m.close()
    # a shared writable mapping reaches the volume
    g = os.path.join(workdir, "mapped")
    with open(g, "wb") as fh:
        fh.write(bytes(8192))
    with open(g, "r+b") as fh:
        m = mmap.mmap(fh.fileno(), 8192)
        m[4096:4101] = b"hello"
        m.flush()
        m.close()
    with open(g, "rb") as fh:
        assert fh.read()[4096:4101] == b"hello"
    # O_APPEND through two descriptors interleaves, nothing is overwritten
    h = os.path.join(workdir, "log")
    a = os.open(h, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    b = os.open(h, os.O_WRONLY | os.O_APPEND)
    for i in range(5):
        os.write(a, b"a%d" % i)
        os.write(b, b"b%d" % i)
    os.close(a)
    os.close(b)
    with open(h, "rb") as fh:
        assert fh.read() == b"".join(b"a%db%d" % (i, i) for i in range(5))


def _big_io_and_write_only_descriptors(workdir):
    import mmap
    # large sequential I/O across a chunk boundary, 1 MiB requests, read back twice (the second
    # time from the kernel page cache) and through pread at odd offsets
    p = os.path.join(workdir, "big")
    data = os.urandom(1 << 20) * 67 + b"tail"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)    # write-only: direct I/O
    for i in range(0, len(data), 1 << 20):
        assert os.write(fd, data[i: i + (1 << 20)]) == len(data[i: i + (1 << 20)])
    os.close(fd)
    for _ in range(2):
        with open(p, "rb") as f:
            assert f.read() == data
    fd = os.open(p, os.O_RDONLY)
    try:
        for off in (0, 4095, (64 << 20) - 3, len(data) - 5):
            assert os.pread(fd, 1 << 20, off) == data[off: off + (1 << 20)]
    finally:
        os.close(fd)
    # a reader with cached pages and a shared mapping see what a write-only descriptor writes
    q = os.path.join(workdir, "coherent")
    with open(q, "wb") as f:
        f.write(b"a" * 65536)
    r = os.open(q, os.O_RDONLY)
    m = mmap.mmap(r, 65536, prot=mmap.PROT_READ)
    try:
        assert os.pread(r, 4, 0) == b"aaaa" and m[:4] == b"aaaa"
        w = os.open(q, os.O_WRONLY)
        os.pwrite(w, b"XXXX" * 1024, 0)
        os.pwrite(w, b"Y" * 10, 65536)                  # extends the file
        assert os.pread(r, 4, 0) == b"XXXX" and m[:4] == b"XXXX"
        assert os.fstat(r).st_size == 65546
        os.close(w)
        assert os.pread(r, 10, 65536) == b"Y" * 10
    finally:
        m.close()
        os.close(r)
    # the kernel asks for security.capability before each write: the cached answer follows
    # changes of xattrs made through the mount
    w = os.open(q, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(w, b"1")
        os.setxattr(q, "user.k", b"v")
        os.write(w, b"2")
        assert os.getxattr(q, "user.k") == b"v"
        with pytest.raises(OSError) as e:
            os.getxattr(q, "security.capability")
        assert e.value.errno == errno.ENODATA
    finally:
        os.close(w)
    with open(q, "rb") as f:
        assert f.read()[-12:] == b"Y" * 10 + b"12"


def test_big_sequential_io_and_write_only_descriptors(workdir):
    _big_io_and_write_only_descriptors(workdir)


def test_big_sequential_io_on_s3_store(s3_mount):
    d = s3_mount.path("bigio")
    os.mkdir(d)
    _big_io_and_write_only_descriptors(d)


def test_setgid_directory_passes_its_group(workdir):
    d = os.path.join(workdir, "shared")
    os.mkdir(d)
    os.chown(d, 0, 4242)
    os.chmod(d, 0o2775)
    os.mkdir(os.path.join(d, "sub"))
    open(os.path.join(d, "f"), "w").close()
    assert os.stat(os.path.join(d, "f")).st_gid == 4242
    st = os.stat(os.path.join(d, "sub"))
    assert st.st_gid == 4242 and st.st_mode & stat.S_ISGID


def test_readdir_offsets_with_many_entries(workdir):
    names = {f"file-{i:04d}-{'x' * 40}" for i in range(700)}
    for n in names:
        open(os.path.join(workdir, n), "w").close()
    with os.scandir(workdir) as it:
        seen = [(e.name, e.is_file()) for e in it]
    assert sorted(n for n, _ in seen) == sorted(names) and all(f for _, f in seen)
    p = subprocess.run(["ls", "-a", workdir], capture_output=True, text=True, check=True)
    listed = p.stdout.split()
    assert listed[:2] == [".", ".."] and len(listed) == 702


# -- shell tools ----------------------------------------------------------------------------------------
SHELL = r"""
set -e
echo hello > a; cp a b; mv b c; ln c d; ln -s c e; chmod 600 c; cat e
dd if=/dev/zero of=big bs=64k count=40 status=none; cp big big2; cmp big big2
printf 'more\n' >> a; wc -c a; ls -l a c d | awk '{print $1, $2, $5, $NF}'
mkdir -p src/x/y; echo 1 > src/x/y/f; ln -s y/f src/x/link
tar cf t.tar src; mkdir out; tar xf t.tar -C out; diff -r src out/src; rm t.tar
mv out/src out/moved; ls -R out
git init -q repo; cd repo; git config user.email t@e; git config user.name t
echo x > f; git add f; git commit -qm first; echo y >> f; git commit -qam second
git log --format=%s; git status --porcelain; git fsck --no-progress 2>&1 | grep -v dangling || true
cd ..; git clone -q repo clone; cat clone/f; rm -rf repo/.git/hooks
"""


def _bash(cwd: str, script: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "HOME": cwd, "LC_ALL": "C"}
    return subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=120)


def test_shell_tools_like_a_local_directory(workdir, tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    m, l_ = _bash(workdir, SHELL), _bash(str(local), SHELL)
    assert m.returncode == 0, m.stderr
    assert l_.returncode == 0, l_.stderr
    assert m.stdout == l_.stdout
    skip = lambda rel: rel.startswith(("repo/.git", "clone/.git"))  # noqa: E731 (times inside)
    ms = {k: v for k, v in snapshot(workdir).items() if not skip(k)}
    ls = {k: v for k, v in snapshot(str(local)).items() if not skip(k)}
    assert ms == ls


# -- consistency between clients -----------------------------------------------------------------------
def test_two_mounts_see_each_others_closed_files(sqlite_mount, tmp_path):
    a = sqlite_mount
    b = Mount(a.meta_url, tmp_path / "mnt2", "--attr-cache", "0.2", "--entry-cache", "0.2",
              home=a.root / "home")
    try:
        os.mkdir(a.path("c2o"))
        with open(a.path("c2o", "f"), "wb") as f:
            f.write(b"one" * 1000)
        with open(b.path("c2o", "f"), "rb") as f:
            assert f.read() == b"one" * 1000
        # overwrite in place (same inode, shorter): b sees the new length and bytes at open
        with open(b.path("c2o", "f"), "r+b") as f:
            f.write(b"TWO")
            f.truncate(3)
        with open(a.path("c2o", "f"), "rb") as f:
            assert f.read() == b"TWO"
        # appends by one are seen whole by the other's next open
        for i in range(3):
            with open(a.path("c2o", "f"), "ab") as f:
                f.write(b"+%d" % i)
            with open(b.path("c2o", "f"), "rb") as f:
                assert f.read() == b"TWO" + b"".join(b"+%d" % j for j in range(i + 1))
        # a big file written by b is whole for a (and cached pages do not hide the change)
        data = os.urandom(3 << 20)
        with open(a.path("c2o", "big"), "wb") as f:
            f.write(bytes(len(data)))
        with open(a.path("c2o", "big"), "rb") as f:
            f.read()
        with open(b.path("c2o", "big"), "wb") as f:
            f.write(data)
        with open(a.path("c2o", "big"), "rb") as f:
            assert f.read() == data
        # names: made and removed by one, seen by the other after the entry cache (0.2 s / 1 s)
        os.rename(b.path("c2o", "big"), b.path("c2o", "renamed"))
        deadline = time.time() + 5
        while os.path.exists(a.path("c2o", "big")) and time.time() < deadline:
            time.sleep(0.1)
        assert sorted(os.listdir(a.path("c2o"))) == ["f", "renamed"]
    finally:
        b.close()


def test_mount_and_python_api_see_each_others_files(sqlite_mount):
    m = sqlite_mount
    with tj.connect(m.meta_url) as vol:
        vol.makedirs("/api", exist_ok=True)
        with vol.open("/api/from-api.bin", "wb") as f:
            f.write(b"A" * 100_000)
        with open(m.path("api", "from-api.bin"), "rb") as f:
            assert f.read() == b"A" * 100_000
        with open(m.path("api", "from-mount.txt"), "w") as f:
            f.write("written through FUSE")
        assert vol.read_bytes("/api/from-mount.txt") == b"written through FUSE"
        # the API rewrites a file the mount has read (and cached): the mount's next open sees it
        with vol.open("/api/from-api.bin", "wb") as f:
            f.write(b"B" * 50_000)
        with open(m.path("api", "from-api.bin"), "rb") as f:
            assert f.read() == b"B" * 50_000
        os.symlink("from-mount.txt", m.path("api", "ln"))
        assert vol.readlink("/api/ln") == "from-mount.txt"
        assert vol.stat("/api/from-mount.txt").st_mode == os.stat(
            m.path("api", "from-mount.txt")).st_mode


# -- warmup and stats on a mounted path ---------------------------------------------------------------
def test_warmup_and_stats_resolve_a_mount(fuse_ok, tmp_path):
    url = _volume(f"sqlite3://{tmp_path}/m.db", tmp_path)
    cache = tmp_path / "cache"
    m = Mount(url, tmp_path / "mnt", "--cache-dir", str(cache))
    try:
        os.makedirs(m.path("data"))
        with open(m.path("data", "blob"), "wb") as f:
            f.write(os.urandom(5 << 20))
        p = subprocess.run(CLI + ["warmup", "-q", m.path("data")], capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert "warmup fusevol: 2 blocks" in p.stderr and str(cache) in p.stderr
        p = subprocess.run(CLI + ["stats", m.mp, "--count", "1", "--json"], capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        sessions = json.loads(p.stdout)
        mine = [s for s in sessions if s.get("info", s).get("mountpoint") == m.mp
                or s.get("mountpoint") == m.mp]
        assert mine, sessions
    finally:
        m.close()


# -- as a new user would: git clone, tar x, pip install --target, pandas ---------------------------
def _tiny_wheel(dest) -> str:
    path = os.path.join(dest, "tinypkg-1.0-py3-none-any.whl")
    files = {"tinypkg/__init__.py": "def answer():\n    return 42\n",
             "tinypkg-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: tinypkg\n"
                                                "Version: 1.0\n",
             "tinypkg-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\n"
                                             "Root-Is-Purelib: true\nTag: py3-none-any\n"}
    import base64
    import hashlib
    record = []
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
            digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
            record.append(f"{name},sha256={digest.decode()},{len(text)}")
        record.append("tinypkg-1.0.dist-info/RECORD,,")
        z.writestr("tinypkg-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    return path


def test_new_user_workflow_git_tar_pip_pandas(workdir, tmp_path):
    # git clone of a local repository
    src = tmp_path / "srcrepo"
    src.mkdir()
    r = _bash(str(src), "git init -q . && git config user.email t@e && git config user.name t "
                        "&& mkdir -p pkg && for i in $(seq 1 30); do echo $i > pkg/f$i; done "
                        "&& git add -A && git commit -qm init")
    assert r.returncode == 0, r.stderr
    r = _bash(workdir, f"git clone -q {src} clone && cd clone && git status --porcelain "
                       "&& git log --format=%s && cat pkg/f7")
    assert r.returncode == 0 and r.stdout == "init\n7\n", r.stderr
    # tar x of an archive with many small files, links and modes
    tree = tmp_path / "tree"
    for i in range(60):
        (tree / f"d{i % 6}").mkdir(parents=True, exist_ok=True)
        (tree / f"d{i % 6}" / f"f{i}.txt").write_text("x" * i)
    (tree / "d0" / "exe").write_text("#!/bin/sh\necho hi\n")
    os.chmod(tree / "d0" / "exe", 0o755)
    os.symlink("d0/exe", tree / "run")
    with tarfile.open(tmp_path / "t.tgz", "w:gz") as t:
        t.add(tree, "tree")
    r = _bash(workdir, f"tar xzf {tmp_path}/t.tgz && ./tree/run && diff -r tree {tree}")
    assert r.returncode == 0 and r.stdout == "hi\n", r.stderr + r.stdout
    # pip install --target into the mount, then import from there
    wheel = _tiny_wheel(str(tmp_path))
    site = os.path.join(workdir, "site")
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                        "--disable-pip-version-check", "--target", site, wheel],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    p = subprocess.run([sys.executable, "-c", "import tinypkg; print(tinypkg.answer())"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": site})
    assert p.stdout.strip() == "42", p.stderr
    # pandas round trip: parquet and csv
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    df = pd.DataFrame({"x": range(1000), "y": [f"s{i}" for i in range(1000)]})
    df.to_parquet(os.path.join(workdir, "t.parquet"))
    df.to_csv(os.path.join(workdir, "t.csv"), index=False)
    pd.testing.assert_frame_equal(pd.read_parquet(os.path.join(workdir, "t.parquet")), df)
    pd.testing.assert_frame_equal(pd.read_csv(os.path.join(workdir, "t.csv")), df)


_KEPT_REQUESTS = """
import os, resource, sys
from torchjuice.fuse.mount import tune_malloc
if sys.argv[1] == "tune":
    assert tune_malloc(320 << 20)
def refaults():
    # 256 write requests of 1 MiB alive at once (kept until their blocks are uploaded), then freed
    kept = [bytes(os.urandom(16)) * (1 << 16) for _ in range(256)]
    del kept
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    kept = [bytes(os.urandom(16)) * (1 << 16) for _ in range(256)]
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(min(refaults() for _ in range(3)))
"""


@pytest.mark.skipif(os.uname().sysname != "Linux", reason="glibc's mallopt")
def test_the_mount_keeps_the_memory_of_its_write_requests():
    """The mount keeps up to max_inflight bytes of 1 MiB write requests alive, then frees them:
    glibc would give that memory back and the next requests would fault in fresh pages (a page
    fault per 4 KiB); with the mount's thresholds the same pages serve again."""
    def refaults(mode):
        out = subprocess.run([sys.executable, "-c", _KEPT_REQUESTS, mode], capture_output=True,
                             text=True, check=True)
        return int(out.stdout)
    assert refaults("plain") > 10_000          # 256 MiB: 65,536 pages
    assert refaults("tune") < 2_000
