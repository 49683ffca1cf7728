"""Shared helpers of the benchmark scripts: servers, timing, machine description, result files."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> str:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    return (f"{platform.node()}: {os.cpu_count()} cores ({cpu or platform.machine()}), "
            f"{mem:.0f} GiB RAM, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def command() -> str:
    import __main__
    spec = getattr(__main__, "__spec__", None)
    prog = f"python -m {spec.name}" if spec is not None and spec.name else f"python {sys.argv[0]}"
    return " ".join([prog] + sys.argv[1:])


@contextmanager
def timer(out: dict, key: str):
    t = time.perf_counter()
    yield
    out[key] = time.perf_counter() - t


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def write_results(name: str, rows: list[dict], table: str, notes: str = "") -> str:
    """Write ``results/NAME.json`` and ``results/NAME.md`` (machine, command, commit, table)."""
    os.makedirs(RESULTS, exist_ok=True)
    meta = {"machine": machine(), "command": command(), "commit": git_rev(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average_at_end": os.getloadavg()[0]}
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)
    md = (f"# {name}\n\n- machine: {meta['machine']}\n- command: `{meta['command']}`\n"
          f"- commit: {meta['commit']}\n- date: {meta['date']}\n"
          f"- load average (1 min) at the end: {meta['load_average_at_end']:.1f} "
          "(other work on this 2-core machine skews absolute figures; ratios are measured in "
          f"one run)\n\n{notes}\n\n```\n{table}\n```\n")
    path = os.path.join(RESULTS, f"{name}.md")
    with open(path, "w") as f:
        f.write(md)
    return path


def fmt_table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- baseline readers shared by the dataset and MLPerf benchmarks -----------------------------------
def read_all(reader) -> bytes:
    """s3torchconnector's transform: the whole object."""
    return reader.read()


class LocalFiles:
    """Map-style dataset over local files: item i is ``open(paths[i]).read()``."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with open(self.paths[i], "rb") as f:
            return f.read()


def _files(paths) -> list[str]:
    return [p for top in paths for p in ([top] if os.path.isfile(top) else [
        os.path.join(d, f) for d, _, fs in os.walk(top) for f in fs])]


def evict(paths) -> None:
    """Drop every file under ``paths`` from the page cache (written back first: the kernel drops
    only clean pages), so that whatever reads them next brings them in its own way."""
    for path in _files(paths):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def rewarm(paths) -> None:
    """Read every file under ``paths`` (files or directories) once, so that a warm run finds them
    in the page cache. Done right before each warm run: this VM reclaims page cache it sees unused
    for a while (DAMON), even with most of its memory free, so a file written or read minutes
    earlier may be partly back on disk."""
    buf = bytearray(8 << 20)
    for path in _files(paths):
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
