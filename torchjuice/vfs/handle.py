"""An open file: a raw binary file object (``io.RawIOBase``) over one inode.

``Volume.open`` wraps it in ``io.BufferedReader``/``BufferedWriter``/``BufferedRandom`` exactly as
the built-in ``open`` does, so users get the built-in semantics (``readline``, ``peek``, iteration,
text wrappers). Large reads bypass the buffer and land straight in the caller's memory.

Close-to-open consistency: the length and slice lists are read fresh when the file is opened; what
this handle writes is committed on ``flush``/``close`` and then seen by every later ``open``.
"""
from __future__ import annotations

import errno
import io
import threading


from ..chunk.store import ChunkStore
from ..errors import oserror
from ..meta import Meta
from .reader import FileReader
from .writer import FileWriter


_local = threading.local()
_SCRATCH_MAX = 64 << 20


def _scratch(n: int) -> memoryview:
    """A per-thread buffer to read into before making the ``bytes`` that ``read`` returns: a
    fresh zeroed buffer per call costs page faults as large as the copy itself."""
    if n > _SCRATCH_MAX:
        return memoryview(bytearray(n))
    buf = getattr(_local, "buf", None)
    if buf is None or len(buf) < n:
        buf = _local.buf = bytearray(max(n, 1 << 20))
    return memoryview(buf)[:n]


class JuiceRawFile(io.RawIOBase):
    def __init__(self, meta: Meta, chunks: ChunkStore, inode: int, path: str, mode: str,
                 length: int, readable: bool, writable: bool, append: bool,
                 max_readahead: int = 0):
        super().__init__()
        self.name = path
        self.mode = mode
        self.inode = inode
        self._meta = meta
        self._readable = readable
        self._writable = writable
        self._append = append
        self._pos = 0
        self._length = length
        self._reader = FileReader(meta, chunks, inode, max_readahead)
        self._writer = FileWriter(meta, chunks, inode) if writable else None
        meta.open_file(inode)

    def __repr__(self) -> str:
        return f"<JuiceRawFile name={self.name!r} mode={self.mode!r}>"

    # -- capabilities --------------------------------------------------------------------------------
    def readable(self) -> bool:
        self._check_closed()
        return self._readable

    def writable(self) -> bool:
        self._check_closed()
        return self._writable

    def seekable(self) -> bool:
        self._check_closed()
        return True

    def fileno(self) -> int:
        raise io.UnsupportedOperation("a torchjuice file has no OS file descriptor")

    def _check_closed(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file.")

    # -- position ------------------------------------------------------------------------------------
    def tell(self) -> int:
        self._check_closed()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._check_closed()
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self.size() + offset
        else:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        if pos < 0:
            raise oserror(errno.EINVAL, self.name, "negative seek position")
        self._pos = pos
        return pos

    def size(self) -> int:
        """The length as this handle sees it (its own unflushed writes included)."""
        if self._writer is not None:
            return max(self._length, self._writer.pending_end)
        return self._length

    # -- reads ---------------------------------------------------------------------------------------
    def readinto(self, b) -> int:
        self._check_closed()
        if not self._readable:
            raise io.UnsupportedOperation("File not open for reading")
        if self._writer is not None and self._writer.dirty:
            self._flush_writes()
        out = memoryview(b).cast("B")
        n = self._reader.read_into(self._pos, out, self._length)
        self._pos += n
        return n

    def pread_into(self, off: int, b) -> int:
        """Read at file offset ``off`` into ``b`` without using or moving the position (the FUSE
        mount shares one handle between descriptors and reads at each request's offset). Safe
        from several threads at once as long as no write is pending: the caller commits writes
        first."""
        self._check_closed()
        return self._reader.read_into(off, memoryview(b).cast("B"), self._length)

    def read_mapped(self, off: int, n: int) -> memoryview | None:
        """Bytes at ``off`` as a view of a mapped block file, or None (see
        ``FileReader.read_mapped``); the caller commits pending writes first."""
        self._check_closed()
        return self._reader.read_mapped(off, n, self._length)

    def blocks(self, off: int, n: int) -> list[tuple[str, int]] | None:
        """The blocks a read of ``n`` bytes at ``off`` would touch (see ``FileReader.blocks``)."""
        return self._reader.blocks(off, max(0, min(n, self._length - off)))

    def readall(self) -> bytes:
        self._check_closed()
        if self._writer is not None and self._writer.dirty:
            self._flush_writes()
        return self.read(max(0, self._length - self._pos))

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        view = _scratch(size)
        n = self.readinto(view)
        return bytes(view[:n])

    # -- writes --------------------------------------------------------------------------------------
    def write(self, b) -> int:
        self._check_closed()
        if not self._writable:
            raise io.UnsupportedOperation("File not open for writing")
        data = memoryview(b).cast("B")
        if self._append:
            self._pos = self.size()
        self._writer.write(self._pos, data)
        self._pos += len(data)
        return len(data)

    def truncate(self, size: int | None = None) -> int:
        self._check_closed()
        if not self._writable:
            raise io.UnsupportedOperation("File not open for writing")
        size = self._pos if size is None else size
        if size < 0:
            raise oserror(errno.EINVAL, self.name, "negative size")
        self._flush_writes()
        attr = self._meta.truncate(self.inode, size)
        self._writer.pending_end = 0
        self._length = attr.length
        self._reader.invalidate()
        return size

    def _flush_writes(self) -> None:
        changed = self._writer.flush()
        if changed:
            self._length = max(self._length, self._writer.pending_end)
            self._reader.invalidate(changed)

    def flush(self) -> None:
        self._check_closed()
        if self._writer is not None:
            self._flush_writes()

    def fsync(self) -> None:
        self.flush()

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self._writer is not None:
                self._flush_writes()
        finally:
            try:
                if self._writer is not None and self._writer.dirty:
                    self._writer.discard()
            finally:
                self._meta.close_file(self.inode)
                super().close()


def open_flags(mode: str) -> tuple[str, bool, bool, bool, bool, bool, bool]:
    """Parse a Python file mode: ``(binary_mode, read, write, append, create, truncate, exclusive)``.
    Raises ValueError for modes the built-in ``open`` rejects."""
    chars = set(mode)
    if len(chars) != len(mode) or not chars <= set("rwaxbt+") or len(chars & set("rwax")) != 1 \
            or ("b" in chars and "t" in chars):
        raise ValueError(f"invalid mode: {mode!r}")
    plus = "+" in chars
    kind = (chars & set("rwax")).pop()
    read = kind == "r" or plus
    write = kind != "r" or plus
    return (kind + ("+" if plus else "") + "b", read, write, kind == "a", kind != "r",
            kind == "w", kind == "x")


__all__ = ["JuiceRawFile", "open_flags"]
