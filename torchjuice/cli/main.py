"""The ``torchjuice`` command.

Errors a user can cause print one line on stderr and exit non-zero; ``TORCHJUICE_DEBUG=1`` shows
the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


from .. import volume as _volume
from ..errors import InvalidURLError
from ..meta import new_meta

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``4M`` -> 4194304; plain numbers are bytes; K/M/G/T are powers of 1024."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _UNITS and not t[-1:].isdigit() else ""
    try:
        n = float(t[: len(t) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (use e.g. 4M, 512K, 1G)") from None
    return int(n * _UNITS[unit])


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


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


__all__ = ["main", "parse_size", "human"]
