"""Memory mappings and the page cache, through libc (ctypes calls release the GIL): the calls
``mmap`` objects lack (``mmap`` at a fixed address, ``madvise`` without the GIL) and
:func:`page_in`, which brings a local file into the page cache in 2 MiB folios. Linux only; the
callers check."""
from __future__ import annotations

import ctypes
import errno
import mmap
import os

MAP_FIXED = 0x10
MADV_HUGEPAGE = 14
MADV_POPULATE_READ = 22          # Linux 5.14
HUGE = 2 << 20                   # a PMD: the largest page a file mapping gets (x86-64, arm64 4K)
_libc = None


def libc():
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                             ctypes.c_int, ctypes.c_long]
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc = lib
    return _libc


def page_in(path: str, length: int) -> bool:
    """Bring bytes ``[0, length)`` of a local file into the page cache, asking for huge pages:
    pages not cached yet come in as 2 MiB folios, which a later mapping of the file (see
    ``torchjuice.models``) maps one fault per 2 MiB; pages already cached stay as they are. The
    file is mapped, advised and populated, then unmapped. False if the file is gone or short."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if length <= 0 or os.fstat(fd).st_size < length:
            return False
        lib = libc()
        addr = lib.mmap(None, length, mmap.PROT_READ, mmap.MAP_PRIVATE, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return False
    finally:
        os.close(fd)
    try:
        if length >= HUGE:
            lib.madvise(addr, length, MADV_HUGEPAGE)
        if lib.madvise(addr, length, MADV_POPULATE_READ) == 0:
            return True
        if ctypes.get_errno() != errno.EINVAL:                 # EINVAL: a kernel before 5.14
            return False
        _touch(addr, length)
        return True
    finally:
        lib.munmap(addr, length)


def _touch(addr: int, length: int) -> None:
    """Fault in every page of a mapping by reading a byte of each (with the GIL held)."""
    for off in range(0, length, mmap.PAGESIZE):
        ctypes.c_char.from_address(addr + off).value
