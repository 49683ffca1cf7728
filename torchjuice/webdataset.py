"""``juice://`` URLs in `webdataset <https://github.com/webdataset/webdataset>`_.

    import torchjuice.webdataset  # noqa: F401  (registers the "juice" scheme)
    ds = webdataset.WebDataset("juice://vol/shards/train-{000000..000099}.tar")

Importing this module adds a ``juice`` entry to ``webdataset.gopen.gopen_schemes``. Reads stream
the shard in windows read ahead on a few threads (the next window is fetched while webdataset parses
the current one); writes (``webdataset.TarWriter("juice://...")``, ``ShardWriter``) go through
``open_url``. With the ``spawn`` start method, import this module at the top level of your script
so that DataLoader workers register the scheme too.

The volume is found as for any ``juice://`` URL (``$TORCHJUICE_META``, else the registry);
:func:`register` sets another engine URL or the read-ahead sizes.
"""
from __future__ import annotations

import importlib
import io

# the module, not the function webdataset's __init__ exports under the same name
_gopen = importlib.import_module("webdataset.gopen")

from .data import MiB, Prefetcher, _Unit, _Volumes
from .volume import open_url, split_url

_options = {"meta": None, "read_size": 8 * MiB, "prefetch_bytes": 64 * MiB, "io_threads": 2}


class ShardReader(io.RawIOBase):
    """A read-only, forward-only file over one ``juice://`` file, read ahead in windows."""

    def __init__(self, url: str, meta: str | None = None, read_size: int = 8 * MiB,
                 prefetch_bytes: int = 64 * MiB, io_threads: int = 2):
        super().__init__()
        self.name = url
        vols = _Volumes(meta)
        vol, path = vols.locate(url)
        attr = vol.getattr(path)
        if attr.is_dir:
            raise IsADirectoryError(21, "Is a directory", url)
        size = attr.length
        # the datasets' cache_fill="auto" for this shard ("adaptive" from BIG_FILE on, so a cold
        # pass is not slowed by the page cache's growth; see JuiceIterableDataset)
        vols.set_fill("auto", size, 1)
        units, off = [], 0
        while off + read_size < size:
            units.append(_Unit(0, url, off, read_size, False))
            off += read_size
        units.append(_Unit(0, url, off, -1, True))
        self._reader = Prefetcher(vols, units, io_threads, prefetch_bytes)
        self._obj = None
        self._view = memoryview(b"")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        out = memoryview(b).cast("B")
        while self._pos >= len(self._view):
            try:
                _u, data = next(self._reader)
            except StopIteration:
                return 0
            if isinstance(data, BaseException):
                raise data
            old, self._obj = self._obj, data
            self._view, self._pos = memoryview(data), 0
            if old is not None:
                self._reader.recycle(old)
        n = min(len(out), len(self._view) - self._pos)
        out[:n] = self._view[self._pos:self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            self._reader.close()
            self._view = memoryview(b"")
        super().close()


def gopen_juice(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    """webdataset's gopen handler for ``juice://`` URLs."""
    split_url(url)
    if mode == "rb":
        raw = ShardReader(url, _options["meta"], _options["read_size"], _options["prefetch_bytes"],
                          _options["io_threads"])
        return io.BufferedReader(raw, max(bufsize, 1 << 20))
    if mode == "wb":
        return open_url(url, "wb", meta=_options["meta"])
    raise ValueError(f"{url}: unsupported mode {mode!r} (rb or wb)")


def register(meta: str | None = None, read_size: int | None = None,
             prefetch_bytes: int | None = None, io_threads: int | None = None) -> None:
    """(Re-)register the ``juice`` scheme; ``meta`` names the engine for every ``juice://`` URL
    webdataset opens (default: ``$TORCHJUICE_META``, else the volume registry)."""
    if meta is not None:
        _options["meta"] = meta
    if read_size is not None:
        _options["read_size"] = int(read_size)
    if prefetch_bytes is not None:
        _options["prefetch_bytes"] = int(prefetch_bytes)
    if io_threads is not None:
        _options["io_threads"] = int(io_threads)
    _gopen.gopen_schemes["juice"] = gopen_juice


register()

__all__ = ["gopen_juice", "register", "ShardReader"]
