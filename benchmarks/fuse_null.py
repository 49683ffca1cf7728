"""A do-nothing FUSE file system: the ceiling of a pyfuse3 file system on this machine.

    python -m benchmarks.fuse_null MOUNTPOINT SIZE      # serves until unmounted (fusermount3 -u)

One regular file, ``data``, of SIZE bytes: a read returns bytes from one buffer allocated at start,
a write is accepted and discarded, a truncate only sets the size. It is mounted the way
``torchjuice mount`` mounts (pyfuse3, the same mount options, the same 16 MiB kernel readahead,
write-only opens with direct I/O, no writeback cache), so what it measures is what FUSE, libfuse
and pyfuse3 cost per request on this machine with no file system behind them: the best any
pyfuse3 file system, ours included, can do. ``bench_fuse`` reads and writes it beside the mount.
"""
from __future__ import annotations

import errno
import os
import stat
import sys
import time

import pyfuse3
import trio

from torchjuice.fuse.mount import set_kernel_readahead

INODE = pyfuse3.ROOT_INODE + 1
NAME = b"data"


class NullFS(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, size: int):
        super().__init__()
        self.size = size
        self.buf = bytes(1 << 20)
        self.now = time.time_ns()

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_mode = (stat.S_IFDIR | 0o755) if inode == pyfuse3.ROOT_INODE else (stat.S_IFREG | 0o644)
        a.st_nlink = 2 if inode == pyfuse3.ROOT_INODE else 1
        a.st_size = 0 if inode == pyfuse3.ROOT_INODE else self.size
        a.st_uid, a.st_gid = os.getuid(), os.getgid()
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.now
        a.st_blksize = 1 << 20
        a.st_blocks = (a.st_size + 511) // 512
        a.attr_timeout = a.entry_timeout = 1.0
        return a

    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode == pyfuse3.ROOT_INODE and name == NAME:
            return self._attr(INODE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def setattr(self, inode, attr, fields, fh, ctx):
        if fields.update_size:
            self.size = attr.st_size
        return self._attr(inode)

    async def getxattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        if fh == pyfuse3.ROOT_INODE and start_id == 0:
            pyfuse3.readdir_reply(token, NAME, self._attr(INODE), 1)

    async def open(self, inode, flags, ctx):
        if inode != INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        # as torchjuice's mount: write-only opens bypass the page cache, reads go through it
        return pyfuse3.FileInfo(fh=INODE, keep_cache=False,
                                direct_io=flags & os.O_ACCMODE == os.O_WRONLY)

    async def read(self, fh, off, size):
        n = max(0, min(size, self.size - off))
        if n <= len(self.buf):
            return memoryview(self.buf)[:n]
        return bytes(n)

    async def write(self, fh, off, buf):
        self.size = max(self.size, off + len(buf))
        return len(buf)

    async def flush(self, fh):
        pass

    async def release(self, fh):
        pass


def main() -> None:
    mountpoint, size = sys.argv[1], int(sys.argv[2])
    from torchjuice.fuse.mount import mount_options
    pyfuse3.init(NullFS(size), mountpoint, mount_options("null"))

    async def ready():
        st = await trio.to_thread.run_sync(os.stat, mountpoint)
        set_kernel_readahead(st.st_dev, 16 << 20)
        print("ready", flush=True)

    async def serve():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ready)
            await pyfuse3.main(min_tasks=2, max_tasks=64)
    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=False)


if __name__ == "__main__":
    main()
