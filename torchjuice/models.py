"""Safetensors models on a torchjuice volume, loaded at memory speed.

    sd = tj.load_safetensors("juice://vol/models/llama/", device="cpu")     # a file, or a sharded dir
    with tj.safe_open("juice://vol/models/m.safetensors", framework="pt") as f:
        w = f.get_slice("mlp.up.weight")[rank * 1024:(rank + 1) * 1024]     # reads only those blocks
    tj.save_safetensors(sd, "juice://vol/models/out.safetensors")          # atomic: temp + rename

How a load moves bytes (see docs/models.md):

* The header is read with one small request, then validated completely -- offsets, sizes, dtypes,
  overlaps, the file's length -- before any tensor memory is allocated. A bad file is a
  ``ValueError`` naming it; nothing is read past its end.
* The data region is allocated once (one ``torch.empty``), and each tensor is a view over its own
  slice of that storage (``UntypedStorage[a:b]``, as safetensors' own mmap tensors are): no copy
  after the read, and ``torch.save`` of one tensor writes only its bytes.
* That storage is filled in place with ``readinto`` of the volume's raw file: the range is cut at
  block boundaries and every block is fetched by a thread pool, all submitted in file order, so
  the first tensors are ready (and handed out by :func:`iter_safetensors`) while later blocks are
  still in flight. One raw file handle per worker (a raw file has one position).
* On a CUDA device the blocks land in a ring of pinned staging buffers and go to the device with
  non-blocking copies on a side stream, so reads and host-to-device copies overlap.

* mmap-style: on the CPU, the blocks that lie uncompressed in local files (a ``file://`` store's
  own objects; the disk cache's blocks) are memory-mapped in place instead
  (:func:`_mapped_region`), so a warm load copies nothing: those tensors are views over the page
  cache, copy-on-write, valid after the cache evicts the blocks. A cached block is checksum-checked
  through that mapping (hashed in place, on the pool) before a tensor over it is handed out. The
  rest is read as above.
"""
from __future__ import annotations

import ctypes
import errno
import itertools
import json
import math
import mmap
import operator
import os
import posixpath
import struct
import sys
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

import torch

from . import _pages
from .volume import Volume, split_url, volume_for

__all__ = ["load_safetensors", "safe_open", "save_safetensors", "iter_safetensors"]

#: safetensors' own bound on the header (``MAX_HEADER_SIZE``): a larger length is a corrupt file.
MAX_HEADER_SIZE = 100_000_000
#: the first request reads this much: the 8-byte length and, nearly always, the whole header.
HEADER_PROBE = 64 << 10
#: parallel block reads (the volume's own download pool has 16 too). Local stores use as many:
#: on a busy machine a loader with fewer threads than its neighbours gets a smaller CPU share.
THREADS = 16
LOCAL_THREADS = THREADS
#: CUDA: pinned staging buffers in the ring, and the bytes each holds.
STAGING_BUFFERS = 4
STAGING_BYTES = 64 << 20
#: get_slice: two runs closer than this are read as one range (the gap costs less than a request),
#: and more runs than MAX_RUNS are merged whatever the gap.
GAP_MERGE = 256 << 10
MAX_RUNS = 4096
INDEX_NAME = "model.safetensors.index.json"

# safetensors name -> torch dtype name, in the order safetensors.torch.save_file lays tensors out
# (largest alignment first, then by name). A dtype this torch lacks is left out.
_DTYPE_ORDER = [
    ("U64", "uint64"), ("I64", "int64"), ("F64", "float64"), ("C64", "complex64"),
    ("F32", "float32"), ("U32", "uint32"), ("I32", "int32"), ("BF16", "bfloat16"),
    ("F16", "float16"), ("U16", "uint16"), ("I16", "int16"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E8M0", "float8_e8m0fnu"), ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"), ("I8", "int8"), ("U8", "uint8"), ("F4", "float4_e2m1fn_x2"),
    ("BOOL", "bool"),
]
DTYPES: dict[str, torch.dtype] = {n: getattr(torch, t) for n, t in _DTYPE_ORDER if hasattr(torch, t)}
_NAMES: dict[torch.dtype, str] = {d: n for n, d in DTYPES.items()}
_RANK = {n: i for i, (n, _) in enumerate(_DTYPE_ORDER)}
#: F4 packs two values per byte: the header's shape counts values, the torch tensor counts bytes.
_PACKED = {"F4"}
#: names safetensors knows that no torch dtype holds.
_NO_TORCH = {"F6_E2M3", "F6_E3M2", "C128"}


# -- sources: which volume, which path ---------------------------------------------------------------
def _resolve(url, volume: Volume | None, meta: str | None) -> tuple[Volume, str, str]:
    """``(volume, path, label)``: a ``juice://VOL/path`` URL, or a path inside ``volume``."""
    if isinstance(url, os.PathLike):
        url = os.fspath(url)
    if volume is not None:
        path = volume.norm(url)
        return volume, path, f"juice://{volume.name}{path}"
    name, path = split_url(url)
    vol = volume_for(name, meta)
    path = vol.norm(path)
    return vol, path, f"juice://{name}{path}"


def _threads(vol: Volume, threads: int | None) -> int:
    if threads is not None:
        return max(1, threads)
    return LOCAL_THREADS if vol.local_store else THREADS


def _byte_view(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (the caller keeps ``t`` alive)."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B")


def _pieces(off: int, view: memoryview, bs: int) -> list[tuple[int, memoryview, int, int]]:
    """Cut the file range ``[off, off+len(view))`` at block boundaries: ``(file_offset, base,
    base_offset, length)`` pieces, one block request each."""
    out, pos, n = [], 0, len(view)
    while pos < n:
        k = min(n - pos, bs - (off + pos) % bs)
        out.append((off + pos, view, pos, k))
        pos += k
    return out


def _group(pieces: list, min_bytes: int) -> list[list]:
    """Tasks of at least ``min_bytes`` (a task per small piece costs more than the piece). Inside a
    task, pieces that continue one another are one read."""
    tasks, cur, size = [], [], 0
    for p in pieces:
        if cur:
            foff, base, pos, n = cur[-1]
            if p[1] is base and p[0] == foff + n and p[2] == pos + n:
                cur[-1] = (foff, base, pos, n + p[3])
            else:
                cur.append(p)
        else:
            cur.append(p)
        size += p[3]
        if size >= min_bytes:
            tasks.append(cur)
            cur, size = [], 0
    if cur:
        tasks.append(cur)
    return tasks


class _File:
    """One safetensors file on a volume: its validated header and a few raw handles to read it.

    A raw file has one position, so each concurrent read takes a handle of its own (opened on
    demand, kept for reuse). Every handle must see the same inode: a file replaced while it is
    being read is an error, not a mix of two files."""

    def __init__(self, vol: Volume, path: str, label: str):
        self.vol = vol
        self.path = path
        self.label = label
        self.block_size = vol.format.block_size
        self.use_mmap = True            # whole-file loads map local blocks (see _mapped_region)
        self._lock = threading.Lock()
        self._free: list = []
        self._all: list = []
        self.closed = False
        h = self._open()
        self._all.append(h)
        try:
            self.inode = h.inode
            self.size = h.size()
            self.header = _read_header(h, self.size, label)
        except BaseException:
            self.close()
            raise
        self._free.append(h)

    # -- handles -----------------------------------------------------------------------------------
    def _open(self):
        # no readahead: every block this loader wants is already requested, in order, by its own
        # pool; a prefetch would fetch blocks twice, or blocks nobody asked for (a sliced read)
        return self.vol.open(self.path, "rb", buffering=0, readahead=False)

    def _take(self):
        with self._lock:
            if self.closed:
                raise ValueError(f"{self.label}: file is closed")
            if self._free:
                return self._free.pop()
        h = self._open()
        if h.inode != self.inode:
            h.close()
            raise OSError(errno.ESTALE, f"{self.label} was replaced while being read", self.label)
        with self._lock:
            self._all.append(h)
        return h

    def _give(self, h) -> None:
        with self._lock:
            if self.closed:
                h.close()
            else:
                self._free.append(h)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            handles, self._all, self._free = self._all, [], []
        for h in handles:
            try:
                h.close()
            except Exception:
                pass

    # -- reads -------------------------------------------------------------------------------------
    def read_pieces(self, pieces: list[tuple[int, memoryview, int, int]]) -> None:
        """Read each ``(file_offset, base, base_offset, length)`` piece into its place (in this
        thread)."""
        h = self._take()
        try:
            for off, base, pos, n in pieces:
                view = base[pos:pos + n]
                h.seek(off)
                got = 0
                while got < len(view):
                    n = h.readinto(view[got:])
                    if not n:
                        raise OSError(errno.EIO, f"{self.label}: file ended at byte {off + got}, "
                                                 f"inside a range its header promised", self.label)
                    got += n
        finally:
            self._give(h)

    def submit(self, pool: ThreadPoolExecutor | None, pieces: list) -> list[tuple[int, Future]]:
        """Start reading ``pieces`` (in file order) on ``pool``; returns ``(end_offset, future)`` per
        task, in order. Without a pool (or for a little work) the reads run here and now."""
        min_bytes = min(1 << 20, self.block_size)
        if pool is None or len(pieces) <= 1 and sum(p[3] for p in pieces) < min_bytes:
            self.read_pieces(_group(pieces, 1 << 62)[0] if pieces else [])
            done: Future = Future()
            done.set_result(None)
            return [(pieces[-1][0] + pieces[-1][3] if pieces else 0, done)]
        out = []
        for task in _group(pieces, min_bytes):
            out.append((task[-1][0] + task[-1][3], pool.submit(self.read_pieces, task)))
        return out


def _wait_all(futures: list[tuple[int, Future]]) -> None:
    try:
        for _, f in futures:
            f.result()
    except BaseException:
        _cancel(futures)
        raise


def _cancel(futures) -> None:
    """Stop what has not started and wait for what has (it writes into memory we are dropping)."""
    for _, f in futures:
        f.cancel()
    for _, f in futures:
        try:
            f.exception()
        except BaseException:
            pass


# -- the header ----------------------------------------------------------------------------------------
class _Info:
    """One tensor of a header: ``begin``/``end`` are offsets in the data region."""

    __slots__ = ("name", "dtype_name", "dtype", "shape", "tshape", "begin", "end")

    def __init__(self, name, dtype_name, dtype, shape, tshape, begin, end):
        self.name, self.dtype_name, self.dtype = name, dtype_name, dtype
        self.shape, self.tshape, self.begin, self.end = shape, tshape, begin, end

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class _Header:
    def __init__(self, metadata, infos: list[_Info], data_start: int):
        self.metadata = metadata
        self.infos = infos                          # in file order
        self.by_name = {i.name: i for i in infos}
        self.data_start = data_start


def _read_header(h, size: int, label: str) -> _Header:
    if size < 8:
        raise ValueError(f"{label}: not a safetensors file: {size} bytes, too short for the "
                         "8-byte header length")
    probe = bytearray(min(size, HEADER_PROBE))
    h.seek(0)
    if h.readinto(probe) != len(probe):
        raise OSError(errno.EIO, f"{label}: short read of the header", label)
    (n,) = struct.unpack_from("<Q", probe)
    if n > MAX_HEADER_SIZE:
        raise ValueError(f"{label}: header length {n} is absurd (more than {MAX_HEADER_SIZE} bytes): "
                         "not a safetensors file, or a corrupt one")
    if 8 + n > size:
        raise ValueError(f"{label}: header length {n} runs past the end of the file ({size} bytes): "
                         "truncated or corrupt")
    if 8 + n <= len(probe):
        raw = bytes(probe[8:8 + n])
    else:
        raw = bytearray(n)
        h.seek(8)
        if h.readinto(raw) != n:
            raise OSError(errno.EIO, f"{label}: short read of the header", label)
        raw = bytes(raw)
    return parse_header(raw, size, label)


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_header(raw: bytes, size: int, label: str) -> _Header:
    """Validate a safetensors header completely (the rules safetensors itself applies): JSON
    object, known dtypes, shapes of non-negative ints, ``data_offsets`` whose length matches shape
    x dtype, tensors that tile the data region exactly -- no overlap, no gap, ending at the end of
    the file."""
    def bad(msg: str) -> ValueError:
        return ValueError(f"{label}: invalid safetensors header: {msg}")

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"not UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.startswith("{"):
        raise bad("not a JSON object")
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates)
    except ValueError as e:
        raise bad(f"not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise bad("not a JSON object")
    metadata = doc.pop("__metadata__", None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise bad("__metadata__ must map strings to strings")
    data_start = 8 + len(raw)
    data_len = size - data_start
    infos = []
    for name, spec in doc.items():
        if not isinstance(spec, dict):
            raise bad(f"entry {name!r} is not an object")
        dname, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        if not isinstance(dname, str):
            raise bad(f"tensor {name!r} has no dtype")
        dtype = DTYPES.get(dname)
        if dtype is None:
            if dname in _NO_TORCH:
                raise bad(f"tensor {name!r} has dtype {dname}, which PyTorch cannot hold")
            raise bad(f"tensor {name!r} has unknown dtype {dname!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise bad(f"tensor {name!r} has an invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(_is_int(o) and o >= 0 for o in offsets)):
            raise bad(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if end < begin:
            raise bad(f"tensor {name!r} ends (at {end}) before it begins (at {begin})")
        count = math.prod(shape)
        if dname in _PACKED:
            if not shape or shape[-1] % 2:
                raise bad(f"tensor {name!r} of packed dtype {dname} needs an even last dimension")
            nbytes = count // 2
            tshape = shape[:-1] + [shape[-1] // 2]
        else:
            nbytes = count * dtype.itemsize
            tshape = shape
        if end - begin != nbytes:
            raise bad(f"tensor {name!r}: shape {shape} of {dname} is {nbytes} bytes but "
                      f"data_offsets [{begin}, {end}] span {end - begin}")
        if end > data_len:
            raise bad(f"tensor {name!r} ends at data byte {end}, past the end of the file "
                      f"({max(data_len, 0)} data bytes): truncated or corrupt")
        infos.append(_Info(name, dname, dtype, shape, tshape, begin, end))
    infos.sort(key=lambda i: (i.begin, i.end))
    pos, prev = 0, None
    for i in infos:
        if i.begin < pos:
            raise bad(f"tensors {prev.name!r} and {i.name!r} overlap (bytes {i.begin}..{pos})")
        if i.begin > pos:
            raise bad(f"{i.begin - pos} unused bytes before tensor {i.name!r} (at data byte {pos})")
        pos, prev = i.end, i
    if pos != data_len:
        raise bad(f"the tensors cover {pos} data bytes but the file holds {data_len}: "
                  "truncated, or bytes that no tensor owns")
    return _Header(metadata, infos, data_start)


# -- tensors over a byte region ------------------------------------------------------------------------
def _tensor_at(region: torch.Tensor, off: int, info: _Info) -> torch.Tensor:
    """The tensor ``info`` as a view over bytes ``[off, off+nbytes)`` of ``region`` (a uint8 tensor),
    with a storage of its own bytes; a copy where the address does not suit the dtype."""
    if info.nbytes == 0:
        return torch.empty(info.tshape, dtype=info.dtype, device=region.device)
    storage = region.untyped_storage()
    base = region.storage_offset() + off
    if (storage.data_ptr() + base) % info.dtype.itemsize:
        # unaligned for this dtype (only hand-made files): an aligned copy
        t = torch.empty(info.tshape, dtype=info.dtype, device=region.device)
        t.view(-1).view(torch.uint8).copy_(region[off:off + info.nbytes])
        return t
    view = storage[base:base + info.nbytes]
    t = torch.empty(0, dtype=info.dtype, device=region.device)
    return t.set_(view, 0, info.tshape, _contiguous_strides(info.tshape))


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(strides))


class _Region:
    """Bytes ``[start, end)`` of a file in one uint8 tensor, filled in the background in file order;
    :meth:`wait` blocks until the bytes up to an offset are in."""

    def __init__(self, buf: torch.Tensor, start: int, futures: list[tuple[int, Future]],
                 helper=None):
        self.buf = buf
        self.start = start
        self._futures = deque(futures)     # (end offset, future): contiguous tasks, in file order
        self._done = start                 # every byte before this one is in
        self._helper = helper              # runs one pending task here; False when none is left

    def wait(self, upto: int) -> None:
        try:
            while self._done < upto and self._futures:
                end, f = self._futures[0]
                while self._helper is not None and not f.done():
                    if not self._helper():          # rather than sleep, do some of the work
                        self._helper = None
                f.result()
                self._futures.popleft()
                self._done = end
        except BaseException:
            self.cancel()
            raise

    def wait_all(self) -> None:
        self.wait(self.start + self.buf.numel())

    def cancel(self) -> None:
        _cancel(self._futures)
        self._futures.clear()


def _region(f: _File, start: int, end: int, pool: ThreadPoolExecutor | None,
            out: torch.Tensor | None = None) -> _Region:
    """THE I/O: file bytes ``[start, end)`` as a CPU uint8 tensor (``out`` if given), filling in the
    background, block requests in file order.

    Without ``out``, the blocks that lie in local files (a ``file://`` store's own objects, the
    disk cache's blocks, checked; see :meth:`Volume.local_blocks`) are memory-mapped in place
    instead of read (:func:`_mapped_region`): tensors over them are views of the page cache."""
    n = end - start
    if out is None and n and f.use_mmap and _MMAP_OK:
        region = _mapped_region(f, start, end, pool)
        if region is not None:
            return region
    buf = out if out is not None else torch.empty(n, dtype=torch.uint8)
    futures = f.submit(pool, _pieces(start, _byte_view(buf), f.block_size)) if n else []
    return _Region(buf, start, futures)


# -- the mmap path ---------------------------------------------------------------------------------------
# One anonymous private mapping spans the region; each run of whole pages that a local file holds
# (at a matching page offset) is then mapped over it in place (MAP_FIXED) from that file, privately:
# a tensor written to gets copy-on-write pages, never touching the file. What is left -- holes,
# blocks not local, page fragments at the edges of a piece -- is read into the anonymous pages as
# usual. The mapping is owned by a Python ``mmap`` object held by the region's storage
# (``torch.frombuffer``): when the last tensor goes, its ``munmap`` removes the file mappings too.
# Until then the files' inodes stay alive, whatever the cache or the store does with their names.
# A file mapping of 2 MiB or more asks for huge pages (MADV_HUGEPAGE): a page the load faults in
# comes into the page cache as part of a 2 MiB folio, mapped with one fault, and stays that way for
# every later load. Without it, a block file read in by faults or read() sits in folios of 4-64
# KiB (readahead over a 4 MiB file never ramps up further), and mapping 1.5 GiB of them takes
# ~25,000 faults; a file already cached keeps the folios it has.
_MMAP_OK = sys.platform.startswith("linux") and sys.byteorder == "little"
_PAGE = mmap.PAGESIZE


def _map_file(addr: int, length: int, path: str, local_off: int, need: int) -> bool:
    """Map ``length`` bytes of ``path`` from ``local_off`` at ``addr`` (privately, in place of what
    is there); False if the file is gone or shorter than ``need`` bytes (nothing mapped then)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if os.fstat(fd).st_size < need:           # a page past the end would be SIGBUS
            return False
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        lib = _pages.libc()
        if lib.mmap(addr, length, prot, mmap.MAP_PRIVATE | _pages.MAP_FIXED, fd, local_off) == addr:
            if length >= _pages.HUGE:
                lib.madvise(addr, length, _pages.MADV_HUGEPAGE)
            return True
    finally:
        os.close(fd)
    # a failed MAP_FIXED may have unmapped the range already: anonymous memory back, to read into
    _anonymous(addr, length)
    return False


def _cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _anonymous(addr: int, length: int) -> None:
    """Private anonymous memory at ``addr`` in place of what is mapped there."""
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _pages.MAP_FIXED
    if _pages.libc().mmap(addr, length, prot, flags, -1, 0) != addr:
        e = ctypes.get_errno()
        raise OSError(e, f"mmap: cannot restore memory after a file mapping: {os.strerror(e)}")


def _mapped_region(f: _File, start: int, end: int, pool) -> _Region | None:
    """File bytes ``[start, end)`` as a uint8 tensor whose locally held pages are mappings of the
    local files; None when no byte is local (the caller reads everything).

    A disk-cache file is mapped first and checked through that mapping (its bytes hashed in
    place against the checksums in its trailer, on the pool, in file order beside the reads):
    its pages come from the page cache with no copy, and the hash faults them in, as using the
    tensors would. A block that fails is dropped by the cache; anonymous memory goes back over
    its pages and it is read as usual (fetched again). Tensors over a block are handed out only
    once it is checked (:meth:`_Region.wait`)."""
    local = f.vol.local_blocks(f.path, start, end - start, inode=f.inode, verify=False)
    if not any(p[2] for p in local):
        return None
    if local[-1][0] + local[-1][1] != end:
        raise OSError(errno.EIO, f"{f.label}: file ended before byte {end}, inside a range its "
                                 "header promised", f.label)
    base = start - start % _PAGE                  # file offset at the mapping's first byte
    # Place the file offsets where the local files' huge-page-sized folios can be mapped whole
    # (one fault per 2 MiB, as the kernel places an ordinary file mapping): the block starts,
    # file offset minus local offset, on multiples of 2 MiB.
    holder = mmap.mmap(-1, end - base + _pages.HUGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(holder, dtype=torch.uint8)      # keeps `holder` (and so the maps)
    del holder
    blk = next((p[0] - p[3] for p in local
                if p[2] is not None and (p[0] - p[3]) % _PAGE == 0), base)
    lead = -(whole.data_ptr() - base + blk) % _pages.HUGE
    addr = whole.data_ptr() + lead                # file offset `base` is here
    buf = whole[lead + start - base:lead + end - base]
    view = _byte_view(buf)
    # ops, in file order, covering [start, end): (a, b, None) read; (a, b, ()) mapped, trusted;
    # (a, b, (check, addr, length, local_offset)) mapped, to be checked
    ops: list[tuple[int, int, tuple | None]] = []
    for foff, n, path, loff, check in local:
        a, b = foff, foff + n
        if path is not None and (foff - loff) % _PAGE == 0:
            ma = base + -(-(a - base) // _PAGE) * _PAGE
            # a partial last page only at the very end (the rest of that page is no one's)
            mb = end if b == end else base + (b - base) // _PAGE * _PAGE
            if mb > ma:
                length = -(-(mb - ma) // _PAGE) * _PAGE
                maddr = addr + (ma - base)
                if _map_file(maddr, length, path, loff + (ma - a), loff + (mb - a)):
                    if ma > a:
                        ops.append((a, ma, None))
                    ops.append((ma, mb, () if check is None else
                                (check, maddr, length, loff + (ma - a))))
                    if b > mb:
                        ops.append((mb, b, None))
                    continue
        ops.append((a, b, None))
    bs = f.block_size

    def pieces(a: int, b: int) -> list:
        out, pos = [], a
        while pos < b:
            k = min(b - pos, bs - pos % bs)
            out.append((pos, view, pos - start, k))
            pos += k
        return out

    def run(task: list) -> None:
        reads = []
        for a, b, what in task:
            if what is None:
                reads += pieces(a, b)
            elif what:
                check, maddr, length, loff = what
                if not check.check(view[a - start:b - start], loff):
                    _anonymous(maddr, length)     # the file's pages out; read it as usual
                    reads += pieces(a, b)
        if reads:
            f.read_pieces(reads)

    # Tasks of at least min_bytes of work, in file order; a mapped trusted piece is no work (its
    # pages are not touched here: the first access maps them, 2 MiB at a time where the page
    # cache holds 2 MiB folios, so a load of trusted files returns at once). Tasks that only check
    # (CPU work: faults and hashing) are run by one worker per CPU, taking them in file order --
    # with a thread each on the loader's 16, the first block would be done only when most of
    # them are; tasks that read go to the pool as usual. The thread waiting for the tensors
    # takes check tasks too while it waits (:meth:`_Region.wait`).
    min_bytes = min(1 << 20, bs)
    futures: list[tuple[int, Future]] = []
    checks: list[tuple[Future, list]] = []
    fills: list[tuple[Future, list]] = []
    task: list = []
    work = 0
    for op in ops:
        task.append(op)
        if op[2] != ():
            work += op[1] - op[0]
        if work >= min_bytes or op is ops[-1]:
            fut: Future = Future()
            futures.append((task[-1][1], fut))
            if not work:
                fut.set_result(None)
            elif pool is None or any(o[2] is None for o in task):
                fills.append((fut, task))
            else:
                checks.append((fut, task))
            task, work = [], 0

    def do(fut: Future, task: list) -> None:
        if fut.set_running_or_notify_cancel():
            try:
                run(task)
            except BaseException as e:
                fut.set_exception(e)
            else:
                fut.set_result(None)

    if pool is None:
        for fut, task in fills:
            do(fut, task)
        return _Region(buf, start, futures)
    order = itertools.count()

    def one() -> bool:
        i = next(order)                           # next() of a count is atomic under the GIL
        if i >= len(checks):
            return False
        do(*checks[i])
        return True

    def drive() -> None:
        while one():
            pass

    try:
        for _ in range(min(len(checks), _cpus())):
            pool.submit(drive)
        for fut, task in fills:
            pool.submit(do, fut, task)
    except BaseException:
        _cancel(futures)
        raise
    # the thread that waits for the tensors checks blocks too, while it waits
    return _Region(buf, start, futures, one if checks else None)


# -- device copies ------------------------------------------------------------------------------------
class _HostCopier:
    """The staged pipeline's stand-in for a GPU: plain buffers, synchronous copies. It lets the
    ring-buffer logic of the CUDA path run (and be tested) on a machine without one."""

    def __init__(self, device: torch.device):
        self.device = device

    def host_buffer(self, n: int) -> torch.Tensor:
        return torch.empty(n, dtype=torch.uint8)

    def copy(self, dst: torch.Tensor, src: torch.Tensor):
        dst.copy_(src)
        return None

    def host_free(self, event) -> None:
        pass

    def publish(self, event) -> None:
        pass

    def finish(self) -> None:
        pass


class _CudaCopier(_HostCopier):
    """Pinned staging buffers; non-blocking host-to-device copies on a side stream. The host waits
    for a copy only before it refills that staging buffer; the caller's stream waits for a copy
    before it receives the tensors the copy filled."""

    def __init__(self, device: torch.device):
        super().__init__(device)
        self.stream = torch.cuda.Stream(device)

    def host_buffer(self, n: int) -> torch.Tensor:
        return torch.empty(n, dtype=torch.uint8, pin_memory=True)

    def copy(self, dst: torch.Tensor, src: torch.Tensor):
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return event

    def host_free(self, event) -> None:
        if event is not None:
            event.synchronize()

    def publish(self, event) -> None:
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def finish(self) -> None:
        self.stream.synchronize()


def _device(device) -> torch.device:
    if isinstance(device, int):
        return torch.device("cuda", device)
    return torch.device(device)


# -- loading a whole file --------------------------------------------------------------------------------
def _stream_cpu(f: _File, pool) -> Iterator[tuple[str, torch.Tensor]]:
    hdr = f.header
    region = _region(f, hdr.data_start, f.size, pool)
    try:
        for info in hdr.infos:
            region.wait(hdr.data_start + info.end)
            yield info.name, _tensor_at(region.buf, info.begin, info)
        region.wait_all()
    finally:
        region.cancel()


def _stream_staged(f: _File, pool, copier: _HostCopier, window: int = STAGING_BYTES,
                   nbuf: int = STAGING_BUFFERS) -> Iterator[tuple[str, torch.Tensor]]:
    """Blocks -> a ring of staging buffers -> one device buffer, window by window, in file order;
    reads of the next windows overlap the copy of this one."""
    hdr = f.header
    start, end = hdr.data_start, f.size
    dev = torch.empty(end - start, dtype=torch.uint8, device=copier.device)
    bs = f.block_size
    window = max(bs, window // bs * bs)
    # windows are cut at block boundaries (in file offsets) so no request straddles two
    cuts = [start] + list(range((start // window + 1) * window, end, window)) + [end]
    windows = [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]
    nbuf = max(1, min(nbuf, len(windows)))
    staging = [copier.host_buffer(min(window, end - start)) for _ in range(nbuf)]
    events: list = [None] * nbuf
    inflight: deque = deque()
    infos = deque(hdr.infos)
    try:
        def finish_oldest():
            i, (a, b), futures = inflight.popleft()
            _wait_all(futures)
            j = i % nbuf
            events[j] = copier.copy(dev[a - start:b - start], staging[j][:b - a])
            copier.publish(events[j])
            out = []
            while infos and start + infos[0].end <= b:
                info = infos.popleft()
                out.append((info.name, _tensor_at(dev, info.begin, info)))
            return out

        for i, (a, b) in enumerate(windows):
            if len(inflight) == nbuf:
                yield from finish_oldest()
            j = i % nbuf
            copier.host_free(events[j])           # its last copy must be done before we refill it
            view = _byte_view(staging[j])[:b - a]
            inflight.append((i, (a, b), f.submit(pool, _pieces(a, view, bs))))
        while inflight:
            yield from finish_oldest()
        for info in infos:                        # zero-byte tensors at the very end
            yield info.name, _tensor_at(dev, info.begin, info)
        copier.finish()
    finally:
        for _, _, futures in inflight:
            _cancel(futures)
        copier.finish()


def _stream_file(f: _File, device: torch.device, pool, staged: bool | None = None,
                 window: int = STAGING_BYTES) -> Iterator[tuple[str, torch.Tensor]]:
    if device.type == "cuda":
        yield from _stream_staged(f, pool, _CudaCopier(device), window)
    elif staged:                                  # the CUDA pipeline, run on the CPU (tests)
        yield from _stream_staged(f, pool, _HostCopier(device), window)
    elif device.type == "cpu":
        yield from _stream_cpu(f, pool)
    else:                                         # other accelerators: load, then move
        for name, t in _stream_cpu(f, pool):
            yield name, t.to(device)


def _shards(vol: Volume, path: str, label: str) -> list[tuple[str, set[str] | None]]:
    """The files to load for ``path``: itself, or the shards of a sharded directory (with the
    tensor names the index puts in each)."""
    if not vol.isdir(path):
        return [(path, None)]
    index = posixpath.join(path, INDEX_NAME)
    if not vol.exists(index):
        single = posixpath.join(path, "model.safetensors")
        if vol.exists(single):
            return [(single, None)]
        raise FileNotFoundError(errno.ENOENT, f"{label} is a directory without {INDEX_NAME} or "
                                              "model.safetensors", label)
    try:
        doc = json.loads(vol.read_bytes(index))
        weight_map = doc["weight_map"]
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise ValueError("weight_map must map tensor names to file names")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{label}/{INDEX_NAME}: not a valid index: {e}") from None
    files: dict[str, set[str]] = {}
    for name, fname in weight_map.items():
        files.setdefault(fname, set()).add(name)
    return [(posixpath.join(path, fname), names) for fname, names in sorted(files.items())]


def iter_safetensors(url, device="cpu", *, volume: Volume | None = None, meta: str | None = None,
                     threads: int | None = None,
                     mmap: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` in file order as the bytes arrive (a server can build its model
    while the rest is still loading). Same arguments as :func:`load_safetensors`."""
    vol, path, label = _resolve(url, volume, meta)
    dev = _device(device)
    shards = _shards(vol, path, label)
    files: list[_File] = []
    pool = ThreadPoolExecutor(_threads(vol, threads), "tj-models")
    try:
        for p, _ in shards:
            files.append(_File(vol, p, f"juice://{vol.name}{p}"))
            files[-1].use_mmap = mmap
        seen: dict[str, str] = {}
        for f, (_, names) in zip(files, shards):
            if names is not None:
                missing = names - f.header.by_name.keys()
                if missing:
                    raise ValueError(f"{label}/{INDEX_NAME} lists {sorted(missing)[:5]} in "
                                     f"{f.label}, which does not hold them")
            for info in f.header.infos:
                if info.name in seen:
                    raise ValueError(f"tensor {info.name!r} is in both {seen[info.name]} and "
                                     f"{f.label}")
                seen[info.name] = f.label
        for f in files:
            yield from _stream_file(f, dev, pool)
            f.close()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for f in files:
            f.close()


def load_safetensors(url, device="cpu", *, volume: Volume | None = None, meta: str | None = None,
                     threads: int | None = None, mmap: bool = True) -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file -- or of a directory holding
    ``model.safetensors.index.json`` (the sharded Hugging Face layout) or ``model.safetensors`` --
    into ``device``. Equal to ``safetensors.torch.load_file`` on the same bytes.

    ``url`` is ``juice://VOL/path``, or a path inside ``volume``. ``threads`` block reads run at
    once (default 16). CPU tensors share one allocation, each with a storage of its own bytes.

    ``mmap`` (default True): on the CPU, the blocks that lie uncompressed in local files -- a
    ``file://`` store's objects, the local disk cache's (checksum checked) -- are memory-mapped
    rather than copied, so those tensors are views over the page cache (copy-on-write: writing
    to a tensor never changes the files). The mappings stay valid when the cache evicts the
    blocks or the file is deleted. ``mmap=False`` copies everything into private memory."""
    return dict(iter_safetensors(url, device, volume=volume, meta=meta, threads=threads,
                                 mmap=mmap))


# -- safe_open -----------------------------------------------------------------------------------------
class safe_open:
    """The safetensors ``safe_open`` API over a volume: reads only the byte ranges asked for.

        with tj.safe_open("juice://vol/m.safetensors", framework="pt", device="cpu") as f:
            f.keys(); f.metadata(); f.get_tensor(name); f.get_slice(name)[0:128, :]
    """

    def __init__(self, url, framework: str = "pt", device="cpu", *, volume: Volume | None = None,
                 meta: str | None = None, threads: int | None = None):
        if framework not in ("pt", "torch", "pytorch"):
            raise ValueError(f"framework {framework!r} is not supported: torchjuice gives PyTorch "
                             "tensors (framework='pt')")
        vol, path, self.label = _resolve(url, volume, meta)
        self.device = _device(device)
        self._threads = _threads(vol, threads)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._file = _File(vol, path, self.label)

    def __repr__(self) -> str:
        return f"<torchjuice.safe_open {self.label!r}>"

    def __enter__(self) -> "safe_open":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        self._file.close()

    def _executor(self) -> ThreadPoolExecutor:
        if self._file.closed:
            raise ValueError(f"{self.label}: file is closed")
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._threads, "tj-safe-open")
            return self._pool

    def _info(self, name: str) -> _Info:
        if self._file.closed:
            raise ValueError(f"{self.label}: file is closed")
        try:
            return self._file.header.by_name[name]
        except KeyError:
            raise KeyError(f"{self.label} does not contain tensor {name!r}") from None

    def keys(self) -> list[str]:
        """Tensor names, sorted (as safetensors)."""
        return sorted(self._file.header.by_name)

    def offset_keys(self) -> list[str]:
        """Tensor names in file order."""
        return [i.name for i in self._file.header.infos]

    def metadata(self) -> dict[str, str] | None:
        m = self._file.header.metadata
        return dict(m) if m is not None else None

    def get_tensor(self, name: str) -> torch.Tensor:
        info = self._info(name)
        t = torch.empty(info.tshape, dtype=info.dtype)
        if info.nbytes:
            start = self._file.header.data_start + info.begin
            pool = self._executor() if info.nbytes > self._file.block_size else None
            _region(self._file, start, start + info.nbytes, pool,
                    out=t.view(-1).view(torch.uint8)).wait_all()
        return t if self.device.type == "cpu" else t.to(self.device)

    def get_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor (the whole-file fast path, as :func:`load_safetensors`)."""
        return dict(_stream_file(self._file, self.device, self._executor()))

    def get_slice(self, name: str) -> "SafeSlice":
        return SafeSlice(self, self._info(name))


class SafeSlice:
    """A tensor not read yet: ``get_shape()``, ``get_dtype()``, and ``[...]`` reads just the part
    asked for (ints, slices with a positive step, ``...``), fetching only the blocks behind it."""

    def __init__(self, owner: safe_open, info: _Info):
        self._owner = owner
        self._info = info

    def get_shape(self) -> list[int]:
        return list(self._info.shape)

    def get_dtype(self) -> str:
        return self._info.dtype_name

    @property
    def shape(self) -> list[int]:
        return self.get_shape()

    def __len__(self) -> int:
        if not self._info.shape:
            raise TypeError("len() of a 0-d tensor")
        return self._info.shape[0]

    def __getitem__(self, key) -> torch.Tensor:
        owner, info = self._owner, self._info
        t = read_box(owner._file, info, key, owner._executor)
        return t if owner.device.type == "cpu" else t.to(owner.device)


def _normalize_key(key, shape: list[int]) -> list[tuple[int, int, int, bool]]:
    """Per dimension ``(start, count, step, dropped)`` for a numpy-style key."""
    if not isinstance(key, tuple):
        key = (key,)
    n_ell = sum(1 for k in key if k is Ellipsis)
    if n_ell > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    explicit = len(key) - n_ell
    if explicit > len(shape):
        raise IndexError(f"too many indices for tensor of dimension {len(shape)}")
    full: list = []
    for k in key:
        if k is Ellipsis:
            full.extend([slice(None)] * (len(shape) - explicit))
        else:
            full.append(k)
    full.extend([slice(None)] * (len(shape) - len(full)))
    dims = []
    for d, (k, n) in enumerate(zip(full, shape)):
        if isinstance(k, slice):
            if k.step is not None and operator.index(k.step) <= 0:
                raise ValueError("step must be greater than zero")
            start, stop, step = k.indices(n)
            dims.append((start, len(range(start, stop, step)), step, False))
            continue
        if isinstance(k, bool) or k is None:
            raise TypeError(f"unsupported index {k!r}: use ints, slices and ...")
        try:
            i = operator.index(k)
        except TypeError:
            raise TypeError(f"unsupported index {k!r}: use ints, slices and ...") from None
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of bounds for dimension {d} with size {n}")
        dims.append((i % n, 1, 1, True))
    return dims


def read_box(f: _File, info: _Info, key, executor) -> torch.Tensor:
    """Read ``tensor[key]`` of tensor ``info`` from ``f``: the bounding box of the selection is read
    as runs of contiguous bytes (runs closer than GAP_MERGE merged), then indexed."""
    shape = list(info.tshape)
    if info.dtype_name in _PACKED:
        logical = _normalize_key(key, info.shape)
        if logical and (logical[-1][0] != 0 or logical[-1][1] != info.shape[-1]
                        or logical[-1][2] != 1 or logical[-1][3]):
            raise ValueError(f"{f.label}: {info.name!r} is packed {info.dtype_name}; slice it "
                             "along other dimensions than the last")
        dims = logical[:-1] + [(0, shape[-1], 1, False)] if logical else []
    else:
        dims = _normalize_key(key, shape)
    out_shape = [c for (_, c, _, dropped) in dims if not dropped]
    if any(c == 0 for (_, c, _, _) in dims) or math.prod(shape) == 0:
        return torch.empty(out_shape, dtype=info.dtype)
    nd = len(shape)
    lo = [s for (s, _, _, _) in dims]
    hi = [s + (c - 1) * st + 1 for (s, c, st, _) in dims]
    inner = [math.prod(shape[i + 1:]) for i in range(nd)]
    item = info.dtype.itemsize

    def full(i):
        return lo[i] == 0 and hi[i] == shape[i]

    j = nd - 1
    while j >= 0 and full(j):
        j -= 1
    while j > 0:
        nruns = math.prod(hi[i] - lo[i] for i in range(j))
        if nruns == 1:
            break
        gap = (shape[j] - (hi[j] - lo[j])) * inner[j] * item
        if gap >= GAP_MERGE and nruns <= MAX_RUNS:
            break
        lo[j], hi[j] = 0, shape[j]               # read the gaps too: fewer, larger requests
        j -= 1
        while j >= 0 and full(j):
            j -= 1
    box_shape = [hi[i] - lo[i] for i in range(nd)]
    box = torch.empty(box_shape, dtype=info.dtype)
    out = _byte_view(box)
    base = f.header.data_start + info.begin
    if j < 0:
        runs = [(base, len(out))]
    else:
        run = (hi[j] - lo[j]) * inner[j] * item
        outer = itertools.product(*(range(lo[i], hi[i]) for i in range(j)))
        runs = [(base + (sum(x * inner[i] for i, x in enumerate(idx)) + lo[j] * inner[j]) * item,
                 run) for idx in outer]
    pieces, pos = [], 0
    for off, n in runs:
        pieces.extend(_pieces(off, out[pos:pos + n], f.block_size))
        pos += n
    pool = executor() if len(pieces) > 1 else None
    _wait_all(f.submit(pool, pieces))
    sub = tuple((s - lo[i]) if dropped else slice(s - lo[i], s - lo[i] + (c - 1) * st + 1, st)
                for i, (s, c, st, dropped) in enumerate(dims))
    result = box[sub]
    if result.numel() != box.numel():
        result = result.clone(memory_format=torch.contiguous_format)
    return result


# -- saving ------------------------------------------------------------------------------------------
def build_header(tensors: dict, metadata: dict | None = None) -> tuple[bytes, list]:
    """The header bytes safetensors.torch.save_file writes for ``tensors`` (same order, same JSON,
    padded to 8 bytes), and ``(name, tensor)`` in file order."""
    if not isinstance(tensors, dict):
        raise ValueError(f"expected a dict of str -> torch.Tensor, not {type(tensors).__name__}")
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("metadata must be a dict of str -> str")
    entries = []
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise ValueError(f"tensor names must be str, not {type(name).__name__} ({name!r})")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"Key `{name}` is invalid, expected torch.Tensor but received {type(t)}")
        if t.layout != torch.strided:
            raise ValueError(f"tensor {name!r} is sparse: make it dense (.to_dense()) first")
        if not t.is_contiguous():
            raise ValueError(f"tensor {name!r} is not contiguous: call .contiguous() first")
        dname = _NAMES.get(t.dtype)
        if dname is None:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot hold")
        entries.append((_RANK[dname], name, dname, t))
    _check_shared(entries)
    entries.sort(key=lambda e: (e[0], e[1]))
    head: dict = {}
    if metadata is not None:
        head["__metadata__"] = metadata
    pos, order = 0, []
    for _, name, dname, t in entries:
        shape = list(t.shape)
        if dname in _PACKED:
            shape = shape[:-1] + [shape[-1] * 2] if shape else shape
        n = t.numel() * t.element_size()
        head[name] = {"dtype": dname, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
        order.append((name, t))
    raw = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, order


def _check_shared(entries) -> None:
    """safetensors refuses tensors that share memory (they would be written twice)."""
    spans = []
    for _, name, _, t in entries:
        n = t.numel() * t.element_size()
        if n:
            spans.append((t.device, t.data_ptr(), t.data_ptr() + n, name))
    spans.sort(key=lambda s: (str(s[0]), s[1]))
    for a, b in zip(spans, spans[1:]):
        if a[0] == b[0] and b[1] < a[2]:
            raise RuntimeError(f"tensors {a[3]!r} and {b[3]!r} share memory; safetensors cannot "
                               "store shared tensors (save a copy of one, or save only one)")


def save_safetensors(tensors: dict, url, metadata: dict | None = None, *,
                     volume: Volume | None = None, meta: str | None = None) -> None:
    """Write ``tensors`` in the format of ``safetensors.torch.save_file`` (byte for byte), atomically:
    to a temporary name beside the target, renamed over it once complete."""
    if sys.byteorder != "little":        # pragma: no cover
        raise OSError("safetensors files are little-endian; this machine is not")
    header, order = build_header(tensors, metadata)
    vol, path, label = _resolve(url, volume, meta)
    head, name = posixpath.split(path)
    tmp = posixpath.join(head, f".{name}.tmp.{os.getpid()}.{os.urandom(4).hex()}")
    try:
        with vol.open(tmp, "xb", buffering=0) as out:
            out.write(header)
            for _, t in order:
                if t.numel() == 0:
                    continue
                if t.device.type != "cpu":
                    t = t.cpu()
                out.write(_byte_view(t.reshape(-1).view(torch.uint8)))
        vol.rename(tmp, path)
    except BaseException:
        try:
            vol.remove(tmp)
        except OSError:
            pass
        raise
