"""``torchjuice gc | fsck | dump | load | compact``: operations on a whole volume
(:mod:`torchjuice.ops`; see docs/operations.md)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .. import volume as _volume
from ..meta import new_meta
from ..ops import parse_duration


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _connect(name_or_url: str):
    """A session-less client without a disk cache: ops read the store directly."""
    return _volume.connect(_volume.find_meta_url(name_or_url), session=False, cache_size=0)


def _bar(quiet: bool, **kw):
    from tqdm import tqdm
    return tqdm(disable=quiet, file=sys.stderr, **kw)


def cmd_gc(a) -> int:
    from ..ops.gc import gc
    vol = _connect(a.volume)
    try:
        with _bar(a.quiet, unit="obj", desc="gc") as bar:
            r = gc(vol, delete=a.delete, min_age=a.min_age, progress=bar.update)
    finally:
        vol.close()
    print(r.summary(a.delete))
    return 0


def cmd_fsck(a) -> int:
    from ..ops.fsck import fsck
    vol = _connect(a.volume)
    try:
        with _bar(a.quiet, unit="block", desc="fsck") as bar:
            r = fsck(vol, repair=a.repair, verify=a.verify, progress=bar)
    finally:
        vol.close()
    print(r.summary())
    return 0 if r.ok else 1


class _Progress:
    """tqdm's ``update`` as a plain callable."""

    def __init__(self, bar):
        self.bar = bar

    def __call__(self, n: int) -> None:
        self.bar.update(n)


def cmd_dump(a) -> int:
    meta = new_meta(_volume.find_meta_url(a.volume))
    try:
        fmt = meta.load()
        with _bar(a.quiet or a.file == "-", unit="inode", desc="dump") as bar:
            if a.file == "-":
                n = meta.dump_to(sys.stdout, _Progress(bar))
            else:
                tmp = f"{a.file}.{os.getpid()}.tmp"
                try:
                    with open(tmp, "w", encoding="utf-8") as f:
                        n = meta.dump_to(f, _Progress(bar))
                    os.replace(tmp, a.file)
                except BaseException:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
                    raise
    finally:
        meta.close()
    print(f"dumped {n} inodes of volume {fmt.name!r} to {a.file}", file=sys.stderr)
    return 0


def cmd_load(a) -> int:
    if "://" not in a.meta_url:
        raise ValueError(f"load needs a metadata engine URL, not {a.meta_url!r}")
    if a.file == "-":
        data = json.load(sys.stdin)
    else:
        with open(a.file, encoding="utf-8") as f:
            data = json.load(f)
    if not isinstance(data, dict) or data.get("format") != "torchjuice-meta-dump":
        raise ValueError(f"{a.file} is not a torchjuice metadata dump")
    meta = new_meta(a.meta_url)
    try:
        with _bar(a.quiet, unit="inode", desc="load", total=len(data.get("inodes", {}))) as bar:
            meta.load_dump(data, force=a.force, progress=_Progress(bar))
        fmt = meta.load()
    finally:
        meta.close()
    _volume._register(fmt.name, a.meta_url)
    print(f"loaded volume {fmt.name!r} ({len(data['inodes'])} inodes) into {a.meta_url}",
          file=sys.stderr)
    return 0


def cmd_compact(a) -> int:
    vol = _connect(a.volume)
    try:
        total = {"files": 0, "chunks": 0, "compacted": 0, "conflicts": 0}
        for p in a.paths or ["/"]:
            for k, v in vol.compact(p).items():
                total[k] += v
    finally:
        vol.close()
    print(f"compacted {total['compacted']} of {total['chunks']} chunks in {total['files']} "
          f"files ({total['conflicts']} changed meanwhile: compact again later)")
    return 0


def _command(sub, name: str, func, help: str, description: str, target: str | None = "volume",
             quiet: bool = True):
    """A subcommand: ``target`` its first positional argument (META_URL|NAME), ``-q`` for no
    progress bar."""
    p = sub.add_parser(name, help=help, description=description)
    if target == "volume":
        p.add_argument("volume", metavar="META_URL|NAME")
    if quiet:
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=func)
    return p


def register(sub) -> None:
    g = _command(sub, "gc", cmd_gc, "find objects no file refers to (and delete them)",
                 "List the objects of a volume that no slice refers to (leaked by crashed "
                 "writers); --delete removes those older than the safety window.")
    g.add_argument("--delete", action="store_true", help="remove the leaked objects")
    g.add_argument("--min-age", type=_duration, default=3600.0, metavar="AGE",
                   help="safety window: keep leaked objects younger than this (default 1h; "
                        "s/m/h/d suffixes)")

    f = _command(sub, "fsck", cmd_fsck, "check files, blocks and the namespace",
                 "Check that every block of every file exists (and its size), and that the "
                 "namespace is consistent. Exit code 1 when problems remain.")
    f.add_argument("--repair", action="store_true",
                   help="fix namespace problems, drop stale sessions, mark broken files")
    f.add_argument("--verify", action="store_true",
                   help="also read every block and check it decompresses to its size")

    d = _command(sub, "dump", cmd_dump, "write the whole metadata as JSON",
                 "Write the metadata of a volume (settings, every inode, entry, xattr and slice "
                 "list) as JSON; `load` reads it into an engine of any kind.")
    d.add_argument("file", metavar="FILE", help="output file ('-': stdout)")

    ld = _command(sub, "load", cmd_load, "load a metadata dump into an empty engine",
                  "Load a JSON dump into an empty metadata engine (any kind) and register the "
                  "volume name.", target=None)
    ld.add_argument("meta_url", metavar="META_URL")
    ld.add_argument("file", metavar="FILE", help="dump file ('-': stdin)")
    ld.add_argument("--force", action="store_true", help="replace whatever the engine holds")

    c = _command(sub, "compact", cmd_compact, "rewrite chunks written as many slices",
                 "Compact the files at or under PATHs (default: all): chunks of several slices "
                 "become one slice per run of data.", quiet=False)
    c.add_argument("paths", nargs="*", metavar="PATH")


__all__ = ["register"]
