"""The torchjuice command as a user runs it: one clear error line, non-zero exit, no traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import torchjuice as tj


def run(*args, ok=True, env=None):
    p = subprocess.run([sys.executable, "-m", "torchjuice.cli", *args], capture_output=True,
                       text=True, env={**os.environ, **(env or {})}, timeout=120)
    if ok:
        assert p.returncode == 0, p.stderr
    return p


def test_format_status_cp_info_roundtrip(tmp_path):
    run("format", "clivol")
    st = json.loads(run("status", "clivol").stdout)
    assert st["setting"]["name"] == "clivol" and st["setting"]["block_size"] == 4 << 20
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(os.urandom(300_000))
    (src / "sub" / "b.txt").write_text("hello")
    p = run("cp", "-r", str(src), "juice://clivol/data")      # data does not exist: becomes the copy
    assert "copied 2 file(s)" in p.stderr
    run("cp", "-r", "-q", str(src), "juice://clivol/data")     # data exists: src goes inside it
    info = json.loads(run("info", "juice://clivol/data/src/a.bin").stdout)
    assert info["size"] == 300_000 and info["type"] == "file"
    objects = [o for c in info["chunks"] for s in c["slices"] for o in s["objects"]]
    assert objects and all(o.startswith("clivol/chunks/") for o in objects)
    run("cp", "-r", "-q", "juice://clivol/data/src", str(tmp_path / "back"))
    assert (tmp_path / "back" / "a.bin").read_bytes() == (src / "a.bin").read_bytes()
    assert (tmp_path / "back" / "sub" / "b.txt").read_text() == "hello"
    assert (tmp_path / "back" / "a.bin").read_bytes() == (src / "a.bin").read_bytes()
    run("cp", "-q", "juice://clivol/data/sub/b.txt", "juice://clivol/copy.txt")
    with tj.connect("clivol") as vol:
        assert vol.read_bytes("/copy.txt") == b"hello"


def test_format_with_urls_and_options(tmp_path):
    meta = f"sqlite3://{tmp_path}/m.db"
    run("format", meta, "optvol", "--storage", f"file://{tmp_path}/d", "--block-size", "1M",
        "--compress", "zstd", "--trash-days", "0")
    st = json.loads(run("status", meta).stdout)["setting"]
    assert (st["block_size"], st["compression"], st["trash_days"]) == (1 << 20, "zstd", 0)


@pytest.mark.parametrize("args, needle", [
    (("status", "nosuchvol"), "no volume named 'nosuchvol'"),
    (("format", "ftp://x/y", "v"), "unknown metadata engine URL"),
    (("info", "juice://nosuchvol/x"), "no volume named"),
    (("cp", "/definitely/missing", "/definitely/elsewhere"), "No such file or directory"),
    (("cp", "/definitely/missing", "juice://v/x"), "no volume named 'v'"),
    (("info", "s3://bucket/x"), "not a juice:// URL"),
])
def test_user_errors_are_one_line(args, needle):
    p = run(*args, ok=False)
    assert p.returncode != 0
    assert needle in p.stderr
    assert "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_format_twice_and_dir_without_r(tmp_path):
    run("format", "twice")
    p = run("format", "twice", ok=False)
    assert p.returncode != 0 and "--force" in p.stderr and "Traceback" not in p.stderr
    run("format", "twice", "--force")
    (tmp_path / "d").mkdir()
    p = run("cp", str(tmp_path / "d"), "juice://twice/x", ok=False)
    assert "use -r" in p.stderr


def test_unformatted_engine(tmp_path):
    p = run("status", f"sqlite3://{tmp_path}/none.db", ok=False)
    assert "format" in p.stderr and "Traceback" not in p.stderr
