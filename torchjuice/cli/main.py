"""The ``torchjuice`` command.

Errors a user can cause print one line on stderr and exit non-zero; ``TORCHJUICE_DEBUG=1`` shows
the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


from .. import volume as _volume
from ..errors import InvalidURLError
from ..meta import new_meta
from ..units import human, parse_size

# -- commands --------------------------------------------------------------------------------------
def cmd_format(a) -> int:
    meta_url, name = (a.args[0], a.args[1]) if len(a.args) == 2 else (None, a.args[0])
    fmt = _volume.format(meta_url, name, storage=a.storage, block_size=a.block_size,
                         compression=a.compress, trash_days=a.trash_days, force=a.force)
    where = meta_url or _volume.find_meta_url(name)
    print(f"formatted volume {fmt.name!r} (uuid {fmt.uuid})\n  meta:    {where}\n"
          f"  storage: {fmt.storage}\n  block size: {human(fmt.block_size)}, "
          f"compression: {fmt.compression}, trash days: {fmt.trash_days}")
    return 0


def cmd_status(a) -> int:
    url = _volume.find_meta_url(a.volume)
    meta = new_meta(url)
    try:
        fmt = meta.load()
        used, inodes = meta.statfs()
        out = {"setting": json.loads(fmt.to_json()), "meta": url,
               "usage": {"used_bytes": used, "used_human": human(used), "inodes": inodes},
               "sessions": meta.list_sessions()}
    finally:
        meta.close()
    print(json.dumps(out, indent=2, default=str))
    return 0


def cmd_info(a) -> int:
    for url in a.paths:
        name, path = _volume.split_url(url)
        print(json.dumps(_volume.volume_for(name).info(path), indent=2, default=str))
    return 0


def cmd_cp(a) -> int:
    from .cp import copy
    n_files, n_bytes, secs = copy(a.src, a.dst, recursive=a.recursive, progress=not a.quiet)
    if not a.quiet:
        rate = n_bytes / secs if secs > 0 else 0
        print(f"copied {n_files} file(s), {human(n_bytes)} in {secs:.2f}s ({human(rate)}/s)",
              file=sys.stderr)
    return 0


def cmd_warmup(a) -> int:
    from tqdm import tqdm
    by_volume: dict[str, list[str]] = {}
    mounted: dict[str, object] = {}
    for url in a.paths:
        if not url.startswith("juice://"):       # a path inside a `torchjuice mount`
            from ..fuse.control import mounted_volume
            vol, path = mounted_volume(url)
            mounted[vol.name] = vol
            by_volume.setdefault(vol.name, []).append(path)
            continue
        name, path = _volume.split_url(url)
        by_volume.setdefault(name, []).append(path)
    for name, paths in by_volume.items():
        vol = mounted.get(name) or _volume.volume_for(name)
        with tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc=f"warmup {name}",
                  disable=a.quiet) as bar:
            s = vol.warmup(paths, progress=bar)
        rate = s["downloaded_bytes"] / s["seconds"] if s["seconds"] else 0
        print(f"warmup {name}: {s['blocks']} blocks ({human(s['bytes'])}), downloaded "
              f"{s['downloaded_blocks']} ({human(s['downloaded_bytes'])}) in {s['seconds']:.2f}s "
              f"({human(rate)}/s); " + (f"cache {vol.cache_dir}" if vol.cache_dir else
                                         "no disk cache: the store's own files"), file=sys.stderr)
    return 0


STAT_COLUMNS = [("get_count", "GETs", int), ("get_bytes", "GET bytes", human),
                ("put_count", "PUTs", int), ("put_bytes", "PUT bytes", human),
                ("cache_hits", "cache hits", int), ("cache_misses", "misses", int),
                ("cache_hit_bytes", "hit bytes", human), ("buffer_hits", "buf hits", int),
                ("prefetch_count", "prefetch", int), ("cache_usage_bytes", "cache used", human)]


def stats_table(sessions: list[dict]) -> str:
    rows = [["session", "host:pid", "age"] + [c[1] for c in STAT_COLUMNS]]
    totals = {c[0]: 0 for c in STAT_COLUMNS}
    now = time.time()
    for s in sessions:
        st = s.get("stats") or {}
        rows.append([str(s["sid"]), f"{s.get('host', '?')}:{s.get('pid', '?')}",
                     f"{now - s['heartbeat']:.0f}s"] +
                    [str(f(st.get(k, 0))) for k, _, f in STAT_COLUMNS])
        for k in totals:
            totals[k] += st.get(k, 0) or 0
    rows.append(["total", "", ""] + [str(f(totals[k])) for k, _, f in STAT_COLUMNS])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


def cmd_stats(a) -> int:
    from ..fuse.control import mount_info
    info = mount_info(a.volume) if os.path.isdir(a.volume) else None     # a mountpoint
    meta = new_meta(info["meta"] if info else _volume.find_meta_url(a.volume))
    try:
        meta.load()
        if a.prometheus:
            from ..ops.stats import metrics_server
            srv = metrics_server(meta, a.prometheus)
            host, port = srv.server_address[:2]
            print(f"serving the counters of {len(meta.list_sessions())} client(s) at "
                  f"http://{host}:{port}/metrics", file=sys.stderr, flush=True)
            try:
                srv.serve_forever()
            finally:
                srv.server_close()
            return 0
        n = 0
        count = a.count if a.count is not None else (0 if sys.stdout.isatty() else 1)
        while True:
            sessions = meta.list_sessions()
            if a.json:
                print(json.dumps(sessions, default=str))
            else:
                table = stats_table(sessions)
                if sys.stdout.isatty() and n:
                    print("\x1b[H\x1b[2J", end="")       # refresh in place
                print(f"{time.strftime('%H:%M:%S')}  {len(sessions)} client(s); counters as of "
                      "their last heartbeat\n" + table, flush=True)
            n += 1
            if count and n >= count:
                return 0
            time.sleep(a.interval)
    finally:
        meta.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torchjuice",
                                description="A JuiceFS-design file system for PyTorch.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    f = sub.add_parser("format", help="create a volume",
                       description="Create a volume. With only NAME: an embedded volume under "
                                   "$TORCHJUICE_HOME/NAME (SQLite + a local directory).")
    f.add_argument("args", nargs="+", metavar="[META_URL] NAME")
    f.add_argument("--storage", help="object storage URL (file:///dir, s3://bucket?endpoint=...)")
    f.add_argument("--block-size", type=parse_size, default=4 << 20, help="default 4M")
    f.add_argument("--compress", choices=["none", "lz4", "zstd"], default="none")
    f.add_argument("--trash-days", type=int, default=1)
    f.add_argument("--force", action="store_true", help="update the settings of a formatted volume")
    f.set_defaults(func=cmd_format)

    s = sub.add_parser("status", help="settings, sessions and usage of a volume")
    s.add_argument("volume", metavar="META_URL|NAME")
    s.set_defaults(func=cmd_status)

    i = sub.add_parser("info", help="inode, size, chunks, slices and objects of a path")
    i.add_argument("paths", nargs="+", metavar="juice://VOL/path")
    i.set_defaults(func=cmd_info)

    c = sub.add_parser("cp", help="copy files: local <-> juice, juice <-> juice")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("-r", "--recursive", action="store_true")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_cp)

    w = sub.add_parser("warmup", help="fill the local disk cache (and the page cache) with the "
                                      "blocks of files/dirs")
    w.add_argument("paths", nargs="+", metavar="juice://VOL/path|MOUNTED_PATH")
    w.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    w.set_defaults(func=cmd_warmup)

    st = sub.add_parser("stats", help="live counters of the clients of a volume")
    st.add_argument("volume", metavar="META_URL|NAME|MOUNTPOINT")
    st.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    st.add_argument("--count", type=int, default=None,
                    help="stop after this many (0: never; default: never on a terminal, once when "
                         "the output is a pipe or a file)")
    st.add_argument("--json", action="store_true", help="one JSON line per refresh")
    st.add_argument("--prometheus", metavar="HOST:PORT",
                    help="serve the counters at http://HOST:PORT/metrics (Prometheus text format)")
    st.set_defaults(func=cmd_stats)
    from . import mount; mount.register(sub)  # noqa: E702
    from . import ops; ops.register(sub)  # noqa: E702
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.command == "format" and len(a.args) > 2:
        parser.error("format takes [META_URL] NAME")
    try:
        return a.func(a)
    except KeyboardInterrupt:
        print("torchjuice: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, InvalidURLError) as e:
        if os.environ.get("TORCHJUICE_DEBUG"):
            raise
        msg = str(e)
        if isinstance(e, OSError) and e.strerror:        # no "[Errno N]" noise
            msg = e.strerror if e.filename is None else f"{e.strerror}: {e.filename}"
        print(f"torchjuice {a.command}: error: {msg}", file=sys.stderr)
        return 1
    finally:
        _close_all()


def _close_all() -> None:
    for vol in list(_volume._volumes.values()):
        try:
            vol.close()
        except Exception:
            pass


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main"]
