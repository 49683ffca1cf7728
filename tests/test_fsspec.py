"""``juice://`` through fsspec: fsspec's own abstract test suite, the entry point, URL resolution,
pandas/pyarrow, torch.distributed.checkpoint, and the native primitives."""
from __future__ import annotations

import os
import pickle
import posixpath
import subprocess
import sys
import textwrap
import uuid

import fsspec
import pytest
from fsspec.tests.abstract import (AbstractCopyTests, AbstractFixtures, AbstractGetTests,
                                   AbstractPutTests)

import torchjuice as tj
from torchjuice.fsspec import JuiceFileSystem

try:                                    # newer fsspec releases only
    from fsspec.tests.abstract import AbstractOpenTests
except ImportError:                     # pragma: no cover
    AbstractOpenTests = object
try:
    from fsspec.tests.abstract import AbstractPipeTests
except ImportError:                     # pragma: no cover
    AbstractPipeTests = object

ABS_VOL = "absvol"


# -- fsspec's abstract suite -------------------------------------------------------------------------
@pytest.fixture(scope="session")
def abs_meta(tmp_path_factory):
    """One embedded volume for the whole abstract suite (every test works in a fresh directory)."""
    tmp = tmp_path_factory.mktemp("absvol")
    meta = f"sqlite3://{tmp}/meta.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHJUICE_HOME", str(tmp / "home"))
        tj.format(meta, ABS_VOL, storage=f"file://{tmp}/data")
    yield meta
    tj.volume_for(ABS_VOL, meta=meta).close()


class JuiceFixtures(AbstractFixtures):
    @pytest.fixture
    def fs(self, abs_meta):
        return fsspec.filesystem("juice", meta=abs_meta)

    @pytest.fixture
    def fs_join(self):
        return posixpath.join

    @pytest.fixture
    def fs_path(self, fs):
        path = f"{ABS_VOL}/t-{uuid.uuid4().hex[:12]}"
        fs.makedirs(path)
        yield path
        if fs.exists(path):
            fs.rm(path, recursive=True)

    @pytest.fixture
    def supports_empty_directories(self):
        return True


class TestJuiceCopy(JuiceFixtures, AbstractCopyTests):
    pass


class TestJuiceGet(JuiceFixtures, AbstractGetTests):
    pass


class TestJuicePut(JuiceFixtures, AbstractPutTests):
    pass


if AbstractOpenTests is not object:
    class TestJuiceOpen(JuiceFixtures, AbstractOpenTests):
        pass

if AbstractPipeTests is not object:
    class TestJuicePipe(JuiceFixtures, AbstractPipeTests):
        pass


# -- our own ---------------------------------------------------------------------------------------
@pytest.fixture
def vol_meta(tmp_path):
    """An embedded volume ``vol`` formatted at an explicit engine URL (and registered)."""
    meta = f"sqlite3://{tmp_path}/meta.db"
    tj.format(meta, "vol", storage=f"file://{tmp_path}/data")
    yield meta
    tj.volume_for("vol", meta=meta).close()


@pytest.fixture
def jfs(vol_meta):
    return fsspec.filesystem("juice", meta=vol_meta)


def test_entry_point_without_importing_torchjuice(tmp_path):
    meta = f"sqlite3://{tmp_path}/meta.db"
    tj.format(meta, "epvol", storage=f"file://{tmp_path}/data")
    script = textwrap.dedent(f"""
        import sys, fsspec
        assert "torchjuice" not in sys.modules
        fs = fsspec.filesystem("juice", meta={meta!r})
        assert type(fs).__module__ == "torchjuice.fsspec", type(fs)
        fs.pipe_file("epvol/dir/x.bin", b"hello")
        assert fs.cat_file("juice://epvol/dir/x.bin") == b"hello"
        with fsspec.open("juice://epvol/y.txt", "w", meta={meta!r}) as f:
            f.write("text")
        with fsspec.open("juice://epvol/y.txt", "r") as f:      # through the registry
            assert f.read() == "text"
        print("OK")
        """)
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "OK"


def test_open_through_registry(tmp_path):
    tj.format(None, "regvol")                       # embedded under $TORCHJUICE_HOME
    with fsspec.open("juice://regvol/a/b.bin", "wb") as f:
        f.write(b"x" * 1000 + b"end")
    with fsspec.open("juice://regvol/a/b.bin", "rb") as f:
        assert f.size == 1003
        f.seek(1000)
        assert f.read() == b"end"
    assert fsspec.filesystem("juice").ls("regvol", detail=False) == ["regvol/a"]
    assert "regvol" in fsspec.filesystem("juice").ls("", detail=False)
    with tj.connect("regvol") as vol:
        assert vol.read_bytes("/a/b.bin") == b"x" * 1000 + b"end"


def test_open_through_env(tmp_path, monkeypatch):
    meta = f"sqlite3://{tmp_path}/env.db"
    tj.format(meta, "envvol", storage=f"file://{tmp_path}/envdata")
    monkeypatch.setenv("TORCHJUICE_HOME", str(tmp_path / "empty-home"))   # no registry
    with pytest.raises(tj.NotFormattedError):
        fsspec.open("juice://envvol/x", "wb").open()
    monkeypatch.setenv("TORCHJUICE_META", meta)
    with fsspec.open("juice://envvol/x", "wb") as f:
        f.write(b"via env")
    with fsspec.open("juice://envvol/x", "rb") as f:
        assert f.read() == b"via env"
    assert fsspec.filesystem("juice").ls("", detail=False) == ["envvol"]


def test_volume_name_mismatch(vol_meta, monkeypatch):
    with pytest.raises(tj.VolumeMismatchError) as ei:
        fsspec.open("juice://other/x", "wb", meta=vol_meta).open()
    assert "'other'" in str(ei.value) and "'vol'" in str(ei.value)
    monkeypatch.setenv("TORCHJUICE_META", vol_meta)
    with pytest.raises(tj.VolumeMismatchError) as ei:
        fsspec.filesystem("juice").cat_file("juice://nope/x")
    assert "'nope'" in str(ei.value) and "'vol'" in str(ei.value)


def test_bad_volume_name(jfs):
    with pytest.raises(tj.InvalidURLError):
        jfs.info("-bad-/x")


def test_pandas_parquet_round_trip(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    tj.format(None, "pqvol")
    df = pd.DataFrame({"a": range(1000), "b": [f"s{i}" for i in range(1000)]})
    df.to_parquet("juice://pqvol/tables/t.parquet")
    back = pd.read_parquet("juice://pqvol/tables/t.parquet")
    pd.testing.assert_frame_equal(back, df)
    # a partitioned dataset goes through pyarrow's FSSpecHandler (mkdir, ls, open)
    df["k"] = df["a"] % 3
    df.to_parquet("juice://pqvol/parts", partition_cols=["k"])
    back = pd.read_parquet("juice://pqvol/parts")
    assert len(back) == 1000 and sorted(back["a"]) == list(range(1000))
    with fsspec.open("juice://pqvol/t.csv", "w") as f:
        df.to_csv(f, index=False)
    assert pd.read_csv("juice://pqvol/t.csv")["a"].sum() == sum(range(1000))


def test_ls_detail_one_readdir(jfs, monkeypatch):
    jfs.pipe_file("vol/d/a.bin", b"12345")
    jfs.mkdir("vol/d/sub")
    jfs.touch("vol/d/empty")
    calls = []
    orig = tj.Volume.scandir
    monkeypatch.setattr(tj.Volume, "scandir", lambda self, p="/": calls.append(p) or orig(self, p))

    def no_stat(*a, **k):
        raise AssertionError("ls(detail=True) must not stat entries one by one")
    monkeypatch.setattr(tj.Volume, "getattr", no_stat)
    monkeypatch.setattr(tj.Volume, "stat", no_stat)
    out = jfs.ls("juice://vol/d/", detail=True)
    assert len(calls) == 1
    assert [(e["name"], e["type"], e["size"]) for e in out] == [
        ("vol/d/a.bin", "file", 5), ("vol/d/empty", "file", 0), ("vol/d/sub", "directory", 0)]
    assert all(isinstance(e["mtime"], float) and e["islink"] is False for e in out)
    assert jfs.ls("vol/d", detail=False) == ["vol/d/a.bin", "vol/d/empty", "vol/d/sub"]


def test_info_and_ls_errors(jfs):
    with pytest.raises(FileNotFoundError) as ei:
        jfs.info("vol/missing")
    assert ei.value.filename == "juice://vol/missing"
    with pytest.raises(FileNotFoundError):
        jfs.ls("vol/missing")
    with pytest.raises(FileNotFoundError):
        jfs.open("vol/missing", "rb")
    with pytest.raises(FileNotFoundError):
        jfs.cat_file("vol/missing")
    assert not jfs.exists("vol/missing") and not jfs.isdir("vol/missing")
    jfs.pipe_file("vol/f", b"x")
    assert jfs.ls("vol/f", detail=False) == ["vol/f"]          # a file lists as itself
    with pytest.raises(NotADirectoryError):
        jfs.info("vol/f/x")
    assert not jfs.exists("vol/f/x")
    jfs.makedirs("vol/d0")
    with pytest.raises(IsADirectoryError):
        jfs.open("vol/d0", "wb")
    with pytest.raises(FileExistsError):
        jfs.mkdir("vol/d0")
    jfs.pipe_file("vol/d0/x", b"1")
    with pytest.raises(OSError):
        jfs.rm("vol/d0")                                        # not empty, not recursive
    jfs.rm("vol/d0", recursive=True)
    assert not jfs.exists("vol/d0")


def test_info_root_and_volume(jfs):
    assert jfs.info("vol")["type"] == "directory" and jfs.info("vol")["name"] == "vol"
    assert jfs.info("juice://vol/")["name"] == "vol"
    assert jfs.info("")["type"] == "directory"
    assert jfs.isdir("juice://vol") and jfs.exists("vol")
    assert jfs.ls("", detail=False) == ["vol"]


def test_mv_directory_is_one_rename(jfs):
    jfs.pipe({"vol/src/a": b"a", "vol/src/sub/b": b"bb"})
    ino = jfs.info("vol/src")["ino"]
    jfs.mv("juice://vol/src", "juice://vol/dst", recursive=True)
    assert not jfs.exists("vol/src")
    assert jfs.info("vol/dst")["ino"] == ino
    assert jfs.cat_file("vol/dst/sub/b") == b"bb"
    # into an existing directory
    jfs.mkdir("vol/into")
    jfs.mv("vol/dst", "vol/into")
    assert jfs.info("vol/into/dst")["ino"] == ino
    # a file replaces a file atomically, a missing parent is created
    jfs.pipe_file("vol/f1", b"new")
    jfs.pipe_file("vol/f2", b"old")
    jfs.mv("vol/f1", "vol/f2")
    assert jfs.cat_file("vol/f2") == b"new" and not jfs.exists("vol/f1")
    jfs.mv("vol/f2", "vol/deep/er/f3")
    assert jfs.cat_file("vol/deep/er/f3") == b"new"
    with pytest.raises(FileNotFoundError):
        jfs.mv("vol/nothing", "vol/x")
    jfs.rename("vol/deep/er/f3", "vol/f4")                     # what torch DCP calls
    assert jfs.cat_file("vol/f4") == b"new"


def test_path_escape(jfs):
    with pytest.raises(PermissionError) as ei:
        jfs.info("vol/a/../../etc/passwd")
    assert isinstance(ei.value, tj.PathEscapeError)
    with pytest.raises(PermissionError):
        fsspec.open("juice://vol/../x", "wb", meta=jfs.meta).open()
    jfs.pipe_file("vol/a/../b", b"ok")                         # staying inside is fine
    assert jfs.cat_file("vol/b") == b"ok"
    assert jfs.info("vol/a/../b")["name"] == "vol/b"


def test_pipe_many_files_packs_them(jfs):
    import random
    rnd = random.Random(3)
    files = {f"vol/many/d{i % 3}/f{i}": rnd.randbytes(rnd.randint(1, 9000)) for i in range(60)}
    vol = tj.volume_for("vol", meta=jfs.meta)
    puts = vol.metrics()["put_count"]
    jfs.pipe({"juice://" + k: v for k, v in files.items()})
    assert 0 < vol.metrics()["put_count"] - puts < 10            # 60 files, a few objects
    assert jfs.cat(list(files)) == {k: v for k, v in files.items()}
    assert sorted(jfs.ls("vol/many", detail=False)) == [f"vol/many/d{i}" for i in range(3)]
    with pytest.raises(FileExistsError) as e:             # a directory where a file is: as os
        jfs.pipe({"vol/many/d0/f0/x": b"1", "vol/many/ok": b"2"})
    assert e.value.filename == "juice://vol/many/d0/f0"
    jfs.auto_mkdir = False
    with pytest.raises(NotADirectoryError) as e:
        jfs.pipe({"vol/many/d0/f0/x": b"1", "vol/many/ok": b"2"})
    assert e.value.filename == "juice://vol/many/d0/f0/x"


def test_cat_pipe_touch_cp(jfs):
    data = bytes(range(256)) * 1000
    jfs.pipe_file("vol/x", data)
    assert jfs.cat_file("vol/x") == data
    assert jfs.cat_file("vol/x", start=10, end=20) == data[10:20]
    assert jfs.cat_file("vol/x", start=-5) == data[-5:]
    assert jfs.cat_file("vol/x", start=5, end=-5) == data[5:-5]
    assert jfs.cat_file("vol/x", start=len(data) + 10) == b""
    assert jfs.read_block("vol/x", 100, 50) == data[100:150]
    assert jfs.head("vol/x", 3) == data[:3] and jfs.tail("vol/x", 3) == data[-3:]
    with pytest.raises(FileExistsError):
        jfs.pipe_file("vol/x", b"", mode="create")
    assert jfs.size("vol/x") == len(data)
    jfs.cp_file("vol/x", "vol/copy/y")
    assert jfs.cat_file("vol/copy/y") == data
    assert jfs.info("vol/copy/y")["ino"] != jfs.info("vol/x")["ino"]
    jfs.cp_file("vol/x", "vol/x")                              # the same file: untouched
    assert jfs.cat_file("vol/x") == data
    m = jfs.modified("vol/x")
    assert m.tzinfo is not None and jfs.created("vol/x").tzinfo is not None
    k = jfs.ukey("vol/x")
    jfs.touch("vol/x", truncate=False)
    assert jfs.size("vol/x") == len(data)
    jfs.touch("vol/x")
    assert jfs.size("vol/x") == 0 and jfs.ukey("vol/x") != k
    with jfs.open("vol/x", "ab") as f:
        f.write(b"12")
    with jfs.open("vol/x", "ab") as f:
        f.write(b"34")
    assert jfs.cat_file("vol/x") == b"1234"
    with jfs.open("vol/t.txt", "w") as f:
        f.write("héllo\nworld\n")
    assert jfs.read_text("vol/t.txt") == "héllo\nworld\n"
    with jfs.open("vol/t.txt", "r") as f:
        assert f.readlines() == ["héllo\n", "world\n"]


def test_volume_close_flushes_open_files(jfs):
    f = jfs.open("vol/unflushed", "wb")
    f.write(b"buffered bytes")
    tj.volume_for("vol", meta=jfs.meta).close()             # the next call reconnects
    assert f.closed
    assert jfs.cat_file("vol/unflushed") == b"buffered bytes"


def test_transaction(jfs):
    with jfs.transaction:
        with jfs.open("vol/tx/a", "wb") as f:
            f.write(b"committed")
        assert not jfs.exists("vol/tx/a")
    assert jfs.cat_file("vol/tx/a") == b"committed"
    with pytest.raises(RuntimeError):
        with jfs.transaction:
            with jfs.open("vol/tx/b", "wb") as f:
                f.write(b"lost")
            raise RuntimeError("boom")
    assert jfs.ls("vol/tx", detail=False) == ["vol/tx/a"]      # no temporary left behind


def test_pickle_and_instance_cache(jfs):
    again = pickle.loads(pickle.dumps(jfs))
    assert again is jfs or again == jfs
    assert fsspec.filesystem("juice", meta=jfs.meta) is jfs
    jfs.pipe_file("vol/p", b"1")
    assert again.cat_file("vol/p") == b"1"
    with jfs.open("vol/p", "rb") as f:
        assert f.path == "vol/p" and f.info()["size"] == 1


def _read_in_child(fs, path, q):
    q.put(fs.cat_file(path))


def test_fork_and_spawn_children(jfs):
    import multiprocessing as mp
    jfs.pipe_file("vol/shared", b"from parent")
    for method in ("fork", "spawn"):        # fork: a fresh connection; spawn: pickled fs
        ctx = mp.get_context(method)
        q = ctx.Queue()
        p = ctx.Process(target=_read_in_child, args=(jfs, "juice://vol/shared", q))
        p.start()
        assert q.get(timeout=120) == b"from parent"
        p.join(60)
        assert p.exitcode == 0


def test_mapper(jfs):
    m = fsspec.get_mapper("juice://vol/store", meta=jfs.meta)
    m["a/b"] = b"1"
    m["c"] = b"22"
    assert sorted(m) == ["a/b", "c"] and m["a/b"] == b"1"
    del m["a/b"]
    with pytest.raises(KeyError):
        m["a/b"]
    assert list(m) == ["c"]


def test_find_walk_glob_du(jfs):
    jfs.pipe({"vol/w/a": b"1", "vol/w/s/b": b"22", "vol/w/s/t/c": b"333"})
    assert jfs.find("vol/w") == ["vol/w/a", "vol/w/s/b", "vol/w/s/t/c"]
    assert jfs.glob("vol/w/**/c") == ["vol/w/s/t/c"]
    assert jfs.glob("juice://vol/w/*") == ["vol/w/a", "vol/w/s"]
    assert jfs.du("vol/w") == 6
    assert [r for r, _, _ in jfs.walk("vol/w")] == ["vol/w", "vol/w/s", "vol/w/s/t"]
    jfs.rm("vol/w/s/*", recursive=True)
    assert jfs.find("vol/w", withdirs=True) == ["vol/w", "vol/w/a", "vol/w/s"]


def test_symlinks(jfs):
    jfs.pipe_file("vol/real/f", b"abc")
    jfs.symlink("/real", "vol/ln")
    jfs.symlink("/real/f", "vol/lnf")
    jfs.symlink("/nowhere", "vol/dangling")
    info = {e["name"]: e for e in jfs.ls("vol")}
    assert info["vol/ln"]["type"] == "directory" and info["vol/ln"]["islink"]
    assert info["vol/lnf"]["type"] == "file" and info["vol/lnf"]["size"] == 3
    assert info["vol/dangling"]["type"] == "other"
    assert jfs.cat_file("vol/ln/f") == b"abc"
    jfs.rm("vol/ln", recursive=True)                             # the link, not the target
    assert jfs.cat_file("vol/real/f") == b"abc"


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_torch_distributed_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    tj.format(None, "ckvol")
    sd = {"w": torch.arange(1000, dtype=torch.float32), "b": torch.ones(3, 4)}
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
    ckpt = "juice://ckvol/ckpt/step-100"
    dcp.save(sd, checkpoint_id=ckpt)                           # picks FsspecWriter by itself
    out = {"w": torch.zeros(1000), "b": torch.zeros(3, 4)}
    dcp.load(out, checkpoint_id=ckpt)
    assert torch.equal(out["w"], sd["w"]) and torch.equal(out["b"], sd["b"])
    assert fsspec.filesystem("juice").exists(ckpt + "/.metadata")
    ckpt2 = "juice://ckvol/ckpt/step-200"
    dcp.save(sd, storage_writer=FsspecWriter(ckpt2, sync_files=False))
    out = {"w": torch.zeros(1000), "b": torch.zeros(3, 4)}
    dcp.load(out, storage_reader=FsspecReader(ckpt2))
    assert torch.equal(out["w"], sd["w"])


def test_round_trip_every_engine(meta_url, tmp_path):
    tj.format(meta_url, "engvol", storage=f"file://{tmp_path}/data")
    try:
        fs = JuiceFileSystem(meta=meta_url, skip_instance_cache=True)
        fs.pipe_file("engvol/a/b", b"payload" * 1000)
        assert fs.cat_file("juice://engvol/a/b", start=7, end=14) == b"payload"
        assert fs.ls("engvol/a", detail=False) == ["engvol/a/b"]
        fs.mv("engvol/a", "engvol/c", recursive=True)
        assert fs.info("engvol/c/b")["size"] == 7000
        fs.rm("engvol/c", recursive=True)
        assert fs.ls("engvol", detail=False) == []
    finally:
        tj.volume_for("engvol", meta=meta_url).close()
