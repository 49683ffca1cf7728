"""Running a mount: connect the volume, mount it with pyfuse3, serve until unmounted or signalled.

``serve`` is what ``torchjuice mount`` runs (in the foreground, or in a forked daemon child with
``-d``). It returns once the file system is unmounted: by ``torchjuice umount`` / ``fusermount3
-u`` (the kernel ends the session) or by SIGINT/SIGTERM/SIGHUP (we unmount ourselves). Open files
are committed and the volume's session is closed on the way out.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import subprocess
import time

from .._malloc import pin_malloc

log = logging.getLogger("torchjuice.fuse")


def check_fuse() -> None:
    """Raise a clear ``OSError`` when this machine cannot mount FUSE file systems."""
    try:
        import pyfuse3  # noqa: F401
    except ImportError as e:
        raise OSError(errno.ENODEV, f"FUSE support needs pyfuse3 ({e}): apt-get install fuse3 "
                      "libfuse3-dev pkg-config && pip install 'torchjuice[fuse]'") from None
    if not os.path.exists("/dev/fuse"):
        raise OSError(errno.ENODEV, "/dev/fuse does not exist: this machine (or container) has "
                      "no FUSE")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK) and shutil.which("fusermount3") is None:
        raise OSError(errno.EACCES, "/dev/fuse is not usable and fusermount3 is not installed "
                      "(apt-get install fuse3)")


def mount_options(name: str, extra=()) -> set[str]:
    import pyfuse3
    opts = set(pyfuse3.default_options)           # default_permissions: the kernel checks modes
    opts |= {f"fsname={name}", "subtype=torchjuice"}
    if os.geteuid() == 0:
        opts.add("allow_other")                   # root mounts serve every user (modes apply)
    for o in extra:
        for part in o.split(","):
            part = part.strip()
            if part.startswith("no") and part[2:] in opts:
                opts.discard(part[2:])
            elif part:
                opts.add(part)
    return opts


def serve(vol, mountpoint: str, meta_url: str, *, attr_timeout: float = 1.0,
          entry_timeout: float = 1.0, dir_entry_timeout: float | None = None,
          options=(), kernel_readahead: int = 16 << 20, on_ready=None) -> None:
    """Mount ``vol`` at ``mountpoint`` and serve requests until it is unmounted. ``on_ready()`` is
    called (from another thread) once the mount answers requests. ``kernel_readahead``: how far
    the kernel reads ahead of a sequential reader (its default, 128 KiB, means small requests)."""
    import pyfuse3
    import trio

    from .ops import JuiceFuse

    mountpoint = os.path.abspath(mountpoint)
    # what the kept write requests can add up to: the bytes in flight to the store, and more
    tune_malloc(vol.chunks.max_inflight + (64 << 20))
    ops = JuiceFuse(vol, mountpoint, meta_url, attr_timeout=attr_timeout,
                    entry_timeout=entry_timeout, dir_entry_timeout=dir_entry_timeout)
    opts = mount_options(vol.name, options)
    log.info("mounting volume %r at %s (options %s)", vol.name, mountpoint, ",".join(sorted(opts)))
    pyfuse3.init(ops, mountpoint, opts)
    state = {"signalled": False, "ended": False}

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_signals, nursery, state)
            if on_ready is not None:
                nursery.start_soon(_ready, mountpoint, kernel_readahead, on_ready)
            await pyfuse3.main(min_tasks=2, max_tasks=64)
            state["ended"] = True
            nursery.cancel_scope.cancel()        # unmounted: stop the helpers too

    try:
        trio.run(main)
    finally:
        # after an external unmount the kernel already let go; after a signal or a failure
        # we unmount (a dead mount would answer "Transport endpoint is not connected")
        try:
            pyfuse3.close(unmount=state["signalled"] or not state["ended"])
        except Exception:       # pragma: no cover
            log.exception("closing the FUSE session failed")
        ops.close_all()
        log.info("unmounted %s", mountpoint)


def tune_malloc(keep: int = 64 << 20) -> bool:
    """Keep freed memory for reuse instead of handing it back to the kernel at once.

    Every FUSE write arrives as a fresh 1 MiB ``bytes`` (pyfuse3 copies the request into one),
    kept by the writer until its block is uploaded (up to the volume's ``max_inflight`` bytes of
    them), then freed. glibc returns such memory to the kernel (``munmap``, or a ``brk`` trim of
    the heap's top once more than its trim threshold is free), so later requests' copies
    page-fault on fresh pages: that cost as much CPU as the copies themselves. With requests
    taken from the heap (below 32 MiB) and up to ``keep`` free bytes kept, the same
    memory serves request after request (a 1 GiB write through a fresh mount: 62,000 page faults
    with 64 MiB kept, 3,000-5,000 with 320 MiB). glibc only; False elsewhere."""
    return pin_malloc(32 << 20, keep)


async def _signals(nursery, state) -> None:
    import pyfuse3
    import trio

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for sig in signals:
            log.info("signal %d: unmounting", sig)
            state["signalled"] = True
            pyfuse3.terminate()
            return


async def _ready(mountpoint: str, readahead: int, on_ready) -> None:
    import trio

    # a stat of the root goes through the kernel to our own loop: once it returns, we serve
    st = await trio.to_thread.run_sync(os.stat, mountpoint)
    set_kernel_readahead(st.st_dev, readahead)
    await trio.to_thread.run_sync(on_ready)


def set_kernel_readahead(dev: int, nbytes: int) -> bool:
    """Set the kernel readahead of the mount's device (``/sys/class/bdi/MAJ:MIN``), so that
    sequential reads arrive as 1 MiB requests, several in flight. Needs root; False otherwise."""
    if nbytes <= 0:
        return False
    path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(max(nbytes >> 10, 4)))
        return True
    except OSError as e:
        log.info("kernel readahead stays at its default (%s: %s)", path, e.strerror)
        return False


def is_mounted(mountpoint: str) -> bool:
    """Whether something is mounted at ``mountpoint`` (also a dead FUSE mount, which
    ``os.path.ismount`` cannot stat)."""
    mp = os.path.abspath(mountpoint)
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 1 and _unescape(fields[1]) == mp:
                    return True
    except OSError:
        return os.path.ismount(mp)
    return False


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n") \
        .replace("\\134", "\\")


def unmount(mountpoint: str, lazy: bool = False) -> None:
    """``fusermount3 -u`` (``-z`` when lazy); ``umount`` where fusermount3 is missing."""
    if not is_mounted(mountpoint):
        raise OSError(errno.EINVAL, "nothing is mounted there", mountpoint)
    exe = shutil.which("fusermount3") or shutil.which("fusermount")
    if exe:
        cmd = [exe, "-u"] + (["-z"] if lazy else []) + [mountpoint]
    else:
        cmd = ["umount"] + (["-l"] if lazy else []) + [mountpoint]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        msg = " ".join((r.stderr or r.stdout).split()) or f"{cmd[0]} failed"
        busy = "busy" in msg.lower()
        raise OSError(errno.EBUSY if busy else errno.EIO,
                      msg + (" (close the files open there, or use --lazy)" if busy else ""))


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` has exited; False on timeout."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass                  # alive, another user's
        try:                      # our own child (a foreground test harness): reap it
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        time.sleep(0.05)
    return False


__all__ = ["serve", "unmount", "check_fuse", "mount_options", "wait_gone"]
