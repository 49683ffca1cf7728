"""Operations and integrity: trash, compaction, gc, fsck, dump/load, sessions, faults, stats.

Crash tests kill real processes with SIGKILL; concurrency tests run several clients (threads,
processes) on one volume; the stateful test drives three clients with random operations against a
model of the tree while compaction and gc run. Engines: SQLite and Redis.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, invariant, rule,
                                 run_state_machine_as_test)

import torchjuice as tj
from conftest import make_meta_url
from servers import RedisServer, free_port
from torchjuice.cli.main import main as cli
from torchjuice.meta import CHUNK_SIZE, ROOT_INODE, TRASH_INODE, new_meta
from torchjuice.meta import base as meta_base
from torchjuice.object import create_store
from torchjuice.object.fault import FaultyStore, InjectedConnectionError, InjectedThrottle
from torchjuice.ops.fsck import XATTR, fsck
from torchjuice.ops.gc import gc, parse_block_key

KiB, MiB = 1 << 10, 1 << 20
ENGINES = ["sqlite", "redis"]


def pattern(n: int, seed: int = 0) -> bytes:
    """Deterministic bytes that differ from block to block."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(b"%d:%d" % (seed, i)).digest() * 64
        i += 1
    return bytes(out[:n])


def make_volume(request, tmp_path, engine="sqlite", name="ops", faulty=False, connect=True,
                **fmt):
    """Format a volume (64 KiB blocks unless told); return (volume or None, meta URL[, store])."""
    url = (f"sqlite3://{tmp_path}/{name}.db" if engine == "sqlite" else
           make_meta_url(engine, request, tmp_path))
    fmt.setdefault("block_size", 64 * KiB)
    tj.format(url, name, storage=f"file://{tmp_path}/bucket-{name}", **fmt)
    if not connect:
        return None, url
    if faulty:
        meta = new_meta(url)
        f = meta.load()
        store = FaultyStore(create_store(f.storage))
        vol = tj.Volume(meta, f, store)
        request.addfinalizer(vol.close)
        return vol, url, store
    vol = tj.connect(url)
    request.addfinalizer(vol.close)
    return vol, url


def store_keys(vol) -> set[str]:
    return {o.key for o in vol.store.list(vol.chunks.prefix)}


def live_keys(vol) -> set[str]:
    """Every block a file in the namespace (the trash included) refers to, found by walking the
    tree through the public API, plus the slices compaction keeps for a while."""
    keys = set()
    todo = ["/", "/.trash"]
    while todo:
        d = todo.pop()
        for name, a in vol.scandir(d):
            p = f"{d.rstrip('/')}/{name}"
            if a.is_dir:
                todo.append(p)
            elif a.is_file:
                for index in range((a.length + CHUNK_SIZE - 1) // CHUNK_SIZE):
                    for s in vol.meta.read_chunk(a.inode, index):
                        if s.id:
                            keys.update(k for k, _ in vol.chunks.blocks(s.id, s.size))
    for sid, size in vol.meta.list_delayed_slices():
        keys.update(k for k, _ in vol.chunks.blocks(sid, size))
    return keys


def wait_for(cond, timeout=20.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# -- trash -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_trash_keeps_removed_and_replaced_files_until_restored_or_expired(request, tmp_path,
                                                                        engine):
    vol, _ = make_volume(request, tmp_path, engine)
    vol.makedirs("/d")
    vol.write_bytes("/d/a", pattern(200 * KiB, 1))
    vol.write_bytes("/d/b", b"old b")
    vol.write_bytes("/d/c", b"new c")
    n_blocks = len(store_keys(vol))
    ino_a = vol.stat("/d/a").st_ino
    vol.remove("/d/a")
    vol.rename("/d/c", "/d/b")                           # replaces b: b goes to the trash
    assert vol.listdir("/d") == ["b"] and vol.read_bytes("/d/b") == b"new c"
    assert vol.listdir("/") == ["d"]                     # .trash is not listed in the root
    assert vol.isdir("/.trash") and vol.exists("/.trash")
    items = vol.trash_list()
    assert [(e["name"], e["original"]) for e in items] == [("a", "/d/a"), ("b", "/d/b")]
    assert items[0]["inode"] == ino_a and items[0]["size"] == 200 * KiB
    assert vol.read_bytes(items[0]["path"]) == pattern(200 * KiB, 1)    # readable in place
    hour = items[0]["path"].split("/")[2]
    assert vol.listdir("/.trash") == [hour]
    assert len(store_keys(vol)) == n_blocks              # nothing deleted yet
    assert vol.meta.check() == []
    # nothing can be created or moved into the trash
    for bad in (lambda: vol.write_bytes(f"/.trash/{hour}/x", b""),
                lambda: vol.mkdir("/.trash"),                      # the name is taken
                lambda: vol.rename("/d/b", "/.trash"),
                lambda: vol.mkdir("/.trash/x"),
                lambda: vol.rename("/d/b", f"/.trash/{hour}/y"),
                lambda: vol.link("/d/b", f"/.trash/{hour}/z")):
        with pytest.raises(PermissionError):
            bad()
    # restore: to where it was (its name is free again), then the other one elsewhere
    assert vol.trash_restore(items[0]["path"]) == "/d/a"
    assert vol.read_bytes("/d/a") == pattern(200 * KiB, 1)
    with pytest.raises(FileExistsError):
        vol.trash_restore(items[1]["path"])              # /d/b is taken by the new file
    assert vol.trash_restore(items[1]["path"], "/b-old") == "/b-old"
    assert vol.read_bytes("/b-old") == b"old b" and vol.trash_list() == []
    assert vol.meta.check() == []
    # hard links: removing one of two names trashes nothing; truncation never trashes
    vol.link("/d/a", "/d/a2")
    vol.remove("/d/a")
    assert vol.trash_list() == [] and vol.read_bytes("/d/a2") == pattern(200 * KiB, 1)
    vol.write_bytes("/d/a2", b"short")                    # open(..., "wb"): data freed at once
    assert vol.trash_list() == []
    assert len(store_keys(vol)) == len(live_keys(vol))
    # a file removed inside the trash is freed for good; expiry frees the rest
    vol.write_bytes("/e", pattern(100 * KiB, 2))
    vol.write_bytes("/f", pattern(100 * KiB, 3))
    vol.remove("/e")
    vol.remove("/f")
    e, f = vol.trash_list()
    vol.remove(e["path"])
    assert [x["name"] for x in vol.trash_list()] == ["f"]
    assert vol.meta.cleanup_trash() == 0                 # one day has not passed
    assert vol.meta.cleanup_trash(now=time.time() + 86400 + 3600) == 1
    assert vol.trash_list() == [] and vol.listdir("/.trash") == []
    assert store_keys(vol) == live_keys(vol)
    assert vol.meta.check() == []


def test_trash_days_zero_frees_at_once_and_trash_survives_dump(request, tmp_path):
    vol, _ = make_volume(request, tmp_path, trash_days=0)
    vol.write_bytes("/a", pattern(100 * KiB))
    vol.remove("/a")
    assert store_keys(vol) == set() and vol.trash_list() == []
    vol2, _ = make_volume(request, tmp_path, name="two")
    vol2.write_bytes("/a", pattern(100 * KiB))
    vol2.remove("/a")
    data = vol2.meta.dump()
    copy = new_meta(f"sqlite3://{tmp_path}/copy.db")
    copy.load_dump(data)
    assert copy.check() == [] and copy.dump() == data
    assert [n for n, _ in copy.readdir(copy.resolve("/.trash/" + vol2.listdir("/.trash")[0])
                                       .inode)][0].endswith("-a")
    copy.close()


def test_trash_expires_in_the_background_once_across_clients(request, tmp_path, monkeypatch):
    _, url = make_volume(request, tmp_path, connect=False)
    a = tj.connect(url, stats_interval=0.05)
    b = tj.connect(url, stats_interval=0.05)
    request.addfinalizer(a.close)
    request.addfinalizer(b.close)
    a.write_bytes("/old", pattern(100 * KiB, 1))
    a.write_bytes("/new", pattern(100 * KiB, 2))
    orig = meta_base.BaseMeta._trash_reads
    with monkeypatch.context() as m:                     # removed two days ago
        m.setattr(meta_base.BaseMeta, "_trash_reads",
                  staticmethod(lambda tx, now: orig(tx, now - 2 * 86400)))
        a.remove("/old")
    a.remove("/new")
    runs = []
    for v in (a, b):
        orig = v.meta.cleanup_trash
        v.meta.cleanup_trash = lambda *x, _o=orig, **k: runs.append(1) or _o(*x, **k)
        v.meta.cleanup_interval = 0.5
    t0 = time.time()
    # expired: the file freed and its hour directory removed (the cleanup's last step)
    wait_for(lambda: [e["name"] for e in a.trash_list()] == ["new"] and
             len(a.listdir("/.trash")) == 1, what="trash expiry")
    assert len(store_keys(a)) == 2 and store_keys(a) == live_keys(a)   # /new's 2 blocks stay
    time.sleep(1.5)
    # each client tries every 0.5 s; the lease lets one of them run it per interval
    assert 1 <= len(runs) <= (time.time() - t0) / 0.5 + 1
    assert a.meta.check() == []


def test_trash_list_skips_an_hour_directory_removed_meanwhile(request, tmp_path, monkeypatch):
    vol, _ = make_volume(request, tmp_path)
    vol.write_bytes("/a", b"x")
    vol.remove("/a")
    assert [e["name"] for e in vol.trash_list()] == ["a"]
    real = vol.meta.readdir

    def racing(inode, *args, **kwargs):     # another client's cleanup emptied and removed it
        if inode != TRASH_INODE:
            raise FileNotFoundError(errno.ENOENT, "gone", f"inode {inode}")
        return real(inode, *args, **kwargs)
    monkeypatch.setattr(vol.meta, "readdir", racing)
    assert vol.trash_list() == []


def test_lease_is_taken_by_one_client_per_interval(request, tmp_path):
    _, url = make_volume(request, tmp_path, connect=False)
    metas = [new_meta(url) for _ in range(4)]
    barrier = threading.Barrier(4)
    got = []

    def take(m):
        barrier.wait()
        got.append(m.try_lease("job", 0.5))
    threads = [threading.Thread(target=take, args=(m,)) for m in metas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == [False, False, False, True]
    assert not metas[0].try_lease("job", 0.5)
    time.sleep(0.6)
    assert metas[1].try_lease("job", 0.5)
    for m in metas:
        m.close()


# -- sessions ----------------------------------------------------------------------------------------
_HOLDER = r"""
import sys, time
import torchjuice as tj
vol = tj.connect(sys.argv[1])
vol.write_bytes("/held", bytes(range(256)) * 1024)
f = vol.open("/held", "rb")
vol.remove("/held")
print(vol.meta.sid, flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("engine", ENGINES)
def test_dead_client_is_cleaned_up_by_a_live_one(request, tmp_path, engine):
    _, url = make_volume(request, tmp_path, engine, trash_days=0)
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, url], stdout=subprocess.PIPE, text=True)
    try:
        dead_sid = int(p.stdout.readline())
    finally:
        p.kill()
        p.wait()
    vol = tj.connect(url, stats_interval=0.05)
    request.addfinalizer(vol.close)
    assert len(store_keys(vol)) == 4                     # kept for the dead client's handle
    assert dead_sid in [s["sid"] for s in vol.meta.list_sessions()]
    vol.meta.session_timeout = 1.0
    vol.meta.cleanup_interval = 0.2
    wait_for(lambda: not store_keys(vol), what="the dead client's file to be freed")
    sids = [s["sid"] for s in vol.meta.list_sessions()]
    assert dead_sid not in sids and vol.meta.sid in sids
    assert vol.meta.check() == []


# -- compaction --------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_compaction_keeps_content_and_frees_old_blocks_only_later(request, tmp_path, engine):
    vol, _ = make_volume(request, tmp_path, engine)
    vol.meta.compact_threshold = 8
    want = b""
    for i in range(40):                                  # small appends: one slice each
        rec = pattern(3000 + i, i)
        with vol.open("/log", "ab") as f:
            f.write(rec)
        want += rec
    assert vol.compactor.wait_idle(30)
    ino = vol.stat("/log").st_ino
    assert vol.metrics()["compactions"] >= 1
    assert len(vol.meta.read_chunk(ino, 0)) < 8
    assert vol.read_bytes("/log") == want
    # random overwrites and a hole, then compaction on demand
    vol.meta.compact_threshold = 1000
    with vol.open("/log", "r+b") as f:
        for i in range(6):
            off = (i * 37_001) % len(want)
            f.seek(off)
            piece = pattern(500, 100 + i)
            f.write(piece)
            f.flush()
            want = want[:off] + piece + want[off + len(piece):]
    with vol.open("/sparse", "wb") as f:
        f.write(b"head")
        f.seek(20 * MiB)
        f.write(b"tail")
    with vol.open("/sparse", "r+b") as f:
        f.write(b"HE")
    old = vol.meta.read_chunk(ino, 0)
    before = store_keys(vol)
    r = vol.compact("/")
    assert r["compacted"] >= 2 and r["conflicts"] == 0
    assert [(s.pos, s.off, s.len) for s in vol.meta.read_chunk(ino, 0)] == [(0, 0, len(want))]
    assert vol.read_bytes("/log") == want
    sparse = vol.meta.read_chunk(vol.stat("/sparse").st_ino, 0)
    assert len(sparse) == 2                              # the 20 MiB hole stays a hole
    assert vol.read_bytes("/sparse") == b"HEad" + bytes(20 * MiB - 4) + b"tail"
    assert sum(o.size for o in vol.store.list(vol.chunks.prefix)) < 4 * MiB
    # the replaced slices are still there (a reader may hold them); gc counts them as live
    assert before <= store_keys(vol)
    assert {s.id for s in old} <= {sid for sid, _ in vol.meta.list_delayed_slices()}
    assert gc(vol, min_age=0).leaked == []
    assert vol.meta.cleanup_delayed_slices() == 0        # not old enough
    assert vol.meta.cleanup_delayed_slices(older_than=0) > 0
    assert vol.meta.list_delayed_slices() == []
    assert store_keys(vol) == live_keys(vol)
    assert vol.read_bytes("/log") == want and vol.meta.check() == []
    assert fsck(vol).ok


@pytest.mark.parametrize("engine", ENGINES)
def test_compaction_aborts_when_the_chunk_changes_meanwhile(request, tmp_path, engine):
    from torchjuice.ops.compact import compact_chunk
    vol, url = make_volume(request, tmp_path, engine)
    other = tj.connect(url)
    request.addfinalizer(other.close)
    for i in range(5):
        with vol.open("/f", "ab") as f:
            f.write(pattern(10_000, i))
    want = vol.read_bytes("/f")
    ino = vol.stat("/f").st_ino
    keys = store_keys(vol)
    put = vol.chunks.put_block
    raced = []

    def racing_put(*args):
        if not raced:                                    # another client appends meanwhile
            raced.append(1)
            with other.open("/f", "ab") as f:
                f.write(b"late")
        return put(*args)
    vol.chunks.put_block = racing_put
    assert compact_chunk(vol.meta, vol.chunks, ino, 0) is False
    vol.chunks.put_block = put
    assert len(vol.meta.read_chunk(ino, 0)) == 6         # untouched, the late slice included
    assert vol.read_bytes("/f") == want + b"late"
    assert store_keys(vol) == keys | live_keys(other)    # the new slice's blocks are gone
    assert store_keys(vol) == live_keys(vol)
    assert compact_chunk(vol.meta, vol.chunks, ino, 0) is True
    assert vol.read_bytes("/f") == want + b"late"
    assert len(vol.meta.read_chunk(ino, 0)) == 1


# -- gc and fsck ----------------------------------------------------------------------------------
def test_gc_lists_and_deletes_only_unreferenced_objects(request, tmp_path, capsys):
    vol, url = make_volume(request, tmp_path)
    vol.write_bytes("/keep", pattern(300 * KiB, 1))
    vol.write_bytes("/trashed", pattern(100 * KiB, 2))
    vol.remove("/trashed")                               # its blocks are references too
    live = store_keys(vol)
    leaked_sid = vol.meta.new_slice_id()                 # a writer that died before its commit
    for i in range(3):
        vol.chunks.put_block(leaked_sid, i, pattern(64 * KiB, 10 + i)).result()
    vol.store.put(f"{vol.chunks.prefix}not-a-block", b"x")
    leaked = store_keys(vol) - live - {f"{vol.chunks.prefix}not-a-block"}
    assert len(leaked) == 3
    assert {parse_block_key(k[len(vol.chunks.prefix):])[0] for k in leaked} == {leaked_sid}
    r = gc(vol)                                          # default safety window: 1 hour
    assert r.leaked == [] and {o.key for o in r.young} == leaked and r.live == len(live)
    assert r.unknown == [f"{vol.chunks.prefix}not-a-block"] and r.missing == 0
    r = gc(vol, min_age=0)
    assert {o.key for o in r.leaked} == leaked and r.deleted == 0
    assert cli(["gc", url, "--delete", "--min-age", "0s", "-q"]) == 0
    out = capsys.readouterr().out
    assert "leaked and older than the safety window: 3" in out and "deleted 3" in out
    assert store_keys(vol) == live | {f"{vol.chunks.prefix}not-a-block"}
    assert vol.read_bytes("/keep") == pattern(300 * KiB, 1)
    assert cli(["fsck", url, "-q"]) == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_fsck_finds_missing_and_corrupt_blocks_and_repairs_the_namespace(request, tmp_path,
                                                                        engine, capsys):
    vol, url = make_volume(request, tmp_path, engine, compression="lz4")
    vol.makedirs("/d")
    vol.write_bytes("/d/ok", pattern(200 * KiB, 1))
    vol.write_bytes("/d/missing", pattern(200 * KiB, 2))
    vol.write_bytes("/d/corrupt", b"compressible " * 20_000)
    vol.write_bytes("/gone", pattern(10 * KiB, 3))
    vol.remove("/gone")                                  # in the trash: checked too
    assert fsck(vol, verify=True).ok
    info = vol.info("/d/missing")
    vol.store.delete(info["chunks"][0]["slices"][0]["objects"][1])
    bad = vol.info("/d/corrupt")["chunks"][0]["slices"][0]["objects"][0]
    vol.store.put(bad, vol.store.get(bad)[:-20])         # a cut-short block
    trashed = vol.trash_list()[0]
    vol.store.delete(vol.info(trashed["path"])["chunks"][0]["slices"][0]["objects"][0])
    # namespace damage: a dangling entry, a wrong nlink, a wrong counter
    d = vol.stat("/d").st_ino
    ok = vol.stat("/d/ok").st_ino

    def damage(tx):
        tx.hset(f"d{d}", b"dangling", meta_base.pack_entry(1, 999_999))
        a = meta_base.unpack_attr(ok, tx.get(f"i{ok}"))
        a.nlink = 3
        tx.set(f"i{ok}", meta_base.pack_attr(a))
        tx.incrby("totalInodes", 5)
    vol.meta.txn(damage)
    r = fsck(vol)
    assert set(r.broken) == {"/d/missing", trashed["path"]} and len(r.problems) == 3
    r = fsck(vol, verify=True)
    assert set(r.broken) == {"/d/missing", "/d/corrupt", trashed["path"]}
    assert any("missing" in b for b in r.broken["/d/missing"])
    assert cli(["fsck", url, "-q"]) == 1
    assert "broken file /d/missing" in capsys.readouterr().out
    r = fsck(vol, repair=True, verify=True)
    assert r.problems == [] and len(r.repaired) >= 4 and not r.ok     # lost data stays lost
    assert json.loads(vol.getxattr("/d/missing", XATTR))[0].endswith("missing")
    assert vol.listdir("/d") == ["corrupt", "missing", "ok"]
    assert vol.stat("/d/ok").st_nlink == 1 and vol.meta.check() == []
    assert vol.read_bytes("/d/ok") == pattern(200 * KiB, 1)
    with pytest.raises(OSError):
        vol.read_bytes("/d/missing")
    vol.remove("/d/missing")
    vol.remove("/d/corrupt")
    vol.trash_empty()
    assert fsck(vol, verify=True).ok
    assert cli(["fsck", url, "--verify", "-q"]) == 0


def test_fsck_links_orphans_into_lost_found(request, tmp_path):
    vol, _ = make_volume(request, tmp_path)
    vol.makedirs("/d/sub")
    vol.write_bytes("/d/sub/f", b"orphan data")
    d = vol.stat("/d").st_ino
    vol.meta.txn(lambda tx: tx.hdel(f"d{ROOT_INODE}", b"d"))   # lose the entry of /d
    problems = vol.meta.check()
    assert any("orphaned" in p for p in problems)
    r = fsck(vol, repair=True)
    assert r.ok, r.summary()
    assert vol.read_bytes(f"/lost+found/{d}/sub/f") == b"orphan data"


# -- dump / load -------------------------------------------------------------------------------------
def _bulk_volume(vol, n: int) -> dict[str, bytes]:
    """``n`` tiny files in 10 directories, built fast: blocks uploaded in parallel, metadata
    written through ``load_dump`` (the normal API makes the rest)."""
    m = vol.meta
    data = m.dump()
    nodes = data["inodes"]
    nxt = data["counters"]["nextInode"] + 1           # above every batch handed out
    sid0 = data["counters"]["nextSlice"] + 1
    files = {}
    dirs = []
    root = nodes["1"]
    for k in range(10):
        ino = nxt
        nxt += 1
        nodes[str(ino)] = dict(root, parent=1, nlink=2, entries={})
        root["entries"][f"bulk{k}"] = ino
        root["nlink"] += 1
        dirs.append(ino)
    futures = []
    for i in range(n):
        body = b"file %d " % i + bytes([i % 251]) * (i % 40)
        sid = sid0 + 1 + i
        futures.append(vol.chunks.put_block(sid, 0, body))
        ino = nxt
        nxt += 1
        d = dirs[i % 10]
        nodes[str(ino)] = dict(nodes["1"], typ=1, mode=0o644, nlink=1, length=len(body),
                               parent=d, chunks={"0": [[0, sid, len(body), 0, len(body)]]})
        del nodes[str(ino)]["entries"]
        nodes[str(d)]["entries"][f"f{i}"] = ino
        files[f"/bulk{i % 10}/f{i}"] = body
    for f in futures:
        f.result()
    data["counters"].update(nextInode=nxt + 100, nextSlice=sid0 + n + 1000)
    data["counters"]["totalInodes"] = len(nodes)
    data["counters"]["usedSpace"] = sum(meta_base.align4k(x["length"]) for x in nodes.values())
    m.load_dump(data, force=True)
    return files


def test_dump_10000_files_from_sqlite_load_into_redis_and_back(request, tmp_path, capsys):
    vol, url = make_volume(request, tmp_path, name="big")
    vol.makedirs("/x/y")
    vol.write_bytes("/x/y/real", pattern(300 * KiB, 1))
    vol.symlink("y/real", "/x/ln")
    vol.link("/x/y/real", "/x/hard")
    vol.setxattr("/x/y/real", "user.k", b"\x00\xff")
    vol.write_bytes("/trashed", b"in the trash")
    vol.remove("/trashed")
    files = _bulk_volume(vol, 10_000)
    files["/x/y/real"] = files["/x/hard"] = files["/x/ln"] = pattern(300 * KiB, 1)
    assert vol.meta.check() == []
    dump = tmp_path / "meta.json"
    t = time.time()
    assert cli(["dump", url, str(dump), "-q"]) == 0
    assert time.time() - t < 30
    redis_url = request.getfixturevalue("redis_server").url()
    assert cli(["load", redis_url, str(dump), "-q"]) == 0
    assert tj.volume.find_meta_url("big") == redis_url   # the name now points at Redis
    vol.close()
    other = tj.connect("big")
    request.addfinalizer(other.close)
    assert other.meta.check() == []
    assert other.getxattr("/x/hard", "user.k") == b"\x00\xff"
    assert [e["name"] for e in other.trash_list()] == ["trashed"]
    paths = sorted(files)
    errors = []

    def read_all(part):
        for p in part:
            if other.read_bytes(p) != files[p]:
                errors.append(p)
    threads = [threading.Thread(target=read_all, args=(paths[k::4],)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == [] and len(paths) == 10_003
    # and back into a fresh SQLite: the same metadata
    back = tmp_path / "back.json"
    assert cli(["dump", redis_url, str(back), "-q"]) == 0
    assert cli(["load", f"sqlite3://{tmp_path}/back.db", str(back), "-q"]) == 0
    again = new_meta(f"sqlite3://{tmp_path}/back.db")
    got, want = again.dump(), json.loads(dump.read_text())
    again.close()
    assert got["inodes"] == want["inodes"] and got["setting"] == want["setting"]
    got["counters"].pop("nextSession")                   # the Redis client had a session
    want["counters"].pop("nextSession")
    assert got["counters"] == want["counters"]
    # a non-empty engine is refused unless --force
    assert cli(["load", redis_url, str(dump), "-q"]) == 1
    assert "already holds volume 'big'" in capsys.readouterr().err
    assert cli(["load", redis_url, str(dump), "--force", "-q"]) == 0


# -- faults ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_transient_store_errors_are_retried_persistent_ones_raise(request, tmp_path, engine):
    vol, _, store = make_volume(request, tmp_path, engine, faulty=True)
    data = pattern(300 * KiB, 1)
    store.fail_next(2, op="put")
    store.fail_next(1, op="put", exc=InjectedThrottle)
    vol.write_bytes("/a", data)
    store.fail_next(2, op="get", exc=InjectedConnectionError)
    assert vol.read_bytes("/a") == data
    assert vol.metrics()["store_retries"] >= 5
    # a missing block is not retried with backoff: the read refreshes the file's slice list
    # once (a compaction may have replaced the block) and then fails
    key = vol.info("/a")["chunks"][0]["slices"][0]["objects"][2]
    body = vol.store.get(key)
    vol.store.delete(key)
    gets = store.calls["get"]
    with pytest.raises(FileNotFoundError):
        vol.read_bytes("/a")
    assert store.calls["get"] - gets <= 2 * 3
    vol.store.put(key, body)
    # persistent failure: the write raises, nothing is committed, the old content stays
    landed = []
    put = store.inner.put
    lock = threading.Lock()

    def flaky_put(k, d):                                 # two blocks land, then the store dies
        with lock:
            if len(landed) >= 2:
                raise InjectedConnectionError(errno.ECONNRESET, "store gone")
            landed.append(k)
        put(k, d)
    store.inner.put = flaky_put
    f = vol.open("/a", "ab")
    f.write(pattern(500 * KiB, 2))
    with pytest.raises(ConnectionError):
        f.close()
    # uploads the failed close did not wait for may still be retrying: let them end first
    wait_for(lambda: vol.chunks._inflight == 0, what="uploads to end")
    store.inner.put = put
    assert vol.read_bytes("/a") == data and vol.stat("/a").st_size == len(data)
    r = gc(vol, min_age=0)                               # only the blocks that landed leaked
    assert {o.key for o in r.leaked} == set(landed) and len(landed) == 2
    assert fsck(vol).ok and vol.meta.check() == []


def test_redis_restart_mid_workload_fails_cleanly_then_resumes(request, tmp_path):
    try:
        srv = RedisServer()
    except Exception as e:                               # no redis-server: as the fixture does
        if os.environ.get("TORCHJUICE_REQUIRE_SERVERS") == "1":
            raise
        pytest.skip(str(e))
    request.addfinalizer(srv.stop)
    url = srv.url()
    tj.format(url, "rr", storage=f"file://{tmp_path}/bucket", block_size=64 * KiB)
    vol = tj.connect(url, stats_interval=0.1)
    request.addfinalizer(vol.close)
    vol.write_bytes("/before", pattern(100 * KiB, 1))
    stop = threading.Event()
    ok, errors = [], []

    def work():
        i = 0
        while not stop.is_set():
            try:
                vol.write_bytes(f"/w{i % 20}", pattern(20 * KiB, i))
                assert vol.read_bytes("/before") == pattern(100 * KiB, 1)
                ok.append(i)
            except Exception as e:
                errors.append(e)
                time.sleep(0.01)
            i += 1
    t = threading.Thread(target=work)
    t.start()
    wait_for(lambda: len(ok) > 5, what="the workload to start")
    srv.shutdown()
    n_ok = len(ok)
    wait_for(lambda: len(errors) > 3, what="errors while Redis is down")
    with pytest.raises(ConnectionError):
        vol.stat("/before")
    srv.start()
    wait_for(lambda: len(ok) > n_ok + 5, what="the workload to resume")
    stop.set()
    t.join(30)
    assert errors and all(isinstance(e, ConnectionError) for e in errors), \
        {type(e).__name__ for e in errors}
    assert vol.read_bytes("/before") == pattern(100 * KiB, 1)
    assert vol.meta.check() == []
    r = fsck(vol)
    assert not r.broken and not r.problems
    wait_for(lambda: vol.meta.sid in [s["sid"] for s in vol.meta.list_sessions()],
             what="the heartbeat to come back")


# -- crashes -----------------------------------------------------------------------------------------
_WRITER = r"""
import os, sys
import torchjuice as tj
from torchjuice.meta import new_meta
from torchjuice.object import create_store
from torchjuice.object.fault import FaultyStore
url = sys.argv[1]
meta = new_meta(url)
fmt = meta.load()
vol = tj.Volume(meta, fmt, FaultyStore(create_store(fmt.storage), delay=0.01, fail_ops=["put"]),
                upload_threads=2)
for i in range(1000):
    path = f"/w/{i}"
    with vol.open(path, "wb") as f:
        for j in range(16):
            f.write(bytes([i % 256, j]) * 32768)
    print(path, flush=True)
"""


def test_sigkill_mid_write_leaks_only_unreferenced_objects(request, tmp_path):
    vol, url = make_volume(request, tmp_path)
    vol.makedirs("/w")
    p = subprocess.Popen([sys.executable, "-c", _WRITER, url], stdout=subprocess.PIPE, text=True)
    try:
        done = [p.stdout.readline().strip() for _ in range(2)]
        # kill it while a file is half uploaded (some of its 16 blocks landed, so it cannot be
        # committed): freeze it, look, and let it go on until that is the case
        for _ in range(500):
            p.send_signal(signal.SIGSTOP)
            time.sleep(0.02)
            if len(store_keys(vol)) % 16:
                break
            p.send_signal(signal.SIGCONT)
            time.sleep(random.uniform(0.001, 0.02))
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    done += [line.strip() for line in p.stdout.read().splitlines()]
    committed = {f"/w/{n}" for n in vol.listdir("/w") if vol.stat(f"/w/{n}").st_size}
    assert set(done) <= committed
    live = live_keys(vol)
    leaked = store_keys(vol) - live
    assert leaked                                        # the file being written when killed
    r = gc(vol, min_age=0)
    assert {o.key for o in r.leaked} == leaked and r.missing == 0
    assert fsck(vol).ok
    gc(vol, delete=True, min_age=0)
    assert store_keys(vol) == live
    for path in committed:
        i = int(path.rsplit("/", 1)[1])
        assert vol.read_bytes(path) == b"".join(bytes([i % 256, j]) * 32768 for j in range(16))
    assert fsck(vol, verify=True).ok


_DRIVER = r"""
import os, random, signal, sys, time
import torchjuice as tj
from torchjuice.meta import new_meta
from torchjuice.object import create_store
from torchjuice.object.fault import FaultyStore
url, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def child(k):
    rng = random.Random(seed * 1000 + k)
    meta = new_meta(url)
    fmt = meta.load()
    vol = tj.Volume(meta, fmt, FaultyStore(create_store(fmt.storage), delay=0.003,
                                           fail_ops=["put"]), upload_threads=2)
    i = 0
    while True:
        path = f"/k/{k}-{i}"
        with vol.open(path, "wb") as f:
            for _ in range(rng.randrange(1, 10)):
                f.write(os.urandom(rng.randrange(1, 80_000)))
        r = rng.random()
        if r < 0.25:
            vol.remove(path)
        elif r < 0.5 and i:
            vol.rename(path, f"/k/{k}-0")
        i += 1

rng = random.Random(seed)
pids = []
for k in range(n):
    pid = os.fork()
    if pid == 0:
        try:
            child(k)
        finally:
            os._exit(1)
    pids.append(pid)
start = time.time()
for pid, t in sorted(zip(pids, [rng.uniform(0.5, 3.0) for _ in pids]), key=lambda x: x[1]):
    time.sleep(max(0.0, start + t - time.time()))
    os.kill(pid, signal.SIGKILL)
for pid in pids:
    os.waitpid(pid, 0)
print("killed", len(pids))
"""


def test_gc_after_20_killed_writers_removes_every_leak_and_nothing_live(request, tmp_path):
    vol, url = make_volume(request, tmp_path)
    vol.makedirs("/k")
    out = subprocess.run([sys.executable, "-c", _DRIVER, url, "20", "7"], capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.strip() == "killed 20", out.stderr
    assert vol.meta.check() == []
    live = live_keys(vol)
    assert live
    leaked = store_keys(vol) - live
    assert leaked                                        # writers died mid-upload
    r = gc(vol, delete=True, min_age=0)
    assert {o.key for o in r.leaked} == leaked and r.missing == 0
    assert store_keys(vol) == live
    bucket = tmp_path / "bucket-ops"
    assert not [f for _d, _s, fs in os.walk(bucket) for f in fs if f.startswith(".tjtmp.")]
    n = 0
    todo = ["/k", "/.trash"]
    while todo:                                          # every byte of every file is there
        d = todo.pop()
        for name, a in vol.scandir(d):
            if a.is_dir:
                todo.append(f"{d}/{name}")
            else:
                assert len(vol.read_bytes(f"{d}/{name}")) == a.length
                n += 1
    assert n > 0
    assert fsck(vol).ok


# -- concurrency -------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_clients_racing_with_compaction_and_gc(request, tmp_path, engine):
    _, url = make_volume(request, tmp_path, engine, connect=False)
    vols = [tj.connect(url) for _ in range(3)]
    for v in vols:
        request.addfinalizer(v.close)
        v.meta.compact_threshold = 4
    vols[0].makedirs("/shared")
    want: dict[str, bytes] = {}
    lock = threading.Lock()

    def client(k):
        v = vols[k]
        rng = random.Random(k)
        mine = b""
        for i in range(25):
            rec = pattern(rng.randrange(100, 20_000), k * 100 + i)
            with v.open(f"/log{k}", "ab") as f:            # many small appends: compaction
                f.write(rec)
            mine += rec
            name = f"/shared/n{rng.randrange(6)}"
            body = pattern(rng.randrange(1, 70_000), 1000 * k + i)
            tmp = f"/shared/.tmp{k}-{i}"
            v.write_bytes(tmp, body)
            v.rename(tmp, name)                             # atomic replace: one wins
            if i % 7 == 3:
                v.compact(f"/log{k}")
        with lock:
            want[f"/log{k}"] = mine

    threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for v in vols:
        assert v.compactor.wait_idle(30)
    for path, body in want.items():
        for v in vols:
            assert v.read_bytes(path) == body
    shared = vols[1].listdir("/shared")
    assert set(shared) <= {f"n{i}" for i in range(6)}       # no temporary left behind
    for n in shared:
        assert len(vols[2].read_bytes(f"/shared/{n}")) == vols[2].stat(f"/shared/{n}").st_size
    r = gc(vols[0], min_age=0)
    assert r.leaked == [] and r.missing == 0
    assert vols[0].meta.check() == []
    assert fsck(vols[0]).ok


# -- the stateful test -------------------------------------------------------------------------------
NAMES = ["a", "b", "c", "d/x", "d/y"]
clients = st.integers(0, 2)
names = st.sampled_from(NAMES)
small = st.binary(max_size=2000)
blobs = small | st.builds(pattern, st.integers(0, 200_000), st.integers(0, 1000))


class OpsMachine(RuleBasedStateMachine):
    """Three clients of one volume doing random operations; a model of the tree says what every
    file must hold; compaction runs in the background and on demand, gc runs with no safety
    window between steps (no write is in flight then) and must find nothing to delete."""

    meta_url = None                       # set by the test: a factory of fresh engine URLs

    def __init__(self):
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="tj-hyp-")
        url = type(self).meta_url(self.tmp)
        tj.format(url, "hyp", storage=f"file://{self.tmp}/bucket", block_size=64 * KiB)
        self.vols = [tj.connect(url) for _ in range(3)]
        for v in self.vols:
            v.meta.compact_threshold = 4
        self.vols[0].makedirs("/d")
        self.model: dict[str, bytes] = {}
        self.trash: dict[int, bytes] = {}

    def teardown(self):
        try:
            for v in self.vols:
                assert v.compactor.wait_idle(30)
            v = self.vols[0]
            got = {e["inode"]: v.read_bytes(e["path"]) for e in v.trash_list()}
            assert got == self.trash
            assert v.meta.check() == []
            r = gc(v, min_age=0)
            assert r.leaked == [] and r.missing == 0
            assert fsck(v).ok
        finally:
            for v in self.vols:
                v.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    @rule(c=clients, n=names, data=blobs)
    def write(self, c, n, data):
        self.vols[c].write_bytes("/" + n, data)
        self.model[n] = data

    @rule(c=clients, n=names, data=small)
    def append(self, c, n, data):
        if n in self.model:
            with self.vols[c].open("/" + n, "ab") as f:
                f.write(data)
            self.model[n] += data

    @rule(c=clients, n=names, off=st.integers(0, 150_000), data=small)
    def overwrite(self, c, n, off, data):
        if n in self.model and data:                     # (writing nothing extends nothing)
            with self.vols[c].open("/" + n, "r+b") as f:
                f.seek(off)
                f.write(data)
            old = self.model[n]
            if off > len(old):
                old += bytes(off - len(old))
            self.model[n] = old[:off] + data + old[off + len(data):]

    @rule(c=clients, n=names, size=st.integers(0, 150_000))
    def truncate(self, c, n, size):
        if n in self.model:
            self.vols[c].truncate("/" + n, size)
            old = self.model[n]
            self.model[n] = old[:size] + bytes(max(0, size - len(old)))

    @rule(c=clients, n=names)
    def remove(self, c, n):
        if n in self.model:
            ino = self.vols[c].stat("/" + n).st_ino
            self.vols[c].remove("/" + n)
            self.trash[ino] = self.model.pop(n)
        else:
            with pytest.raises(FileNotFoundError):
                self.vols[c].remove("/" + n)

    @rule(c=clients, src=names, dst=names)
    def rename(self, c, src, dst):
        if src in self.model and src != dst:
            if dst in self.model:
                self.trash[self.vols[c].stat("/" + dst).st_ino] = self.model[dst]
            self.vols[c].rename("/" + src, "/" + dst)
            self.model[dst] = self.model.pop(src)

    @rule(c=clients, n=names)
    def restore(self, c, n):
        entries = self.vols[c].trash_list()
        if entries and n not in self.model:
            e = entries[-1]
            assert self.vols[c].trash_restore(e["path"], "/" + n) == "/" + n
            self.model[n] = self.trash.pop(e["inode"])

    @rule(c=clients, ns=st.lists(names, min_size=1, max_size=4),
          datas=st.lists(blobs, min_size=4, max_size=4))
    def write_many(self, c, ns, datas):          # small files packed into shared slices
        self.vols[c].write_many([("/" + n, d) for n, d in zip(ns, datas)], pack_max=64 * KiB)
        self.model.update(zip(ns, datas))

    @rule()
    def empty_trash(self):                       # frees the trashed files' slices
        self.vols[0].meta.cleanup_trash(now=time.time() + 30 * 86400, days=0)
        self.trash.clear()

    @rule(c=clients)
    def compact(self, c):
        self.vols[c].compact("/")

    @rule()
    def collect_garbage(self):
        for v in self.vols:
            assert v.compactor.wait_idle(30)
        r = gc(self.vols[0], delete=True, min_age=0)
        assert r.leaked == [] and r.missing == 0 and r.unknown == []

    @rule(datas=st.lists(small, min_size=3, max_size=3))
    def concurrent_appends(self, datas):
        def run(c):
            for _ in range(3):
                with self.vols[c].open(f"/p{c}", "ab") as f:
                    f.write(datas[c])
        threads = [threading.Thread(target=run, args=(c,)) for c in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for c in range(3):
            self.model[f"p{c}"] = self.model.get(f"p{c}", b"") + datas[c] * 3

    @invariant()
    def files_hold_what_the_model_says(self):
        v = self.vols[len(self.model) % 3]
        seen = set()
        for top, _dirs, files in v.walk("/"):
            seen.update(f"{top}/{f}".lstrip("/") for f in files)
        assert seen == set(self.model)
        for n, data in self.model.items():
            assert v.read_bytes("/" + n) == data, n


@pytest.mark.parametrize("engine", ENGINES)
def test_stateful_clients_against_a_model(request, engine):
    if engine == "redis":
        srv = request.getfixturevalue("redis_server")
        OpsMachine.meta_url = staticmethod(lambda tmp: srv.url())
        n = 12
    else:
        OpsMachine.meta_url = staticmethod(lambda tmp: f"sqlite3://{tmp}/meta.db")
        n = 30
    run_state_machine_as_test(OpsMachine, settings=settings(
        max_examples=n, stateful_step_count=50, deadline=None, derandomize=True,
        suppress_health_check=list(HealthCheck)))


# -- stats ---------------------------------------------------------------------------------------------
def test_prometheus_endpoint(request, tmp_path):
    from torchjuice.ops.stats import metrics_server
    _, url = make_volume(request, tmp_path, connect=False)
    a, b = tj.connect(url), tj.connect(url)
    request.addfinalizer(a.close)
    request.addfinalizer(b.close)
    a.write_bytes("/x", pattern(300 * KiB))
    b.read_bytes("/x")
    a.meta.publish_session()
    b.meta.publish_session()
    meta = new_meta(url)
    srv = metrics_server(meta, "127.0.0.1:0")
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        port = srv.server_address[1]
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read() \
            .decode()
    finally:
        srv.shutdown()
        srv.server_close()
        meta.close()
    lines = text.splitlines()
    assert 'torchjuice_sessions{volume="ops"} 2' in lines
    assert any(ln.startswith('torchjuice_inodes{volume="ops"} ') for ln in lines)
    puts = {ln.split("{")[1].split("}")[0]: float(ln.rsplit(" ", 1)[1]) for ln in lines
            if ln.startswith("torchjuice_put_count{")}
    per_session = {k: v for k, v in puts.items() if "session=" in k}
    assert len(per_session) == 2 and puts['volume="ops"'] == sum(per_session.values()) == 5
    assert f'session="{a.meta.sid}"' in next(k for k, v in per_session.items() if v == 5)
    # and from the command line
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "torchjuice.cli", "stats", url, "--prometheus",
                          f"127.0.0.1:{port}"], stderr=subprocess.PIPE, text=True)
    try:
        assert "/metrics" in p.stderr.readline()
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        assert b'torchjuice_get_count{volume="ops"}' in body
    finally:
        p.terminate()
        p.wait(10)


def test_cli_compact_and_durations(request, tmp_path, capsys):
    from torchjuice.ops import parse_duration
    assert [parse_duration(x) for x in ("90", "90s", "30m", "1h", "2d", "0.5h")] == \
        [90, 90, 1800, 3600, 172800, 1800]
    with pytest.raises(ValueError):
        parse_duration("soon")
    vol, url = make_volume(request, tmp_path)
    for i in range(5):
        with vol.open("/f", "ab") as f:
            f.write(pattern(1000, i))
    want = vol.read_bytes("/f")
    assert cli(["compact", url, "/f"]) == 0
    assert "compacted 1 of 1 chunks in 1 files" in capsys.readouterr().out
    assert len(vol.meta.read_chunk(vol.stat("/f").st_ino, 0)) == 1
    assert vol.read_bytes("/f") == want
    with pytest.raises(SystemExit):
        cli(["gc", url, "--min-age", "soon"])
