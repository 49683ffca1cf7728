"""glibc's heap thresholds, for processes that allocate and free large buffers in a steady
stream (DataLoader workers, the FUSE mount): with glibc's defaults, freed memory goes back to the
kernel and the next buffers fault in fresh zeroed pages (see ``torchjuice.data`` and
``torchjuice.fuse.mount``)."""
from __future__ import annotations

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def pin_malloc(mmap_threshold: int, trim_threshold: int) -> bool:
    """Allocations below ``mmap_threshold`` bytes come from the heap, and up to ``trim_threshold``
    free bytes at its top are kept rather than handed back. True if both were set; False on a C
    library without ``mallopt`` (musl, macOS), where nothing is done."""
    try:
        import ctypes
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
    return mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1 and ok
