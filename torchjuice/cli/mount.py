"""``torchjuice mount`` and ``torchjuice umount``.

``mount`` stays in the foreground until the file system is unmounted (or Ctrl-C / SIGTERM, which
unmount it). With ``-d`` it forks a daemon and returns once the mount answers requests; the
daemon's log goes to ``$TORCHJUICE_HOME/logs/mount-NAME.log`` unless ``--log`` says otherwise.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import sys

from .. import volume as _volume
from ..units import parse_size


def cmd_mount(a) -> int:
    from ..fuse.mount import check_fuse, is_mounted

    check_fuse()
    mp = os.path.abspath(a.mountpoint)
    if is_mounted(mp):
        raise OSError(errno.EBUSY, "something is already mounted there (`torchjuice umount` it "
                      "first)", mp)
    if not os.path.isdir(mp):
        if os.path.exists(mp):
            raise NotADirectoryError(errno.ENOTDIR, "mountpoint is not a directory", mp)
        os.makedirs(mp)
    url = _volume.find_meta_url(a.volume)
    if not a.daemon:
        _logging(a, None)
        _run(a, url, mp, None)
        return 0
    name = a.volume if "://" not in a.volume else "volume"
    log_path = a.log or os.path.join(_volume.home(), "logs", f"mount-{name}.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:                                   # the daemon
        os.close(r)
        code = 1
        try:
            os.setsid()
            _detach(log_path)
            _logging(a, log_path)
            _run(a, url, mp, w)
            code = 0
        except BaseException as e:                # noqa: BLE001 - report, then exit
            logging.getLogger("torchjuice.fuse").exception("mount failed")
            try:
                os.write(w, f"error: {_one_line(e)}\n".encode())
            except OSError:
                pass
        finally:
            os._exit(code)
    os.close(w)
    answer = b""
    with os.fdopen(r, "rb") as f:
        for chunk in iter(lambda: f.read(4096), b""):
            answer += chunk
            if b"\n" in answer:
                break
    line = answer.decode(errors="replace").strip()
    if line == "ready":
        print(f"mounted volume at {mp} (pid {pid}, log {log_path})", file=sys.stderr)
        return 0
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    msg = line[len("error: "):] if line.startswith("error: ") else \
        f"the mount process exited before the mount was ready; see {log_path}"
    raise OSError(errno.EIO, msg)


def _run(a, url: str, mp: str, ready_fd: int | None) -> None:
    from ..fuse.mount import serve

    vol = _volume.connect(url, cache_dir=a.cache_dir, cache_size=a.cache_size, session=False)
    try:
        # the session record says this client is a mount, and where (torchjuice status/stats)
        vol.meta.session_stats = vol.metrics
        vol.meta.heartbeat_interval = 5.0
        vol.meta.new_session({"pid": os.getpid(), "host": os.uname().nodename, "mountpoint": mp})

        def ready():
            if ready_fd is not None:
                os.write(ready_fd, b"ready\n")
                os.close(ready_fd)
            else:
                print(f"mounted volume {vol.name!r} at {mp}; Ctrl-C or `torchjuice umount {mp}` "
                      "to unmount", file=sys.stderr, flush=True)

        serve(vol, mp, url, attr_timeout=a.attr_cache, entry_timeout=a.entry_cache,
              dir_entry_timeout=a.dir_entry_cache, options=a.options or (),
              kernel_readahead=a.kernel_readahead, on_ready=ready)
    finally:
        vol.close()


def _detach(log_path: str) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.close(null)
    os.chdir("/")


def _logging(a, path: str | None) -> None:
    level = logging.DEBUG if a.debug else logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    if not a.debug:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror if e.filename is None else f"{e.strerror}: {e.filename}"
    return str(e) or type(e).__name__


def cmd_umount(a) -> int:
    from ..fuse.control import CONTROL_NAME
    from ..fuse.mount import unmount, wait_gone

    mp = os.path.abspath(a.mountpoint)
    pid = None
    try:
        with open(os.path.join(mp, CONTROL_NAME), "rb") as f:
            pid = json.loads(f.read()).get("pid")
    except (OSError, ValueError):
        pass                     # a dead mount, or not ours: fusermount3 still knows what to do
    unmount(mp, lazy=a.lazy)
    if pid and not wait_gone(pid, a.timeout):
        print(f"torchjuice umount: unmounted {mp}, but mount process {pid} is still committing "
              f"after {a.timeout:.0f}s", file=sys.stderr)
        return 1
    return 0


def register(sub) -> None:
    m = sub.add_parser("mount", help="mount a volume as a POSIX file system (FUSE)",
                       description="Mount a volume with FUSE. Stays in the foreground until "
                                   "unmounted; -d returns once the mount is ready.")
    m.add_argument("volume", metavar="META_URL|NAME")
    m.add_argument("mountpoint", metavar="MOUNTPOINT")
    m.add_argument("-d", "--daemon", "--background", action="store_true",
                   help="run in the background; return once the mount is ready")
    m.add_argument("--attr-cache", type=float, default=1.0, metavar="SECONDS",
                   help="how long the kernel caches attributes (default 1.0)")
    m.add_argument("--entry-cache", type=float, default=1.0, metavar="SECONDS",
                   help="how long the kernel caches file names (default 1.0)")
    m.add_argument("--dir-entry-cache", type=float, default=None, metavar="SECONDS",
                   help="how long the kernel caches directory names (default: --entry-cache)")
    m.add_argument("--cache-dir", default=None, help="local block cache directory "
                   "(default $TORCHJUICE_CACHE_DIR, else $TORCHJUICE_HOME/cache for remote stores)")
    m.add_argument("--cache-size", type=parse_size, default=None, help="e.g. 10G; 0 disables")
    m.add_argument("--kernel-readahead", type=parse_size, default=16 << 20, metavar="SIZE",
                   help="how far the kernel reads ahead of sequential readers (default 16M; "
                        "needs root, else the kernel default, 128K)")
    m.add_argument("-o", dest="options", action="append", metavar="OPT[,OPT]",
                   help="extra FUSE mount options (allow_other, ro, ...); noOPT removes a default")
    m.add_argument("--log", default=None, help="log file of the daemon (-d)")
    m.add_argument("--debug", action="store_true", help="debug logging (torchjuice and pyfuse3)")
    m.set_defaults(func=cmd_mount)

    u = sub.add_parser("umount", help="unmount a mounted volume",
                       description="Unmount a volume mounted with `torchjuice mount` and wait "
                                   "for the mount process to commit and exit.")
    u.add_argument("mountpoint", metavar="MOUNTPOINT")
    u.add_argument("-l", "--lazy", "-f", "--force", dest="lazy", action="store_true",
                   help="detach now even if files are open there")
    u.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for the mount process to exit")
    u.set_defaults(func=cmd_umount)


__all__ = ["register"]
