"""PyTorch datasets over a volume.

* :class:`JuiceDataset` — map-style: every regular file under a directory (sorted, recursive), or an
  explicit list of ``juice://`` URLs. An item is the file's bytes (or ``transform(bytes)``).
* :class:`JuiceIterableDataset` — streaming: samples from tar shards (WebDataset conventions) or
  whole files, split over ranks and DataLoader workers, deterministic shuffling, resumable in the
  middle of an epoch.
* :class:`JuiceDataLoader` — a ``torch.utils.data.DataLoader`` that reports, batch by batch, how
  far each worker has got, so that ``JuiceIterableDataset.state_dict()`` is exact with workers.

Only the public :class:`~torchjuice.volume.Volume` API and the ``juice://`` helpers are used: each
process (each DataLoader worker, forked or spawned) resolves its own volume with ``volume_for``; a
dataset pickles as its URLs and options. See ``docs/datasets.md`` for the user guide.
"""
from __future__ import annotations

import array
import collections
import json
import logging
import multiprocessing.util
import os
import posixpath
import random
import re
import tarfile
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ._malloc import pin_malloc
from .volume import CACHE_FILL_MODES, find_meta_url, open_url, split_url, volume_for

log = logging.getLogger(__name__)

MiB = 1 << 20
MANIFEST_FORMAT = "torchjuice-manifest"

# Reads of small files switch between inline and threads by how long they take. A file served
# locally (the disk cache, a file:// store) costs tens of microseconds, about what handing it to a
# thread and back costs, so those are read inline; reads slower than SLOW_READ that fetched from a
# remote object store went to the network, and then the rest of the batch (and the next batches,
# while reads stay slow) are read on threads, so that their latencies overlap. Slow reads that
# fetched nothing remote (big files from the page cache, a machine short of CPU) stay inline:
# threads would only add hand-offs and the GIL, and their timings would keep them threaded.
SLOW_READ = 0.001
INLINE_GROUP = 8          # files read inline first in one metadata transaction (a timing probe);
INLINE_MAX = 32           # once that group was fast, this many per transaction (one directory
                          # lookup and one SELECT for all: 50 us a warm file instead of 63 at 8);
                          # no probe after a batch read inline without a remote GET (warm)
# JuiceDataset's readahead: while batches come in order and reads fetch from a remote store, the
# blocks of the files this worker reads next are fetched in the background, this far ahead
READAHEAD_BYTES = 32 * MiB
READAHEAD_FILES = 256     # paths resolved per step of it (one metadata transaction)
# cache_fill="auto": files this big on average (tar shards, large arrays) are read in whole
# blocks, which a block cached with O_DIRECT serves from the disk as fast; smaller ones are
# packed several to a block and read back in pieces, which want the page cache
BIG_FILE = 4 * MiB


# -- error handlers (the webdataset convention: return True to go on, False to stop, or raise) -----
def reraise_exception(exn: BaseException) -> bool:
    """The default handler: every error propagates to the training loop."""
    raise exn


def warn_and_continue(exn: BaseException) -> bool:
    """Log the error at WARNING on the ``torchjuice.data`` logger and go on with the next shard
    (for a shard error) or the next sample (for a ``transform`` error)."""
    log.warning("%s: %s (skipped)", type(exn).__name__, exn)
    return True


def warn_and_stop(exn: BaseException) -> bool:
    """Log the error and end this worker's iteration (the epoch ends early for it)."""
    log.warning("%s: %s (stopping this worker's iteration)", type(exn).__name__, exn)
    return False


def _handle(handler: Callable | None, exn: BaseException) -> bool:
    return (handler or reraise_exception)(exn)


class ShardError(OSError):
    """A shard that cannot be read as a tar archive: a truncated or corrupt header, a member cut
    short by the end of the file. The message names the shard, the member and the byte offset;
    ``member`` is the name of the member being read, when its header could be read."""

    member: str | None = None


# -- URLs --------------------------------------------------------------------------------------------
_BRACE_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$")


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style braces: ``a-{000..002}.tar`` -> ``a-000.tar a-001.tar a-002.tar`` (zero
    padding kept, optional step ``{0..10..2}``), ``{x,y}`` alternatives, several groups, nesting.
    A brace group with neither ``..`` nor ``,`` is kept as written."""
    start = pattern.find("{")
    while start != -1:
        depth, end = 0, -1
        for i in range(start, len(pattern)):
            c = pattern[i]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    end = i
                    break
        if end == -1:
            raise ValueError(f"unbalanced braces in {pattern!r}")
        body, head, tail = pattern[start + 1:end], pattern[:start], pattern[end + 1:]
        m = _BRACE_RANGE.match(body)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            step = abs(int(m.group(3) or 1)) or 1
            padded = any(len(g.lstrip("-")) > 1 and g.lstrip("-").startswith("0")
                         for g in (m.group(1), m.group(2)))        # as bash: {00..10}, not {0..10}
            width = max(len(m.group(1)), len(m.group(2))) if padded else 0
            seq = range(a, b + 1, step) if a <= b else range(a, b - 1, -step)
            return [x for n in seq for x in expand_braces(f"{head}{n:0{width}d}{tail}")]
        parts, depth, cur = [], 0, []
        for c in body:
            if c == "," and depth == 0:
                parts.append("".join(cur))
                cur = []
                continue
            depth += c == "{"
            depth -= c == "}"
            cur.append(c)
        parts.append("".join(cur))
        if len(parts) > 1:
            return [x for p in parts for x in expand_braces(f"{head}{p}{tail}")]
        start = pattern.find("{", end + 1)     # a literal {x}: look further on
    return [pattern]


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return 1 << 62                      # unknown: never "large"


# A DataLoader worker allocates every sample anew and frees a whole batch at once. glibc then gives
# the freed top of its heap back to the kernel (free memory above M_TRIM_THRESHOLD, 128 KiB by
# default, until a large block was once freed), and the next batch faults in fresh zeroed pages:
# for a batch of 32 files of 100 KiB, 800 page faults, about 30 us a sample -- as much as reading
# the sample from the page cache. A worker that reads through torchjuice pins the thresholds
# where glibc's own dynamic rule ends up after freeing a large block (allocations up to 32 MiB
# from the heap, 64 MiB of free heap kept): its batches reuse the same pages. Off with
# TORCHJUICE_MALLOC_TUNE=0; nothing is done on a C library without mallopt (musl, macOS).
MALLOC_MMAP_THRESHOLD = 32 << 20
MALLOC_TRIM_THRESHOLD = 64 << 20
_malloc_tuned_pid = -1


def tune_malloc() -> bool:
    """Pin glibc's heap thresholds for a data-loading process (once per process; see above).
    True if they were set."""
    global _malloc_tuned_pid
    if _malloc_tuned_pid == os.getpid() or os.environ.get("TORCHJUICE_MALLOC_TUNE", "1") == "0":
        return False
    _malloc_tuned_pid = os.getpid()
    ok = pin_malloc(MALLOC_MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD)
    log.debug("malloc thresholds pinned for this DataLoader worker: %s", ok)
    return ok


def _close_quietly(vol) -> None:
    try:
        vol.close()
    except Exception as e:           # the process is ending: a failure here only costs cache fills
        log.debug("closing %r at worker exit: %s", vol, e)


class _Volumes:
    """This process's volumes for ``juice://`` URLs. Pickles as the ``meta`` option plus the engine
    URL each volume name resolved to here (so a spawned worker finds the same engine whatever its
    environment); after a fork or in a spawned worker each volume is connected again through
    ``volume_for``."""

    def __init__(self, meta: str | None = None, resolved: dict | None = None,
                 cache_fill: str = "wait"):
        self.meta = meta
        self.cache_fill = cache_fill        # set on each volume (see Volume.cache_fill)
        self._resolved: dict[str, str] = dict(resolved or {})
        self._pid = -1
        self._vols: dict = {}

    def __getstate__(self):
        return {"meta": self.meta, "resolved": self._resolved, "cache_fill": self.cache_fill}

    def __setstate__(self, state):
        self.__init__(state["meta"], state.get("resolved"), state.get("cache_fill", "wait"))

    def set_fill(self, mode: str, total_bytes: int, files: int = 0) -> None:
        """The cache-fill mode for a data set of ``total_bytes`` (-1: unknown) in ``files`` files:
        ``"auto"`` is ``"direct"`` when the data set is larger than half of this machine's memory
        (the page cache cannot keep it from one epoch to the next); else ``"adaptive"`` for files
        of BIG_FILE bytes and more on average (read in whole blocks, which the next epoch reads
        back from the disk at its speed when the fill had to bypass the page cache), else
        ``"wait"`` (small files packed in blocks: read back in small pieces, from memory). The
        volumes this process holds already take the mode too (sizing a data set connects them)."""
        if mode != "auto" and mode not in CACHE_FILL_MODES:
            raise ValueError(f"cache_fill must be auto or one of {', '.join(CACHE_FILL_MODES)}, "
                             f"not {mode!r}")
        if mode == "auto":
            if total_bytes > _memory_bytes() // 2:
                mode = "direct"
            elif files and total_bytes >= BIG_FILE * files:
                mode = "adaptive"
            else:
                mode = "wait"
        self.cache_fill = mode
        if self._pid == os.getpid():
            for vol in self._vols.values():
                vol.cache_fill = mode

    def resolve(self, name: str) -> str:
        """The engine URL of a volume name, looked up once (then pickled along)."""
        url = self._resolved.get(name)
        if url is None:
            url = self._resolved[name] = find_meta_url(name, self.meta)
        return url

    def get(self, name: str):
        if self._pid != os.getpid():
            self._vols, self._pid = {}, os.getpid()
        vol = self._vols.get(name)
        if vol is None or vol.closed:
            vol = self._vols[name] = volume_for(name, self.resolve(name))
            # a dataset is read epoch after epoch: a cold pass waits for the local cache to take
            # every block rather than leave some uncached for the next epoch to fetch again
            vol.cache_fill = self.cache_fill
            if get_worker_info() is not None:
                tune_malloc()
                # a DataLoader worker ends without running atexit: close the volume from
                # multiprocessing's exit hook, so that its session ends and the blocks queued for
                # the local cache are written (the next epoch's workers find them)
                multiprocessing.util.Finalize(None, _close_quietly, args=(vol,), exitpriority=10)
        return vol

    def remote_gets(self) -> int:
        """Object-store GETs so far of this process's volumes whose store is not local (every
        store but ``file://`` and ``mem://``): how many reads went to the network."""
        return sum(v.get_count for v in list(self._vols.values())
                   if not v.closed and not v.local_store)

    def locate(self, url: str):
        name, path = split_url(url)
        return self.get(name), path

    def read_many(self, urls: Sequence[str]) -> list[bytes]:
        """Whole files, as ``read_bytes``: one metadata transaction for them all when they are
        on one volume (``Volume.read_many``). The first that fails raises."""
        if not urls:
            return []
        where = [split_url(u) for u in urls]
        name = where[0][0]
        if all(n == name for n, _ in where):          # the volume looked up once, not per file
            return self.get(name).read_many([p for _, p in where])
        return [self.get(n).read_bytes(p) for n, p in where]


def list_files(url: str, meta: str | None = None) -> list[tuple[str, int]]:
    """``(url, size)`` of every regular file under ``url`` (a directory, walked recursively, or a
    single file), sorted by URL. One metadata transaction per directory; symlinks are not
    followed."""
    return _list_files(url, meta)[0]


def _list_files(url: str, meta: str | None = None) -> tuple[list[tuple[str, int]], tuple | None]:
    """:func:`list_files`, and for a directory ``(volume name, Listing)`` (see
    ``Volume.list_tree``): where each small file's bytes lay, for reads without a path lookup."""
    name, path = split_url(url)
    vol = volume_for(name, meta)
    top = vol.norm(path)
    attr = vol.getattr(top)
    if attr.is_file:
        return [(f"juice://{name}{top}", attr.length)], None
    if not attr.is_dir:
        raise OSError(f"{url} is neither a file nor a directory")
    files, listing = vol.list_tree(top)
    return [(f"juice://{name}{p}", n) for p, n in files], (name, listing)


def _is_juice(url) -> bool:
    return isinstance(url, str) and url.startswith("juice://")


def _check_url(url) -> str:
    split_url(url)          # raises InvalidURLError naming the bad URL
    return url


class UrlIndex(Sequence):
    """A compact, read-only list of URLs (and sizes, -1 when unknown): one UTF-8 blob and two
    arrays, so a DataLoader worker holds a few Python objects instead of one per file (no
    copy-on-write growth of forked workers), and pickling is fast."""

    def __init__(self, urls: Iterable[str], sizes: Iterable[int] | None = None):
        urls = list(urls)
        enc = [u.encode() for u in urls]
        self._blob = b"".join(enc)
        self._ends = array.array("q")
        pos = 0
        for e in enc:
            pos += len(e)
            self._ends.append(pos)
        self._sizes = array.array("q", sizes if sizes is not None else [-1] * len(urls))
        if len(self._sizes) != len(urls):
            raise ValueError("one size per URL")

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self._ends)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {n} files")
        start = self._ends[i - 1] if i else 0
        return self._blob[start:self._ends[i]].decode()

    def size(self, i: int) -> int:
        return self._sizes[i]

    @property
    def total_size(self) -> int:
        return sum(s for s in self._sizes if s > 0)


# -- map-style ---------------------------------------------------------------------------------------
class _ListedPaths(Sequence):
    """The volume paths of a batch's files, made only for those that ``read_listed`` reads by path
    (most of a listed directory's files are read without theirs)."""

    def __init__(self, urls: UrlIndex, indices: list[int], cut: int):
        self.urls, self.indices, self.cut = urls, indices, cut

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        return self.urls[self.indices[k]][self.cut:]


class _Readahead:
    """JuiceDataset's readahead, per process. A DataLoader with a sequential sampler hands each
    worker batches at a fixed stride (worker ``w`` of ``W`` gets batches ``w, w+W, ...``); a
    remote read of a small file then waits for its block, a GET, while the compute step waits
    for the sample. So while the batches come at that stride and reads still fetch from the
    object store (cold), the blocks that the files of this worker's next batches share (small
    files packed together) are fetched in the background (``Volume.prefetch_files``,
    READAHEAD_BYTES ahead). A warm pass (nothing fetched) and a shuffled one (no stride) start
    nothing; files one to a block turn it off (their batch's reads already overlap on threads,
    and a prefetched block costs them a copy out of the memory buffer)."""

    def __init__(self):
        self.prev: int | None = None       # the first index of the previous batch
        self.run = 0                       # batches in a row that came at the stride
        self.upto = -1                     # files up to this index are being fetched already
        self.span = 0                      # this worker's files the last step covered
        self.cold = False                  # reads fetch from afar, or the last step did
        self.off = False                   # the files do not share blocks: no readahead
        self.gets = 0                      # the remote GET count after the previous batch
        self.pool: ThreadPoolExecutor | None = None
        self.busy: Future | None = None
        self.pid = -1

    def after(self, indices: list[int], ds: "JuiceDataset") -> None:
        if not indices or self.off:
            return
        first, b = indices[0], len(indices)
        prev, self.prev = self.prev, first
        gets, self.gets = self.gets, ds._vols.remote_gets()
        if self.gets != gets:
            self.cold = True                # a read fetched from afar
        info = get_worker_info()
        stride = b * (info.num_workers if info is not None else 1)
        self.run = self.run + 1 if prev is not None and first - prev == stride else 0
        if self.run < 2 or indices != list(range(first, first + b)):
            return                          # not (yet) the order a sequential sampler deals
        if not self.cold or self.busy is not None and not self.busy.done():
            return                          # warm (nothing fetched from afar), or still busy
        if (self.upto - first - b + 1) * b // stride * 2 > self.span:
            return                          # more than half a step is still ahead
        if self.pid != os.getpid():
            self.pool, self.pid = ThreadPoolExecutor(1, "tj-readahead"), os.getpid()
        self.busy = self.pool.submit(self._fetch, ds, first, b, stride)

    def _fetch(self, ds: "JuiceDataset", first: int, b: int, stride: int) -> None:
        """Start fetching the files of this worker's next batches, READAHEAD_BYTES of them."""
        n = len(ds.urls)
        want = []
        for k in range(first + stride, n, stride):
            want += [j for j in range(k, min(k + b, n)) if j > self.upto]
            if len(want) >= READAHEAD_FILES:
                break
        want = want[:READAHEAD_FILES]
        self.cold = False
        try:
            vol, paths = None, []
            for j in want:                          # one volume at a time
                v, path = ds._vols.locate(ds.urls[j])
                if vol is not None and v is not vol:
                    break
                vol = v
                paths.append(path)
            if vol is not None:
                done, shared, started = vol.prefetch_files(paths, READAHEAD_BYTES)
                self.cold = started > 0
                self.off = not shared           # files one to a block: nothing to gain
                if done:
                    self.upto, self.span = want[done - 1], done
        except Exception as e:               # only a speed-up: the reads report real errors
            log.debug("dataset readahead failed: %s", e)


class JuiceDataset(Dataset):
    """Map-style dataset: item ``i`` is the content of the ``i``-th file.

    ``url_or_list`` is a directory URL (every regular file under it, recursively, sorted by URL;
    listed with one metadata call per directory), a brace pattern
    (``juice://vol/img/{00000..09999}.jpg``) or a list of ``juice://`` URLs (kept in the given order,
    not checked until read).

    An item is ``transform(raw)`` (``raw`` when ``transform`` is None), where ``raw`` is the file's
    ``bytes`` — or the pair ``(url, bytes)`` with ``with_url=True`` (for labels taken from the
    path). Each item is one open + one read; ``DataLoader`` batches are read in parallel threads
    (``__getitems__``), ``io_threads`` at a time. Works with any sampler, ``DistributedSampler``
    included. ``ds.urls[i]`` is the URL of item ``i``.

    A dataset made from a directory keeps, from its listing, where each small file's bytes lie
    (``Volume.list_tree``): a batch then checks in one metadata read that the files, and the
    directories on their paths, are unchanged, and reads them without a path lookup each
    (``Volume.read_listed``); a file changed since is read by path, as it is now.

    ``cache_fill`` (``"auto"``): how reads fill the local disk cache (see ``Volume.cache_fill``):
    for a data set that fits in half of this machine's memory, ``"wait"`` (every block cached,
    through the page cache, so the next epoch reads memory) for files under ``BIG_FILE`` (4 MiB) on
    average, ``"adaptive"`` (through the page cache while the fill keeps up, with ``O_DIRECT`` when
    it falls behind) for larger ones; ``"direct"`` (``O_DIRECT``: no page cache to fill and evict)
    for a larger data set; or give the mode.
    """

    def __init__(self, url_or_list, transform: Callable | None = None, *, with_url: bool = False,
                 meta: str | None = None, io_threads: int = 8, cache_fill: str = "auto"):
        self.transform = transform
        self.with_url = with_url
        self.io_threads = io_threads
        self._vols = _Volumes(meta)
        self._vols.set_fill(cache_fill, -1)             # checked now; sized below
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = -1
        self._threaded = False              # the last batch's reads were slow (remote)
        self._warm = False                  # the last batch was read inline, nothing remote
        self._ahead = _Readahead()
        self._listing: tuple | None = None  # (volume name, Listing) of a listed directory
        if url_or_list is None:             # from_manifest fills the index
            self.urls = UrlIndex([])
            return
        if isinstance(url_or_list, str):
            if "{" in url_or_list:
                urls = [_check_url(u) for u in expand_braces(url_or_list)]
                self.urls = UrlIndex(urls)
            else:
                files, self._listing = _list_files(url_or_list, meta)
                if not files:
                    raise ValueError(f"no files under {url_or_list}")
                self.urls = UrlIndex((u for u, _ in files), (s for _, s in files))
                self._vols.resolve(split_url(url_or_list)[0])
                self._vols.set_fill(cache_fill, self.urls.total_size, len(self.urls))
                return
        else:
            urls = [_check_url(u) for u in url_or_list]
            if not urls:
                raise ValueError("JuiceDataset: the list of URLs is empty")
            self.urls = UrlIndex(urls)
        self._resolve_names()

    def _resolve_names(self) -> None:
        for name in {split_url(self.urls[i])[0] for i in range(len(self.urls))}:
            self._vols.resolve(name)

    @property
    def meta(self) -> str | None:
        return self._vols.meta

    def __len__(self) -> int:
        return len(self.urls)

    def __repr__(self) -> str:
        return f"<JuiceDataset {len(self)} files>"

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_pool"], state["_pool_pid"], state["_threaded"] = None, -1, False
        state["_warm"] = False
        state["_ahead"] = _Readahead()
        return state

    def _read(self, i: int):
        return self._timed_read(i)[0]

    def _timed_read(self, i: int) -> tuple:
        """``(item, seconds the read took)`` -- the transform is not timed."""
        url = self.urls[i]
        vol, path = self._vols.locate(url)
        t = time.perf_counter()
        data = vol.read_bytes(path)
        took = time.perf_counter() - t
        return self._item(url, data), took

    def _item(self, url: str, data: bytes):
        raw = (url, data) if self.with_url else data
        return self.transform(raw) if self.transform is not None else raw

    def _read_group(self, indices: list[int]) -> list:
        """Items ``indices``, their files read with one metadata transaction."""
        if self._listing is None:
            datas = self._vols.read_many([self.urls[i] for i in indices])
        else:                               # no path lookups while the files are as listed
            name, listing = self._listing
            paths = _ListedPaths(self.urls, indices, len("juice://") + len(name))
            datas = self._vols.get(name).read_listed(listing, indices, paths)
        if self.transform is None and not self.with_url:
            return datas
        return [self._item(self.urls[i], d) for i, d in zip(indices, datas)]

    def __getitem__(self, i: int):
        i = int(i)
        item = self._read(i)
        self._ahead.after([i], self)
        return item

    def __getitems__(self, indices: Sequence[int]) -> list:
        """A batch of items (the DataLoader calls this). Read inline while reads are local and
        fast; on ``io_threads`` threads, so that latencies overlap, once they are slow (see
        ``SLOW_READ``)."""
        indices = [int(i) for i in indices]
        out = self._read_batch(indices)
        self._ahead.after(indices, self)
        return out

    def _read_batch(self, indices: list[int]) -> list:
        if len(indices) <= 1:
            return [self._read(i) for i in indices]
        out: list = []
        if not self._threaded or self.io_threads <= 1:
            # inline, a few files per metadata transaction, while reads stay fast
            pos, first = 0, INLINE_MAX if self._warm else INLINE_GROUP
            start = self._vols.remote_gets()
            while pos < len(indices):
                group = indices[pos:pos + (first if pos == 0 else INLINE_MAX)]
                t, gets = time.perf_counter(), self._vols.remote_gets()
                out += self._read_group(group)
                pos += len(group)
                if (time.perf_counter() - t) / len(group) > SLOW_READ and self.io_threads > 1 \
                        and self._vols.remote_gets() > gets:
                    self._threaded = True
                    break
            else:
                self._warm = self._vols.remote_gets() == start
                return out
        self._warm = False
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(self.io_threads, "tj-dataset")
            self._pool_pid = os.getpid()
        gets = self._vols.remote_gets()
        rest = list(self._pool.map(self._timed_read, indices[len(out):]))
        slow = sum(1 for _, took in rest if took > SLOW_READ)
        # mostly fast again, or nothing fetched from afar: inline next time
        self._threaded = slow * 2 >= len(rest) and self._vols.remote_gets() > gets
        out.extend(item for item, _ in rest)
        return out

    # manifests: the index saved once, loaded without listing again
    def save_manifest(self, path_or_url: str) -> None:
        """Write the index (URLs and sizes) as JSON to a local path or a ``juice://`` URL,
        atomically (a temporary name, then a rename)."""
        doc = {"format": MANIFEST_FORMAT, "version": 1, "count": len(self.urls),
               "files": [[self.urls[i], self.urls.size(i)] for i in range(len(self.urls))]}
        data = json.dumps(doc, separators=(",", ":")).encode()
        tmp_suffix = f".tmp-{os.getpid()}-{threading.get_ident()}"
        if _is_juice(path_or_url):
            vol, path = self._vols.locate(path_or_url)
            vol.write_bytes(path + tmp_suffix, data)
            vol.rename(path + tmp_suffix, path)
        else:
            with open(path_or_url + tmp_suffix, "wb") as f:
                f.write(data)
            os.replace(path_or_url + tmp_suffix, path_or_url)

    @classmethod
    def from_manifest(cls, path_or_url: str, transform: Callable | None = None, *,
                      meta: str | None = None, **kwargs) -> "JuiceDataset":
        """A dataset over the files a manifest lists (see :meth:`save_manifest`), in its order."""
        if _is_juice(path_or_url):
            with open_url(path_or_url, "rb", meta=meta) as f:
                raw = f.read()
        else:
            with open(path_or_url, "rb") as f:
                raw = f.read()
        try:
            doc = json.loads(raw)
            if doc.get("format") != MANIFEST_FORMAT:
                raise ValueError("not a torchjuice manifest")
            files = doc["files"]
        except (ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"{path_or_url}: not a torchjuice manifest ({e})") from None
        ds = cls(None, transform, meta=meta, **kwargs)
        ds.urls = UrlIndex((_check_url(u) for u, _ in files), (int(s) for _, s in files))
        ds._resolve_names()
        ds._vols.set_fill(kwargs.get("cache_fill", "auto"), ds.urls.total_size, len(ds.urls))
        return ds


# -- shards --------------------------------------------------------------------------------------------
def _resolve_shards(urls, vols: _Volumes, handler) -> tuple[list[tuple[str, int]], list]:
    """``(url, size)`` of each shard: brace patterns expanded, directories listed (recursively,
    sorted), every named file checked with one ``scandir`` per parent directory. And for each
    listed directory ``(first, end, volume name, Listing)``: shards ``first..end-1`` are its
    files, for :meth:`Volume.read_listed`."""
    if isinstance(urls, str):
        named = expand_braces(urls)
    else:
        named = [u for x in urls for u in (expand_braces(x) if isinstance(x, str) else [x])]
    if not named:
        raise ValueError("JuiceIterableDataset: no shard URLs given")
    for u in named:
        _check_url(u)
    meta = vols.meta
    by_dir: dict[tuple[str, str], dict] = {}
    for u in named:
        name, path = split_url(u)
        vol = vols.get(name)
        p = vol.norm(path)
        key = (name, posixpath.dirname(p))
        if key not in by_dir:
            try:
                by_dir[key] = dict(vol.scandir(key[1])) if p != "/" else {}
            except (FileNotFoundError, NotADirectoryError):
                by_dir[key] = {}
    out: list[tuple[str, int]] = []
    listed: list[tuple[int, int, str, object]] = []
    missing: list[str] = []
    for u in named:
        name, path = split_url(u)
        p = vols.get(name).norm(path)
        attr = by_dir[(name, posixpath.dirname(p))].get(posixpath.basename(p)) if p != "/" else None
        if p == "/" or (attr is not None and attr.is_dir) or (attr is not None and attr.is_symlink):
            files, listing = _list_files(u, meta)     # a directory (or a link): every file under it
            if not files and not (attr is not None and attr.is_symlink):
                raise ValueError(f"no files under {u}")
            if listing is not None and files:
                listed.append((len(out), len(out) + len(files), *listing))
            out.extend(files)
        elif attr is None:
            missing.append(u)
        else:
            out.append((f"juice://{name}{p}", attr.length))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        exn = FileNotFoundError(f"{len(missing)} of {len(named)} shards not found: {shown}")
        _handle(handler, exn)           # raises by default; else the missing shards are dropped
    if not out:
        raise ValueError(f"no shards to read in {urls!r}")
    return out, listed


def _is_tar(url: str) -> bool:
    return url.endswith(".tar")


def _split_name(fname: str) -> tuple[str, str] | None:
    """WebDataset's convention: the key is the path up to the first dot of the basename, the
    field is the rest (lower-cased). None for a name without a dot."""
    d, _, base = fname.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{d}/{stem}" if d else stem), ext.lower()


def _parse_pax(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        if sp == -1:
            break
        try:
            n = int(data[pos:sp])
        except ValueError:
            raise ValueError("bad pax header record") from None
        if n <= 0:
            break
        rec = data[sp + 1:pos + n].rstrip(b"\n")
        k, _, v = rec.partition(b"=")
        out[k.decode("utf-8", "replace")] = v.decode("utf-8", "replace")
        pos += n
    return out


class _Windows:
    """Bytes of one shard arriving as successive windows; exact reads across window edges (only
    the bytes that straddle an edge are copied twice)."""

    def __init__(self, windows: Iterator, release: Callable | None = None):
        self._it = windows
        self._release = release    # takes back a window's buffer once it is consumed
        self._obj = None
        self._buf = memoryview(b"")
        self._pos = 0
        self.offset = 0            # bytes consumed from the shard

    def _next_window(self) -> bool:
        for w in self._it:
            if isinstance(w, BaseException):
                raise w
            if len(w):
                old, self._obj = self._obj, w
                self._buf, self._pos = memoryview(w), 0
                if old is not None and self._release is not None:
                    self._release(old)
                return True
        return False

    def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or fewer at the end of the shard."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos >= n:
            self._pos = pos + n
            self.offset += n
            return bytes(buf[pos:pos + n])
        parts = [bytes(buf[pos:])]
        need = n - len(parts[0])
        while need > 0 and self._next_window():
            take = self._buf[:need]
            parts.append(bytes(take))
            self._pos = len(take)
            need -= len(take)
        if need > 0:
            self._buf, self._pos = memoryview(b""), 0
        out = b"".join(parts)
        self.offset += len(out)
        return out

    def skip(self, n: int) -> int:
        done = 0
        while done < n:
            avail = len(self._buf) - self._pos
            if avail == 0:
                if not self._next_window():
                    break
                continue
            k = min(n - done, avail)
            self._pos += k
            done += k
        self.offset += done
        return done


_NUL = b"\0"


def _octal(field: bytes) -> int:
    if field[0] & 0x80:                       # GNU base-256 for big numbers
        n = int.from_bytes(field[1:], "big")
        return n - (1 << (8 * len(field) - 8)) if field[0] & 0x40 else n
    digits = field.split(_NUL, 1)[0].strip(b" ")
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise ValueError(f"bad number field {field!r}") from None


def _parse_header(buf: bytes) -> tuple[str, bytes, int]:
    """``(name, type, size)`` of a 512-byte ustar/GNU/v7 header, checksum verified. A few
    microseconds, where ``tarfile.TarInfo.frombuf`` takes about a hundred."""
    want = _octal(buf[148:156])
    got = 256 + sum(buf[:148]) + sum(buf[156:])
    if want != got and want != 256 + sum(b - 256 if b > 127 else b for b in buf[:148] + buf[156:]):
        raise ValueError("bad checksum")
    kind = buf[156:157]
    size = _octal(buf[124:136])
    name = buf[:100].split(_NUL, 1)[0].decode("utf-8", "surrogateescape")
    if kind not in tarfile.GNU_TYPES:
        prefix = buf[345:500].split(_NUL, 1)[0]
        if prefix and buf[257:263] == b"ustar\0":
            name = prefix.decode("utf-8", "surrogateescape") + "/" + name
    if kind == tarfile.AREGTYPE and name.endswith("/"):
        kind = tarfile.DIRTYPE
    return name, kind, size


def iter_tar(url: str, windows: Iterator, release: Callable | None = None
             ) -> Iterator[tuple[str, bytes]]:
    """``(member name, bytes)`` of each regular file in an uncompressed tar stream (an iterator of
    byte windows; ``release`` gets each window back once consumed). Raises :class:`ShardError`
    (naming the shard, member and offset) for a truncated or corrupt archive."""
    src = _Windows(windows, release)
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        at = src.offset
        buf = src.read(tarfile.BLOCKSIZE)
        if not buf:
            return                                      # end of file right after a member: fine
        if len(buf) < tarfile.BLOCKSIZE:
            raise ShardError(f"{url}: truncated tar header at byte {at}")
        if buf.count(0) == tarfile.BLOCKSIZE:
            return                                      # end-of-archive marker
        try:
            name0, kind, size = _parse_header(buf)
        except ValueError as e:
            raise ShardError(f"{url}: corrupt tar header at byte {at} ({e})") from None
        if "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                raise ShardError(f"{url}: corrupt pax size at byte {at}") from None
        padded = (size + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE * tarfile.BLOCKSIZE
        name = long_name or pax.get("path") or name0
        if kind in (tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE, tarfile.XGLTYPE,
                    tarfile.GNUTYPE_LONGLINK, tarfile.SOLARIS_XHDTYPE):
            data = src.read(size)
            if len(data) < size or src.skip(padded - size) < padded - size:
                raise ShardError(f"{url}: truncated tar archive: extended header at byte {at} "
                                 f"cut short")
            if kind == tarfile.GNUTYPE_LONGNAME:
                long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            elif kind in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):
                try:
                    pax = _parse_pax(data)
                except ValueError as e:
                    raise ShardError(f"{url}: corrupt pax header at byte {at} ({e})") from None
            continue
        long_name, pax = None, {}
        if kind in tarfile.REGULAR_TYPES and kind != tarfile.GNUTYPE_SPARSE:
            data = src.read(size)
            if len(data) < size:
                err = ShardError(f"{url}: truncated tar member {name!r}: {len(data)} of {size} "
                                 f"bytes before the end of the file (member header at byte {at})")
                err.member = name
                raise err
            src.skip(padded - size)         # padding may be cut at the very end: the data is whole
            yield name, data
        else:                                           # directories, links, devices: no sample
            if src.skip(padded) < padded:
                raise ShardError(f"{url}: truncated tar archive at member {name!r}")


def group_samples(url: str, members: Iterable[tuple[str, bytes]]) -> Iterator[dict]:
    """WebDataset grouping: consecutive members with the same key form one sample
    ``{"__key__": key, "__url__": url, field: bytes, ...}``. A member name without an extension
    cannot be a field: it is skipped with a warning; a field twice in one sample is an error."""
    cur: dict | None = None
    members = iter(members)
    while True:
        try:
            fname, data = next(members)
        except StopIteration:
            break
        except ShardError as e:
            # a member cut short: the pending sample is whole if that member is another key's
            kf = _split_name(e.member) if e.member else None
            if cur is not None and kf is not None and kf[0] != cur["__key__"]:
                yield cur
            raise
        kf = _split_name(fname)
        if kf is None:
            log.warning("%s: member %r has no extension (key.field); skipped", url, fname)
            continue
        key, field = kf
        if cur is not None and cur["__key__"] == key:
            if field in cur:
                raise ShardError(f"{url}: duplicate field {field!r} in sample {key!r}")
            cur[field] = data
            continue
        if cur is not None:
            yield cur
        cur = {"__key__": key, "__url__": url, field: data}
    if cur is not None:
        yield cur


def _shard_error(exn: Exception, url: str, count: int) -> Exception:
    """The error of a shard, naming it and how many of its samples came before the error."""
    note = f" ({count} samples of this shard were read before the error)" if count else ""
    if isinstance(exn, ShardError):
        err: Exception = ShardError(f"{exn}{note}")
    elif isinstance(exn, OSError) and exn.errno:
        try:
            err = type(exn)(exn.errno, f"{exn.strerror}{note}", url)
        except Exception:
            err = ShardError(f"{url}: {exn}{note}")
    else:
        err = ShardError(f"{url}: {type(exn).__name__}: {exn}{note}")
    err.__cause__ = exn
    return err


def _whole_file_sample(url: str, data: bytes) -> dict:
    path = "/" + url[len("juice://"):].partition("/")[2]      # the URL was checked when listed
    d, _, base = path.rpartition("/")
    kf = _split_name(base)
    if kf is None:
        return {"__key__": path, "__url__": url, "data": data}
    return {"__key__": f"{d}/{kf[0]}", "__url__": url, kf[1]: data}


class _Unit(collections.namedtuple("_Unit", "shard url offset length last")):
    """One read of the prefetch pipeline: ``length`` bytes at ``offset`` (-1: to the end)."""


class Prefetcher:
    """Reads units (whole files, or windows of shards) ahead of the consumer on a small thread
    pool, ``max_bytes`` at most in flight, and hands them back in order as ``(unit, data)`` —
    ``data`` is the exception when a read failed. Only the Volume API is used (one open per unit).

    Whole files are read inline in the consumer's thread first, where a thread hand-off would
    cost as much as a read served locally (see ``SLOW_READ``): ``INLINE_GROUP`` of them as a
    probe, then ``INLINE_MAX`` per metadata transaction. A slow group that fetched from a remote
    store (or a shard window) switches to reading ahead on the pool; ``FAST_RUN`` fast reads in
    a row there switch back."""

    FAST_RUN = 32            # this many fast whole-file reads in a row: read inline

    def __init__(self, vols: _Volumes, units: Iterable[_Unit], threads: int = 8,
                 max_bytes: int = 64 * MiB, max_units: int = 64, listed: Sequence = ()):
        self._vols = vols
        self._listed = listed               # (first, end, volume name, Listing): _resolve_shards
        self._units = iter(units)
        self._peeked: _Unit | None = None
        self._pending: collections.deque = collections.deque()
        self._bytes = 0
        self._max_bytes = max_bytes
        self._max_units = max_units
        self._pool = ThreadPoolExecutor(max(1, threads), "tj-prefetch")
        self._free: list[bytearray] = []     # window buffers handed back: fresh memory is slow
        self._done = False
        # start inline with a probe of INLINE_GROUP files: timing reads on the pool would take
        # the GIL waits of 8 threads beside the consumer for slowness, and keep them there
        self._inline, self._probe = True, True
        self._fast = 0                       # fast whole-file reads in a row
        self._ready: collections.deque = collections.deque()   # read inline, not handed out yet
        self._fill()

    def recycle(self, buf) -> None:
        """Take back a window buffer the consumer has finished with (reused by a later read)."""
        if isinstance(buf, bytearray) and len(self._free) < 4:
            self._free.append(buf)

    def _estimate(self, u: _Unit) -> int:
        return u.length if u.length > 0 else 1 * MiB

    def _next_unit(self) -> _Unit | None:
        u, self._peeked = self._peeked, None
        if u is None and not self._done:
            u = next(self._units, None)
            if u is None:
                self._done = True
        return u

    def _fill(self) -> None:
        while not self._inline and len(self._pending) < self._max_units and \
                (not self._pending or self._bytes < self._max_bytes):
            u = self._next_unit()
            if u is None:
                break
            self._pending.append((u, self._pool.submit(self._timed_read, u)))
            self._bytes += self._estimate(u)

    def _timed_read(self, u: _Unit) -> tuple:
        t = time.perf_counter()
        data = self._read(u)
        return data, time.perf_counter() - t

    def _read(self, u: _Unit):
        vol, path = self._vols.locate(u.url)
        if u.offset == 0 and u.length < 0:
            return vol.read_bytes(path)
        with vol.open(path, "rb", buffering=0) as f:
            f.seek(u.offset)
            if u.length < 0:
                return f.readall()
            buf = None
            while self._free:
                try:
                    b = self._free.pop()
                except IndexError:
                    break
                if len(b) == u.length:
                    buf = b
                    break
            if buf is None:
                buf = bytearray(u.length)
            view, got = memoryview(buf), 0
            while got < u.length:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
            if got < u.length:
                del view
                del buf[got:]
            return buf

    def __iter__(self):
        return self

    def _read_group(self, units: list[_Unit]) -> list[tuple]:
        """``(unit, data or exception)`` for whole files ``units``: one metadata transaction for
        them all when they are on one volume (``Volume.read_many``); one by one if any fails, so
        each gets its own result. Files of one listed directory are read through its listing
        (``Volume.read_listed``: no path lookups)."""
        try:
            first = units[0].shard
            for lo, hi, name, listing in self._listed:
                if lo <= first < hi and all(lo <= u.shard < hi for u in units):
                    cut = len(f"juice://{name}")
                    datas = self._vols.get(name).read_listed(
                        listing, [u.shard - lo for u in units], [u.url[cut:] for u in units])
                    return list(zip(units, datas))
            return list(zip(units, self._vols.read_many([u.url for u in units])))
        except Exception:
            pass
        out: list[tuple] = []
        for u in units:
            try:
                out.append((u, self._read(u)))
            except BaseException as e:          # handed to the consumer, raised there
                out.append((u, e))
        return out

    def __next__(self):
        if self._ready:
            return self._ready.popleft()
        if not self._pending:
            if not self._inline:
                raise StopIteration
            units: list[_Unit] = []
            limit, self._probe = (INLINE_GROUP if self._probe else INLINE_MAX), False
            while len(units) < limit:
                u = self._next_unit()
                if u is None:
                    break
                if u.offset != 0 or u.length >= 0:      # a shard window: back to the pool
                    self._peeked = u
                    break
                units.append(u)
            if units:
                t, gets = time.perf_counter(), self._vols.remote_gets()
                self._ready.extend(self._read_group(units))
                if (time.perf_counter() - t) / len(units) > SLOW_READ and \
                        self._vols.remote_gets() > gets:
                    self._inline, self._fast = False, 0  # remote again: read ahead on the pool
                    self._fill()
                return self._ready.popleft()
            if self._peeked is None:
                raise StopIteration
            self._inline, self._fast = False, 0
            self._fill()
        u, fut = self._pending.popleft()
        self._bytes -= self._estimate(u)
        try:
            data, took = fut.result()
            whole = u.offset == 0 and u.length < 0
            self._fast = self._fast + 1 if whole and took <= SLOW_READ else 0
            if self._fast >= self.FAST_RUN:
                self._inline = True             # what is pending drains first
        except BaseException as e:              # handed to the consumer, raised there
            data = e
        self._fill()
        return u, data

    def close(self) -> None:
        self._done = True
        self._ready.clear()
        self._pending.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)


def plan_units(shards: Sequence[tuple[str, int]], order: Iterable[int], read_size: int):
    """The reads of a list of shards: windows of ``read_size`` for tar shards (the last window
    reads to the end, so a file that grew since it was listed is read whole), one read per file
    otherwise."""
    for sid in order:
        url, size = shards[sid]
        if not _is_tar(url) or size <= read_size:
            yield _Unit(sid, url, 0, -1, True)
            continue
        off = 0
        while off + read_size < size:
            yield _Unit(sid, url, off, read_size, False)
            off += read_size
        yield _Unit(sid, url, off, -1, True)


def _shard_windows(reader: Prefetcher, first: tuple) -> Iterator:
    """The windows of one shard from the reader, starting with ``first`` (already taken)."""
    u, data = first
    yield data
    while not u.last:
        u, data = next(reader)
        yield data


# -- iterable ------------------------------------------------------------------------------------------
_SLOT_EPOCH, _SLOT_GEN, _SLOT_WORKERS_SEEN, _SLOT_RESUME_EPOCH, _SLOT_RESUME_NW, _SLOT_ROTATE = range(6)
_SLOT_POS = 6
_MAX_WORKERS = 1024
_SLOTS = _SLOT_POS + _MAX_WORKERS


class JuiceIterableDataset(IterableDataset):
    """Streams samples from tar shards (or whole files) in a volume.

    ``urls``: a brace pattern (``juice://vol/shards/train-{000000..000099}.tar``), a list of URLs
    (each may be a pattern or a directory), or a directory (every file under it, sorted). A
    ``.tar`` file is a shard of WebDataset samples; any other file is one sample.

    A sample is a dict: ``{"__key__": key, "__url__": shard URL, "jpg": bytes, "cls": bytes, ...}``
    — tar members grouped by key (the member path up to the first dot of its basename; the field
    is the rest, lower-cased). A whole file gives ``{"__key__": path without extension, "__url__":
    url, ext: bytes}`` (``"data"`` when the name has no extension). Items are
    ``transform(sample)`` when ``transform`` is given.

    Order: shard ``i`` of the (per epoch, deterministically shuffled) shard list goes to rank
    ``i % world_size``; a rank's shards are dealt to its DataLoader workers the same way; each
    worker reads its shards in order with ``buffer_size`` samples of shuffle buffer. Everything is a
    function of ``(seed, epoch, rank, world_size, num_workers)``: each sample is read exactly once
    per epoch over all ranks and workers, and the same seed and epoch give the same order. Call
    :meth:`set_epoch` before each epoch (as with ``DistributedSampler``); it reaches persistent
    workers too (shared memory).

    Resume: :meth:`state_dict` records how many samples each worker has produced;
    :meth:`load_state_dict` makes the next pass skip exactly those (their shards are read again,
    not yielded). With DataLoader workers, iterate through :class:`JuiceDataLoader` so the main
    process knows what each worker has delivered.

    Errors: ``handler`` decides (webdataset convention): the default raises; ``warn_and_continue``
    logs and skips the shard (rest of it) or the sample whose ``transform`` failed.

    Reading: each worker reads ahead on ``io_threads`` threads (default: 2 for tar shards larger
    than ``read_size``, 8 for small files), up to ``prefetch_bytes`` in flight, shards in windows of
    ``read_size`` — the next shard is fetched while this one is parsed. ``cache_fill``: as for
    :class:`JuiceDataset` (``"auto"``: ``"direct"`` when the shards are larger than half of this
    machine's memory, else ``"adaptive"`` for shards of 4 MiB and more on average).
    """

    def __init__(self, urls, shuffle: bool = False, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, *, buffer_size: int = 1000,
                 transform: Callable | None = None, handler: Callable | None = None,
                 meta: str | None = None, read_size: int = 8 * MiB,
                 prefetch_bytes: int = 64 * MiB, io_threads: int | None = None,
                 cache_fill: str = "auto"):
        super().__init__()
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        if world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.buffer_size = int(buffer_size)
        self.transform = transform
        self.handler = handler
        self.read_size = max(64 << 10, int(read_size))
        self.prefetch_bytes = int(prefetch_bytes)
        self.io_threads = io_threads
        self._rank, self._world = rank, world_size
        self._explicit_rank = rank is not None
        self._vols = _Volumes(meta)
        self._vols.set_fill(cache_fill, -1)             # checked now; sized below
        self.shards, self._listed = _resolve_shards(urls, self._vols, handler)
        sizes = [n for _, n in self.shards if n >= 0]
        self._vols.set_fill(cache_fill, sum(sizes), len(sizes))
        self._fingerprint = zlib.crc32("\n".join(u for u, _ in self.shards).encode())
        # epoch, resume and "read by workers" live in shared memory: a set_epoch or a
        # load_state_dict in the main process reaches persistent workers
        self._shared = torch.zeros(_SLOTS, dtype=torch.int64).share_memory_()
        self._applied_gen = 0               # the last resume generation this copy has used
        self._progress: dict[int, int] = {}  # worker -> samples produced in this pass (this process)
        self._progress_epoch = 0
        self._progress_workers = 1
        self._loader: dict | None = None    # what a JuiceDataLoader reported (main process)
        self._local_resume: tuple | None = None
        self._stream = 0                    # the stream the pass in this process produces
        self._resolve_rank()

    @property
    def meta(self) -> str | None:
        return self._vols.meta

    def __repr__(self) -> str:
        return f"<JuiceIterableDataset {len(self.shards)} shards shuffle={self.shuffle}>"

    # -- ranks -------------------------------------------------------------------------------------
    def _resolve_rank(self) -> tuple[int, int]:
        if not self._explicit_rank:
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized():
                self._rank, self._world = dist.get_rank(), dist.get_world_size()
            elif self._rank is None:
                self._rank, self._world = 0, 1
        return self._rank, self._world

    def __getstate__(self):
        self._resolve_rank()                # a spawned worker has no process group: take ours
        state = self.__dict__.copy()
        state["_loader"] = None
        return state

    # -- epochs and state ----------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return int(self._shared[_SLOT_EPOCH])

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next pass follows (and forget this epoch's progress)."""
        epoch = int(epoch)
        if epoch != self.epoch:
            self._progress, self._loader = {}, None
        self._shared[_SLOT_EPOCH] = epoch

    def _config(self) -> dict:
        rank, world = self._resolve_rank()
        return {"seed": self.seed, "shuffle": self.shuffle, "buffer_size": self.buffer_size,
                "rank": rank, "world_size": world, "shards": len(self.shards),
                "fingerprint": self._fingerprint}

    def state_dict(self) -> dict:
        """Where this rank's pass stands: the epoch and, per worker, how many samples it has
        produced (a ``JuiceDataLoader`` counts those delivered to the training loop; direct
        iteration counts those handed out). Plain ints: save it with the checkpoint."""
        batches = 0
        if self._loader is not None and self._loader["epoch"] == self.epoch:
            nw, pos = self._loader["num_workers"], self._loader["positions"]
            batches = self._loader["batches"]
        elif self._progress and self._progress_epoch == self.epoch:
            nw, pos = self._progress_workers, self._progress
        elif int(self._shared[_SLOT_WORKERS_SEEN]) and get_worker_info() is None:
            raise RuntimeError(
                "JuiceIterableDataset.state_dict(): this dataset is read by DataLoader worker "
                "processes, whose progress this process cannot see; iterate it through "
                "torchjuice.data.JuiceDataLoader (same arguments as DataLoader) to make it resumable")
        else:                               # nothing read yet: the start (or a pending resume)
            resume = self._pending_resume()
            nw, pos, batches = (resume if resume is not None else (1, {}, 0))
        return {"version": 1, "epoch": self.epoch, **self._config(), "num_workers": nw,
                "positions": [int(pos.get(w, 0)) for w in range(nw)], "batches": int(batches)}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next pass is ``state``'s epoch without the samples it had produced. The
        shards, seed, shuffle settings and rank/world size must be those of the saved run; the
        DataLoader must have the same number of workers (checked when the pass starts)."""
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError("not a JuiceIterableDataset state_dict")
        mine = self._config()
        for k, v in mine.items():
            if state.get(k) != v:
                raise ValueError(f"cannot resume: the state was saved with {k}={state.get(k)!r}, "
                                 f"this dataset has {k}={v!r}")
        nw = int(state["num_workers"])
        positions = [int(p) for p in state["positions"]]
        if not 1 <= nw <= _MAX_WORKERS or len(positions) != nw:
            raise ValueError("corrupt state_dict: num_workers and positions disagree")
        epoch = int(state["epoch"])
        self._progress, self._loader = {}, None
        if get_worker_info() is not None:   # inside a worker (torchdata's StatefulDataLoader):
            self._local_resume = (epoch, nw, positions)       # this copy only
            return
        sh = self._shared
        sh[_SLOT_EPOCH] = epoch
        if not any(positions):              # the start of an epoch: any worker count will do
            return
        sh[_SLOT_RESUME_EPOCH] = epoch
        sh[_SLOT_RESUME_NW] = nw
        sh[_SLOT_ROTATE] = int(state.get("batches", 0))
        sh[_SLOT_POS:_SLOT_POS + nw] = torch.tensor(positions, dtype=torch.int64)
        sh[_SLOT_GEN] = int(sh[_SLOT_GEN]) + 1

    def _pending_resume(self) -> tuple[int, dict, int] | None:
        """``(num_workers, {stream: skip}, batches)`` when a loaded state applies to the next
        pass."""
        sh = self._shared
        gen = int(sh[_SLOT_GEN])
        if gen <= self._applied_gen or int(sh[_SLOT_RESUME_EPOCH]) != int(sh[_SLOT_EPOCH]):
            return None
        nw = int(sh[_SLOT_RESUME_NW])
        return nw, {w: int(sh[_SLOT_POS + w]) for w in range(nw)}, int(sh[_SLOT_ROTATE])

    # -- reading -------------------------------------------------------------------------------------
    def worker_shards(self, epoch: int, rank: int, world_size: int, worker: int,
                      num_workers: int) -> list[int]:
        """Indexes (into ``self.shards``) of the shards one worker reads in an epoch, in order."""
        order = list(range(len(self.shards)))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}:shards").shuffle(order)
        return order[rank::world_size][worker::num_workers]

    def _source(self, sids: list[int]) -> Iterator[dict]:
        """Samples of the worker's shards, in order, before the shuffle buffer."""
        threads = self.io_threads
        if threads is None:
            # a window of a big shard is itself read block-parallel by the volume: two in flight
            # keep the store busy (more only add contention); small files want more at once
            big = sum(1 for i in sids if self.shards[i][1] > self.read_size and _is_tar(self.shards[i][0]))
            threads = 2 if big * 2 >= len(sids) else 8
        reader = Prefetcher(self._vols, plan_units(self.shards, sids, self.read_size),
                            threads, self.prefetch_bytes, listed=self._listed)
        try:
            while True:
                try:
                    first = next(reader)
                except StopIteration:
                    return
                url = first[0].url
                windows = _shard_windows(reader, first)
                count = 0
                try:
                    if _is_tar(url):
                        for sample in group_samples(url, iter_tar(url, windows, reader.recycle)):
                            count += 1
                            yield sample
                    else:
                        data = next(windows)
                        if isinstance(data, BaseException):
                            raise data
                        count = 1
                        yield _whole_file_sample(url, bytes(data))
                except Exception as exn:
                    if not _handle(self.handler, _shard_error(exn, url, count)):
                        return
                for _ in windows:       # what is left of this shard after an error
                    pass
        finally:
            reader.close()

    def _shuffled(self, source: Iterator, rng: random.Random) -> Iterator:
        n = self.buffer_size
        buf: list = []
        for s in source:
            if len(buf) < n:
                buf.append(s)
                continue
            i = rng.randrange(n)
            out, buf[i] = buf[i], s
            yield out
        rng.shuffle(buf)
        yield from buf

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            self._shared[_SLOT_WORKERS_SEEN] = 1
        rank, world = self._check_pass()
        epoch = self.epoch
        skip = 0
        resume = self._pending_resume()
        local = self._local_resume
        if local is not None and local[0] == epoch:
            resume = (local[1], dict(enumerate(local[2])), 0)
            self._local_resume = None
        stream = worker         # which of the epoch's per-worker streams this worker produces
        if resume is not None:
            nw, positions, batches = resume
            self._check_pass(num_workers, nw)
            # the DataLoader asks worker 0 first: rotate the streams so that the batch after the
            # last one delivered comes first, as it would have without the interruption
            stream = (worker + batches) % num_workers
            skip = positions.get(stream, 0)
        self._applied_gen = int(self._shared[_SLOT_GEN])
        self._stream = stream
        worker = stream
        sids = self.worker_shards(epoch, rank, world, worker, num_workers)
        if not sids:
            log.warning("rank %d worker %d of %d has no shard to read (%d shards for %d ranks x %d "
                        "workers): it yields nothing this epoch", rank, worker, num_workers,
                        len(self.shards), world, num_workers)
        self._progress = {worker: skip}
        self._progress_epoch, self._progress_workers = epoch, num_workers
        return self._generate(sids, rank, worker, epoch, skip)

    def _check_pass(self, num_workers: int | None = None, resume_workers: int | None = None):
        """Errors a pass would meet, raised before any worker starts; returns (rank, world)."""
        rank, world = self._resolve_rank()
        if len(self.shards) < world:
            raise ValueError(f"{len(self.shards)} shards cannot be split over {world} ranks: each "
                             "rank needs at least one shard (write more, smaller shards)")
        if resume_workers is None:
            resume = self._pending_resume()
            resume_workers = resume[0] if resume is not None else None
        if num_workers is not None and resume_workers is not None and resume_workers != num_workers:
            raise ValueError(f"cannot resume: the state was saved with {resume_workers} DataLoader "
                             f"workers, this pass has {num_workers}; use num_workers="
                             f"{resume_workers} (the order depends on the number of workers)")
        return rank, world

    def _generate(self, sids, rank, worker, epoch, skip) -> Iterator:
        inner = source = self._source(sids)
        if self.shuffle and self.buffer_size > 1:
            rng = random.Random(f"{self.seed}:{epoch}:{rank}:{worker}:samples")
            source = self._shuffled(inner, rng)
        progress = self._progress
        pos = 0
        try:
            for sample in source:
                pos += 1
                if pos <= skip:
                    continue
                progress[worker] = pos
                if self.transform is None:
                    yield sample
                    continue
                try:
                    item = self.transform(sample)
                except Exception as exn:
                    exn.args = (*exn.args, f"transform of sample {sample.get('__key__')!r} of "
                                           f"{sample.get('__url__')}")
                    if _handle(self.handler, exn):
                        continue
                    return
                yield item
        finally:
            source.close()
            inner.close()

    def _position(self) -> tuple[int, int]:
        """(stream, samples produced) of the pass running in this process."""
        return self._stream, int(self._progress.get(self._stream, 0))


# -- a DataLoader that knows what each worker delivered ---------------------------------------------
class _Tracked(collections.namedtuple("_Tracked", "batch worker position epoch")):
    """A batch with its worker's stream and that stream's position after it (a namedtuple, so
    that ``pin_memory`` pins the batch inside)."""


class _TrackingCollate:
    def __init__(self, collate_fn, dataset: JuiceIterableDataset):
        self.collate_fn = collate_fn
        self._dataset = dataset          # main process (num_workers=0) only: not pickled

    def __getstate__(self):
        return {"collate_fn": self.collate_fn, "_dataset": None}

    def __call__(self, data):
        batch = self.collate_fn(data)
        info = get_worker_info()
        ds = info.dataset if info is not None else self._dataset
        stream, position = ds._position()
        return _Tracked(batch, stream, position, ds.epoch)


class JuiceDataLoader(DataLoader):
    """``torch.utils.data.DataLoader`` (same arguments) that, for a :class:`JuiceIterableDataset`,
    passes with every batch how far its worker's stream has got, so that ``dataset.state_dict()``
    taken in the training loop covers exactly the batches delivered so far — with any number of
    workers, fork or spawn, persistent or not, ``pin_memory``, ``in_order=False``. Batches and
    everything else are unchanged; other datasets are passed through untouched."""

    def __init__(self, dataset, *args, **kwargs):
        super().__init__(dataset, *args, **kwargs)
        if isinstance(dataset, JuiceIterableDataset):
            self.collate_fn = _TrackingCollate(self.collate_fn, dataset)

    def __iter__(self):
        ds = self.dataset
        if not isinstance(ds, JuiceIterableDataset):
            return super().__iter__()
        return self._tracked_iter(ds)

    def _tracked_iter(self, ds: JuiceIterableDataset):
        nw = max(1, self.num_workers)
        ds._check_pass(nw)
        resume = ds._pending_resume()
        use = resume is not None and resume[0] == nw
        epoch = ds.epoch
        ds._loader = report = {"epoch": epoch, "num_workers": nw,
                               "positions": dict(resume[1]) if use else {},
                               "batches": resume[2] if use else 0}
        it = super().__iter__()           # workers have their copies of the dataset now
        if self.num_workers > 0:
            ds._applied_gen = int(ds._shared[_SLOT_GEN])
        for t in it:
            if t.epoch == epoch:
                report["positions"][t.worker] = max(t.position, report["positions"].get(t.worker, 0))
                report["batches"] += 1
            yield t.batch


__all__ = ["JuiceDataset", "JuiceIterableDataset", "JuiceDataLoader", "ShardError", "UrlIndex",
           "expand_braces", "list_files", "iter_tar", "group_samples", "reraise_exception",
           "warn_and_continue", "warn_and_stop", "Prefetcher"]
