"""Safetensors on a volume: equality with safetensors itself, ranged reads counted by the store
metrics, corrupt headers, atomic saves, sharded directories, the staged (CUDA-style) pipeline."""
from __future__ import annotations

import io
import json
import math
import os
import struct

import pytest

torch = pytest.importorskip("torch")
st = pytest.importorskip("safetensors.torch")

import torchjuice as tj  # noqa: E402
from torchjuice import models  # noqa: E402

from conftest import make_store_url  # noqa: E402

BS = 64 << 10          # the smallest block size: many blocks in small files


@pytest.fixture
def vol(tmp_path):
    tj.format(f"sqlite3://{tmp_path}/meta.db", "v", storage=f"file://{tmp_path}/data", block_size=BS)
    with tj.connect("v") as v:
        yield v
    tj.volume_for("v").close()


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor (bitwise comparison for every dtype, NaNs included)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_same(got: dict, want: dict) -> None:
    assert list(sorted(got)) == list(sorted(want))
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert got[k].shape == want[k].shape, k
        assert torch.equal(bits(got[k]), bits(want[k])), k


def random_model(seed: int = 0, scale: int = 1) -> dict:
    """Tensors of every dtype safetensors and this torch share, odd shapes, scalars, empties."""
    g = torch.Generator().manual_seed(seed)

    def raw(shape, dtype):
        n = math.prod(shape) * dtype.itemsize
        return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).view(dtype).reshape(shape)

    t = {
        "f32": torch.randn(97 * scale, 129, generator=g),
        "f16": torch.randn(300 * scale, 77, generator=g).half(),
        "bf16": torch.randn(5, 7, 11 * scale, generator=g).bfloat16(),
        "f64": torch.randn(33, generator=g).double(),
        "i64": torch.randint(-2**62, 2**62, (41,), generator=g),
        "i32": torch.randint(-2**31, 2**31 - 1, (3, 5), dtype=torch.int32, generator=g),
        "i16": torch.randint(-2**15, 2**15 - 1, (17,), dtype=torch.int16, generator=g),
        "i8": torch.randint(-128, 127, (13, 3), dtype=torch.int8, generator=g),
        "u8": torch.randint(0, 255, (1000 * scale,), dtype=torch.uint8, generator=g),
        "bool": torch.rand(3, 9, generator=g) > 0.5,
        "c64": torch.randn(6, dtype=torch.complex64, generator=g),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
        "empty_i8": torch.empty(4, 0, dtype=torch.int8),
        "layers.0.mlp.up.weight": torch.randn(64, 48, generator=g).bfloat16(),
    }
    for name in ("uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                 "float8_e5m2fnuz", "float8_e8m0fnu"):
        if hasattr(torch, name):
            t[name] = raw((7, 3), getattr(torch, name))
    if hasattr(torch, "float4_e2m1fn_x2"):
        t["f4"] = raw((4, 6), torch.float4_e2m1fn_x2)
    return t


def st_load(raw: bytes) -> dict:
    """safetensors.torch.load_file on these bytes (its bytes-based load lacks some dtypes)."""
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(raw)
        f.flush()
        return {k: v.clone() for k, v in st.load_file(f.name).items()}


def put(vol, path: str, data: bytes) -> str:
    vol.makedirs(path.rsplit("/", 1)[0] or "/", exist_ok=True)
    vol.write_bytes(path, data)
    return f"juice://{vol.name}{path}"


# -- equality with safetensors --------------------------------------------------------------------------
@pytest.mark.parametrize("store", ["file", "mem", "s3"])
def test_load_equals_safetensors(store, request, tmp_path):
    tj.format(f"sqlite3://{tmp_path}/meta.db", "m", storage=make_store_url(store, request, tmp_path),
              block_size=BS)
    tensors = random_model(1, scale=8)
    raw = st.save(tensors, metadata={"format": "pt"})
    with tj.connect("m") as vol:
        url = put(vol, "/models/m.safetensors", raw)
        got = tj.load_safetensors(url)
        assert_same(got, st_load(raw))
        with tj.safe_open(url, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert_same({k: f.get_tensor(k) for k in f.keys()}, st_load(raw))
            assert_same(f.get_tensors(), st_load(raw))
    tj.volume_for("m").close()


def test_load_file_written_by_safetensors_matches_load_file(vol, tmp_path):
    tensors = random_model(2)
    local = tmp_path / "local.safetensors"
    st.save_file(tensors, str(local))
    url = put(vol, "/m.safetensors", local.read_bytes())
    assert_same(tj.load_safetensors(url), st.load_file(str(local)))
    assert_same(tj.load_safetensors("/m.safetensors", volume=vol), st.load_file(str(local)))


def test_tensors_are_views_with_storages_of_their_own(vol):
    tensors = random_model(3)
    url = put(vol, "/m.safetensors", st.save(tensors))
    got = tj.load_safetensors(url)
    for k, t in got.items():
        assert t.is_contiguous()
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), k
    buf = io.BytesIO()
    torch.save(got["i8"], buf)                   # saves its own bytes, not the whole model
    assert len(buf.getvalue()) < 4096
    got["f32"].add_(1)                           # writable, and only that tensor changes
    assert torch.equal(got["f16"], tensors["f16"])


def test_file_across_a_chunk_boundary(tmp_path):
    """A file larger than one 64 MiB chunk, default 4 MiB blocks."""
    tj.format(f"sqlite3://{tmp_path}/meta.db", "big", storage=f"file://{tmp_path}/data")
    g = torch.Generator().manual_seed(5)
    tensors = {"a": torch.randn(13_000_000, generator=g), "b": torch.randn(9_000_001, generator=g).half(),
               "c": torch.randint(0, 9, (1000,), generator=g)}
    raw = st.save(tensors)
    assert len(raw) > 64 << 20
    with tj.connect("big") as vol:
        url = put(vol, "/big.safetensors", raw)
        assert_same(tj.load_safetensors(url, threads=4), tensors)
        with tj.safe_open(url) as f:
            assert torch.equal(f.get_slice("a")[8_388_000:8_389_000], tensors["a"][8_388_000:8_389_000])
    tj.volume_for("big").close()


def test_iter_yields_in_file_order(vol):
    tensors = random_model(4)
    raw = st.save(tensors)
    url = put(vol, "/m.safetensors", raw)
    with tj.safe_open(url) as f:
        order = f.offset_keys()
    names = [name for name, _ in models.iter_safetensors(url, threads=3)]
    assert names == order
    n, _ = struct.unpack("<Q", raw[:8])[0], None
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    assert order == sorted(header, key=lambda k: header[k]["data_offsets"])


def test_unaligned_offsets_from_a_hand_made_file(vol):
    """A u8[3] then an f32 at data byte 3 (safetensors.torch never writes this; others may)."""
    f32 = torch.tensor([1.5, -2.25, 3.0])
    header = {"u": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
              "f": {"dtype": "F32", "shape": [3], "data_offsets": [3, 15]}}
    data = bytes([7, 8, 9]) + bits(f32).numpy().tobytes()
    raw = make_file(header, data)
    url = put(vol, "/odd.safetensors", raw)
    got = tj.load_safetensors(url)
    assert torch.equal(got["f"], f32) and got["u"].tolist() == [7, 8, 9]
    assert got["f"].data_ptr() % 4 == 0
    assert_same(got, st_load(raw))


def test_staged_pipeline_on_cpu_matches(vol):
    """The CUDA path's ring of staging buffers, run with host buffers and small windows so that
    every buffer is reused many times."""
    tensors = random_model(6, scale=16)
    raw = st.save(tensors)
    put(vol, "/m.safetensors", raw)
    f = models._File(vol, "/m.safetensors", "m")
    try:
        for window, threads in ((BS, 4), (3 * BS, 2), (1 << 30, 8)):
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(threads) as pool:
                got = dict(models._stream_file(f, torch.device("cpu"), pool, staged=True, window=window))
            assert_same(got, tensors)
    finally:
        f.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_load_matches(vol):                                     # pragma: no cover
    tensors = random_model(7, scale=16)
    url = put(vol, "/m.safetensors", st.save(tensors))
    got = tj.load_safetensors(url, device="cuda")
    assert all(t.device.type == "cuda" for t in got.values())
    assert_same(got, tensors)


# -- sharded directories ----------------------------------------------------------------------------------
def write_sharded(vol, d: str, tensors: dict, nshards: int = 3) -> dict:
    names = sorted(tensors)
    weight_map = {}
    vol.makedirs(d, exist_ok=True)
    for i in range(nshards):
        part = {k: tensors[k] for k in names[i::nshards]}
        fname = f"model-{i + 1:05d}-of-{nshards:05d}.safetensors"
        vol.write_bytes(f"{d}/{fname}", st.save(part))
        weight_map.update({k: fname for k in part})
    vol.write_bytes(f"{d}/{models.INDEX_NAME}",
                    json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}).encode())
    return weight_map


def test_sharded_directory(vol):
    tensors = random_model(8)
    write_sharded(vol, "/llm", tensors)
    assert_same(tj.load_safetensors("juice://v/llm"), tensors)
    assert_same(tj.load_safetensors("juice://v/llm/"), tensors)


def test_directory_with_single_model_file(vol):
    tensors = random_model(9)
    vol.makedirs("/one")
    vol.write_bytes("/one/model.safetensors", st.save(tensors))
    assert_same(tj.load_safetensors("juice://v/one"), tensors)


def test_sharded_directory_errors(vol):
    vol.makedirs("/empty")
    with pytest.raises(FileNotFoundError, match="juice://v/empty"):
        tj.load_safetensors("juice://v/empty")
    tensors = random_model(10)
    wm = write_sharded(vol, "/bad", tensors)
    wm["ghost"] = wm["f32"]                                # the index lists a tensor no shard has
    vol.write_bytes(f"/bad/{models.INDEX_NAME}", json.dumps({"weight_map": wm}).encode())
    with pytest.raises(ValueError, match="ghost"):
        tj.load_safetensors("juice://v/bad")
    vol.write_bytes(f"/bad/{models.INDEX_NAME}", b"{not json")
    with pytest.raises(ValueError, match="not a valid index"):
        tj.load_safetensors("juice://v/bad")
    # the same tensor in two shards
    vol.makedirs("/dup")
    vol.write_bytes("/dup/a.safetensors", st.save({"x": torch.ones(2)}))
    vol.write_bytes("/dup/b.safetensors", st.save({"x": torch.ones(2), "y": torch.ones(1)}))
    vol.write_bytes(f"/dup/{models.INDEX_NAME}",
                    json.dumps({"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}).encode())
    with pytest.raises(ValueError, match="'x' is in both"):
        tj.load_safetensors("juice://v/dup")


# -- safe_open ------------------------------------------------------------------------------------------
def test_safe_open_api(vol):
    tensors = random_model(11)
    raw = st.save(tensors)
    url = put(vol, "/m.safetensors", raw)
    f = tj.safe_open(url, framework="pt", device="cpu")
    with f:
        assert f.keys() == sorted(tensors)
        assert f.metadata() is None
        assert sorted(f.offset_keys()) == sorted(tensors)
        s = f.get_slice("bf16")
        assert s.get_shape() == [5, 7, 11] and s.get_dtype() == "BF16" and len(s) == 5
        if "f4" in tensors:
            assert f.get_slice("f4").get_shape() == [4, 12]       # logical values, as safetensors
            assert f.get_slice("f4").get_dtype() == "F4"
            assert torch.equal(bits(f.get_slice("f4")[1:3]), bits(tensors["f4"][1:3]))
        with pytest.raises(KeyError, match="nope"):
            f.get_tensor("nope")
    with pytest.raises(ValueError, match="closed"):
        f.get_tensor("f32")
    with pytest.raises(ValueError, match="framework"):
        tj.safe_open(url, framework="np")
    with pytest.raises(FileNotFoundError):
        tj.safe_open("juice://v/missing.safetensors")


KEYS = [0, -1, 3, slice(None), slice(2, 9), slice(-4, None), slice(1, 100), slice(5, 2),
        slice(None, None, 3), (slice(None), 4), (Ellipsis, 2), (1, Ellipsis, slice(0, 5, 2)),
        (slice(3, 7), slice(None), slice(None, None, 4)), (2, 3, 4), (Ellipsis,),
        (slice(None), slice(1, 2), slice(10, 11)), (slice(None, None, 2), slice(None, None, 3), 0)]


@pytest.mark.parametrize("key", KEYS, ids=[repr(k) for k in KEYS])
def test_get_slice_matches_torch_and_safetensors(vol, key, tmp_path):
    from safetensors import safe_open as st_safe_open
    g = torch.Generator().manual_seed(12)
    t = torch.randn(10, 6, 13, generator=g)
    raw = st.save({"t": t, "pad": torch.ones(3, dtype=torch.int8)})
    url = put(vol, "/s.safetensors", raw)
    (tmp_path / "s.safetensors").write_bytes(raw)
    with tj.safe_open(url) as f, st_safe_open(str(tmp_path / "s.safetensors"), "pt") as ref:
        got = f.get_slice("t")[key]
        want = t[key]
        assert got.shape == want.shape and torch.equal(got, want)
        assert got.is_contiguous()
        theirs = ref.get_slice("t")[key]
        assert theirs.shape == got.shape and torch.equal(theirs, got)


def test_get_slice_errors(vol):
    url = put(vol, "/s.safetensors", st.save({"t": torch.zeros(2, 3, 4)}))
    with tj.safe_open(url) as f:
        s = f.get_slice("t")
        with pytest.raises(IndexError, match="out of bounds"):
            s[5]
        with pytest.raises(IndexError, match="too many indices"):
            s[0, 0, 0, 0]
        with pytest.raises(ValueError, match="step"):
            s[::-1]
        with pytest.raises(IndexError, match="ellipsis"):
            s[..., 0, ...]
        with pytest.raises(TypeError):
            s["a"]
        with pytest.raises(TypeError):
            s[None]


# -- reading only what is needed --------------------------------------------------------------------------
def blocks(a: int, b: int) -> set[int]:
    return set(range(a // BS, (b - 1) // BS + 1))


def tensor_range(f: tj.safe_open, name: str) -> tuple[int, int]:
    info = f._file.header.by_name[name]
    return f._file.header.data_start + info.begin, f._file.header.data_start + info.end


def delta(vol, before: dict) -> dict:
    now = vol.metrics()
    return {k: now[k] - before[k] for k in ("get_count", "get_bytes")}


def sliced_model():
    g = torch.Generator().manual_seed(13)
    return {"a.bias": torch.randn(100, generator=g),                  # puts the rest off alignment
            "w": torch.randn(512, 1024, generator=g),                 # 2 MiB: rows of 4 KiB
            "u": torch.randn(8, 262144, generator=g).half()}          # 4 MiB: rows of 512 KiB


def test_header_is_one_request(vol):
    url = put(vol, "/m.safetensors", st.save(sliced_model()))
    before = vol.metrics()
    with tj.safe_open("/m.safetensors", volume=vol) as f:
        assert len(f.keys()) == 3
    assert delta(vol, before) == {"get_count": 1, "get_bytes": models.HEADER_PROBE}
    assert url


def test_get_tensor_reads_only_its_blocks(vol):
    tensors = sliced_model()
    put(vol, "/m.safetensors", st.save(tensors))
    with tj.safe_open("/m.safetensors", volume=vol) as f:
        a, b = tensor_range(f, "w")
        before = vol.metrics()
        assert torch.equal(f.get_tensor("w"), tensors["w"])
        assert delta(vol, before) == {"get_count": len(blocks(a, b)), "get_bytes": b - a}


def test_row_slice_reads_only_its_blocks(vol):
    tensors = sliced_model()
    put(vol, "/m.safetensors", st.save(tensors))
    with tj.safe_open("/m.safetensors", volume=vol) as f:
        a, _ = tensor_range(f, "w")
        lo, hi = a + 128 * 4096, a + 192 * 4096
        before = vol.metrics()
        assert torch.equal(f.get_slice("w")[128:192], tensors["w"][128:192])
        assert delta(vol, before) == {"get_count": len(blocks(lo, hi)), "get_bytes": hi - lo}


def test_column_slice_reads_only_its_blocks(vol):
    """Rows of 512 KiB, a column range of 128 KiB in each: eight separate ranges, no more."""
    tensors = sliced_model()
    put(vol, "/m.safetensors", st.save(tensors))
    with tj.safe_open("/m.safetensors", volume=vol) as f:
        a, _ = tensor_range(f, "u")
        runs = [(a + r * 524288 + 131072, a + r * 524288 + 262144) for r in range(8)]
        before = vol.metrics()
        assert torch.equal(f.get_slice("u")[:, 65536:131072], tensors["u"][:, 65536:131072])
        assert delta(vol, before) == {"get_count": sum(len(blocks(x, y)) for x, y in runs),
                                      "get_bytes": 8 * 131072}


@pytest.mark.parametrize("store", ["file", "s3"])
def test_tensor_parallel_ranks_read_their_share(store, request, tmp_path):
    """Four ranks: row-parallel 'w', column-parallel 'u'. Each rank reads its quarter of each
    (plus its header request); together they read each byte once. On S3 too, where the volume
    reads ahead for sequential readers (the loader turns that off for its own reads)."""
    tj.format(f"sqlite3://{tmp_path}/meta.db", "tp", storage=make_store_url(store, request, tmp_path),
              block_size=BS)
    with tj.connect("tp", cache_size=0) as vol:
        _tensor_parallel(vol)


def _tensor_parallel(vol):
    tensors = sliced_model()
    put(vol, "/m.safetensors", st.save(tensors))
    world, total = 4, 0
    for rank in range(world):
        before = vol.metrics()
        with tj.safe_open("/m.safetensors", volume=vol) as f:
            w = f.get_slice("w")[rank * 128:(rank + 1) * 128]
            cols = 262144 // world
            u = f.get_slice("u")[:, rank * cols:(rank + 1) * cols]
        d = delta(vol, before)
        share = (tensors["w"].numel() * 4 + tensors["u"].numel() * 2) // world
        assert d["get_bytes"] == models.HEADER_PROBE + share
        total += d["get_bytes"] - models.HEADER_PROBE
        assert torch.equal(w, tensors["w"][rank * 128:(rank + 1) * 128])
        assert torch.equal(u, tensors["u"][:, rank * cols:(rank + 1) * cols])
    assert total == tensors["w"].numel() * 4 + tensors["u"].numel() * 2


def test_narrow_columns_read_the_rows_once(vol):
    """Columns of 4 KiB rows: merged into one range over the rows (not 512 tiny requests)."""
    tensors = sliced_model()
    put(vol, "/m.safetensors", st.save(tensors))
    with tj.safe_open("/m.safetensors", volume=vol) as f:
        a, b = tensor_range(f, "w")
        before = vol.metrics()
        assert torch.equal(f.get_slice("w")[:, 100:200], tensors["w"][:, 100:200])
        d = delta(vol, before)
        assert d["get_count"] == len(blocks(a + 100 * 4, b)) and d["get_bytes"] <= b - a


# -- corrupt files ----------------------------------------------------------------------------------------
def make_file(header: dict, data: bytes, n: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if n is None else n) + raw + data


def _raw_header(raw: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(raw)) + raw + data


GOOD = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "I8", "shape": [8], "data_offsets": [16, 24]}}


def _with(name, **spec):
    h = json.loads(json.dumps(GOOD))
    h[name].update(spec)
    return h


CORRUPT = {
    "truncated": (lambda: make_file(GOOD, bytes(24))[:-5], "truncated"),
    "offsets_past_end": (lambda: make_file(_with("b", data_offsets=[16, 40], shape=[24]), bytes(24)),
                         "past the end"),
    "size_mismatch": (lambda: make_file(_with("a", shape=[3, 2]), bytes(24)), "span"),
    "overlap": (lambda: make_file(_with("b", data_offsets=[8, 16]) | {
        "c": {"dtype": "U8", "shape": [8], "data_offsets": [16, 24]}}, bytes(24)), "overlap"),
    "gap": (lambda: make_file(_with("b", data_offsets=[20, 28]), bytes(28)), "unused bytes"),
    "trailing_bytes": (lambda: make_file(GOOD, bytes(30)), "no tensor owns"),
    "unknown_dtype": (lambda: make_file(_with("a", dtype="F7"), bytes(24)), "unknown dtype"),
    "torchless_dtype": (lambda: make_file(_with("b", dtype="F6_E2M3"), bytes(24)), "PyTorch"),
    "header_bigger_than_file": (lambda: make_file(GOOD, bytes(24), n=500), "past the end of the file"),
    "header_absurd": (lambda: make_file(GOOD, bytes(24), n=1 << 40), "absurd"),
    "header_just_over_limit": (lambda: make_file(GOOD, bytes(24), n=100_000_001), "absurd"),
    "not_json": (lambda: _raw_header(b"{not json", bytes(8)), "not valid JSON"),
    "json_array": (lambda: _raw_header(b"[1,2]"), "not a JSON object"),
    "not_utf8": (lambda: _raw_header(b'{"\xff":1}'), "not UTF-8"),
    "duplicate_key": (lambda: _raw_header(b'{"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},'
                                          b'"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}'),
                      "duplicate"),
    "too_short": (lambda: b"abc", "too short"),
    "empty": (lambda: b"", "too short"),
    "negative_shape": (lambda: make_file(_with("a", shape=[-2, -2]), bytes(24)), "invalid shape"),
    "bool_shape": (lambda: make_file(_with("b", shape=[True] * 8), bytes(24)), "invalid shape"),
    "float_offsets": (lambda: make_file(_with("b", data_offsets=[16.0, 24]), bytes(24)), "data_offsets"),
    "reversed_offsets": (lambda: make_file(_with("b", data_offsets=[24, 16]), bytes(24)), "before it begins"),
    "entry_not_object": (lambda: make_file(GOOD | {"c": [1]}, bytes(24)), "not an object"),
    "no_dtype": (lambda: make_file({"a": {"shape": [0], "data_offsets": [0, 0]}}, b""), "no dtype"),
    "bad_metadata": (lambda: make_file(GOOD | {"__metadata__": {"k": 1}}, bytes(24)), "__metadata__"),
    "f4_odd": (lambda: make_file({"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 1]}}, bytes(1)),
               "even"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_file_is_a_clear_error(vol, case):
    make, words = CORRUPT[case]
    raw = make()
    url = put(vol, "/bad.safetensors", raw)
    before = vol.metrics()
    with pytest.raises(ValueError) as e:
        tj.load_safetensors("/bad.safetensors", volume=vol)
    assert "juice://v/bad.safetensors" in str(e.value) and words in str(e.value)
    d = delta(vol, before)
    assert d["get_count"] <= 1 and d["get_bytes"] <= len(raw)     # the header probe, nothing more
    with pytest.raises(ValueError, match="juice://v/bad.safetensors"):
        tj.safe_open(url)


def test_corrupt_cases_are_rejected_by_safetensors_too(tmp_path):
    """Our rules are safetensors' rules: each corrupt file fails there as well. (Two exceptions: a
    dtype torch lacks, and a duplicate name, which safetensors resolves silently to the last.)"""
    for case, (make, _) in CORRUPT.items():
        if case in ("torchless_dtype", "duplicate_key"):
            continue
        p = tmp_path / f"{case}.safetensors"
        p.write_bytes(make())
        with pytest.raises(Exception):
            st.load_file(str(p))


# -- saving -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metadata", [None, {"format": "pt"}, {"zz": "1", "aa": "ü\u0002"}])
def test_save_is_byte_identical_to_safetensors(vol, metadata):
    tensors = random_model(14)
    vol.makedirs("/out")
    tj.save_safetensors(tensors, "juice://v/out/m.safetensors", metadata=metadata)
    got = vol.read_bytes("/out/m.safetensors")
    if metadata is None or len(metadata) == 1:
        assert got == st.save(tensors, metadata=metadata)
    assert_same(st_load(got), tensors)
    with tj.safe_open("juice://v/out/m.safetensors") as f:
        assert f.metadata() == metadata
    assert vol.listdir("/out") == ["m.safetensors"]                 # no temp file left behind


def test_save_replaces_atomically_and_cleans_up_on_failure(vol, monkeypatch):
    first = {"x": torch.arange(10)}
    tj.save_safetensors(first, "/m.safetensors", volume=vol)
    calls = []
    real = models._byte_view

    def failing(t):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk on fire")
        return real(t)

    with monkeypatch.context() as m:
        m.setattr(models, "_byte_view", failing)
        with pytest.raises(OSError, match="disk on fire"):
            tj.save_safetensors({"a": torch.ones(5), "b": torch.ones(7)}, "/m.safetensors", volume=vol)
    assert vol.listdir("/") == ["m.safetensors"]
    assert_same(tj.load_safetensors("/m.safetensors", volume=vol), first)
    second = {"y": torch.ones(3, dtype=torch.float16)}
    tj.save_safetensors(second, "/m.safetensors", volume=vol)
    assert_same(tj.load_safetensors("/m.safetensors", volume=vol), second)


def test_save_rejects_what_safetensors_rejects(vol):
    base = torch.zeros(4, 4)
    for bad, exc in [({"a": base.t()}, ValueError), ({"a": [1, 2]}, ValueError),
                     ({"a": base, "b": base.view(-1)}, RuntimeError), ([base], ValueError),
                     ({"a": base.to_sparse()}, ValueError)]:
        with pytest.raises(exc):
            tj.save_safetensors(bad, "/x.safetensors", volume=vol)
    with pytest.raises(ValueError, match="metadata"):
        tj.save_safetensors({"a": base}, "/x.safetensors", metadata={"k": 1}, volume=vol)
    assert not vol.exists("/x.safetensors") and vol.listdir("/") == []


def test_round_trip_through_our_own_save(vol):
    tensors = random_model(15, scale=4)
    tj.save_safetensors(tensors, "juice://v/rt.safetensors")
    assert_same(tj.load_safetensors("juice://v/rt.safetensors"), tensors)


# -- the mmap path: tensors as views over local block files ---------------------------------------------
def mapped_file(t: torch.Tensor) -> str | None:
    """The file whose mapping holds the middle byte of ``t`` (from /proc/self/maps), or None
    (anonymous memory: a copy). The edges of a tensor may share a page with bytes that are read."""
    ptr = t.data_ptr() + t.numel() * t.element_size() // 2
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                return parts[5].strip() if len(parts) > 5 and parts[5].startswith("/") else None
    return None


def big_model(seed: int = 30) -> dict:
    """Tensors of several blocks each (BS = 64 KiB), and small ones between them."""
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(300, 257, generator=g).bfloat16(),
            "a.bias": torch.randn(300, generator=g),
            "b.weight": torch.randn(211, 301, generator=g),
            "c.ids": torch.randint(-2**40, 2**40, (50_000,), generator=g),
            "d.mask": torch.rand(123_457, generator=g) > 0.5}


needs_linux = pytest.mark.skipif(not models._MMAP_OK, reason="the mmap path is Linux-only")


def mapped_share(got: dict) -> float:
    big = [t for t in got.values() if t.numel() * t.element_size() >= 4 * BS]
    return sum(mapped_file(t) is not None for t in big) / len(big)


@needs_linux
def test_mmap_tensors_are_views_over_the_store_files(vol, tmp_path):
    """file:// store, no compression: the block files themselves are mapped; only the header is
    read; equal to safetensors; writes to a tensor are private (copy-on-write)."""
    tensors = big_model()
    raw = st.save(tensors)
    url = put(vol, "/m.safetensors", raw)
    before = vol.metrics()["get_count"]
    got = tj.load_safetensors("/m.safetensors", volume=vol)
    assert_same(got, st_load(raw))
    assert vol.metrics()["get_count"] - before <= 2          # the header; no block read
    files = {mapped_file(t) for t in got.values() if t.numel() * t.element_size() >= 4 * BS}
    assert None not in files and all(f.startswith(f"{tmp_path}/data/") for f in files)
    got["b.weight"].add_(1)                                  # private: the file is unchanged
    assert vol.read_bytes("/m.safetensors") == raw
    assert torch.equal(got["b.weight"], tensors["b.weight"] + 1)
    assert_same(tj.load_safetensors(url), st_load(raw))
    # each tensor still has a storage of its own bytes
    for k, t in got.items():
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), k


@needs_linux
def test_mmap_mapping_outlives_the_file_and_goes_with_the_tensors(vol, tmp_path):
    import gc
    import glob
    tensors = big_model(31)
    raw = st.save(tensors)
    url = put(vol, "/m.safetensors", raw)
    got = tj.load_safetensors(url)
    blocks = glob.glob(f"{tmp_path}/data/**/chunks/**/*_*_*", recursive=True)
    assert blocks
    vol.remove("/m.safetensors")
    vol.trash_empty()
    assert not any(os.path.exists(b) for b in blocks)        # the block files are gone ...
    assert_same(got, st_load(raw))                           # ... the tensors are not
    del got
    gc.collect()
    with open("/proc/self/maps") as f:                       # unmapped with the last tensor
        assert f"{tmp_path}/data/" not in f.read()


def mapping_flags(ptr: int) -> tuple[str, list[str]]:
    """The file and VmFlags of the mapping that holds address ``ptr`` (/proc/self/smaps)."""
    path, hit = None, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=5)
            if "-" in head[0] and len(head) >= 5 and head[0][0] in "0123456789abcdef":
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                hit = lo <= ptr < hi
                path = head[5].strip() if len(head) > 5 else None
            elif hit and line.startswith("VmFlags:"):
                return path, line.split()[1:]
    raise AssertionError(f"no mapping holds {ptr:#x}")


@needs_linux
def test_mmap_block_mappings_ask_for_huge_pages(tmp_path):
    """A block mapping of 2 MiB or more is marked MADV_HUGEPAGE ('hg'): pages the load faults in
    come into the page cache as 2 MiB folios, so this load and every later one maps them 2 MiB
    a fault, not 4-64 KiB (safetensors' own mmap gets small folios that way)."""
    tj.format(f"sqlite3://{tmp_path}/meta.db", "hp", storage=f"file://{tmp_path}/data")
    with tj.connect("hp") as vol:
        assert vol.chunks.block_size >= 4 << 20
        tensors = {"w": torch.randn(3 << 20), "b": torch.randn(1000)}      # 12 MiB, 4 KB
        raw = st.save(tensors)
        url = put(vol, "/m.safetensors", raw)
        got = tj.load_safetensors(url)
        assert_same(got, st_load(raw))
        w = got["w"]
        for off in (w.numel() * 4 // 6, w.numel() * 4 // 2):
            path, flags = mapping_flags(w.data_ptr() + off)
            assert path is not None and path.startswith(f"{tmp_path}/data/"), path
            assert "hg" in flags, (path, flags)


@needs_linux
@pytest.mark.parametrize("damage", ["short", "gone"])
def test_mmap_short_or_missing_store_object_is_an_error_not_a_crash(vol, tmp_path, damage):
    """A store object cut short or removed behind the volume's back: never mapped past its end
    (that would be SIGBUS on first touch); its bytes are read as usual, which reports it."""
    import glob
    raw = st.save(big_model(34))
    url = put(vol, "/m.safetensors", raw)
    victim = sorted(glob.glob(f"{tmp_path}/data/**/chunks/**/*_*_*", recursive=True))[2]
    if damage == "short":
        os.truncate(victim, os.path.getsize(victim) // 2)
    else:
        os.remove(victim)
    with pytest.raises(OSError):
        tj.load_safetensors(url)
    # the other blocks are intact: a tensor that lies before the damage still loads
    with tj.safe_open(url) as f:
        name = f.keys()[0]
        assert torch.equal(f.get_tensor(name), st_load(raw)[name])


@needs_linux
def test_mmap_off_copies(vol):
    raw = st.save(big_model(32))
    url = put(vol, "/m.safetensors", raw)
    got = tj.load_safetensors(url, mmap=False)
    assert_same(got, st_load(raw))
    assert mapped_share(got) == 0


@needs_linux
def test_mmap_file_with_overwrites_and_holes(vol):
    """Slices at odd offsets (overwrites), an append after a hole (a truncate that extended the
    file): mapped where the pages line up, read elsewhere, equal either way."""
    tensors = big_model(33)
    tensors["z.zeros"] = torch.zeros(40_000)
    raw = st.save(tensors)
    (n,) = struct.unpack("<Q", raw[:8])
    zoff = 8 + n + json.loads(raw[8:8 + n])["z.zeros"]["data_offsets"][0]
    url = f"juice://{vol.name}/m.safetensors"
    vol.write_bytes("/m.safetensors", raw[:zoff])
    vol.truncate("/m.safetensors", zoff + 160_000)           # the zeros: a hole, never written
    with vol.open("/m.safetensors", "ab") as f:
        f.write(raw[zoff + 160_000:])
    with vol.open("/m.safetensors", "r+b") as f:            # slices at odd offsets, same bytes
        for off in (1000, 5 * BS + 123, 9 * BS - 7):
            f.seek(off)
            f.write(raw[off:off + 3 * BS + 17])
    assert vol.read_bytes("/m.safetensors") == raw
    got = tj.load_safetensors(url)
    assert_same(got, st_load(raw))
    pieces = vol.local_blocks("/m.safetensors", 0, len(raw))
    assert sum(n for _, n, _, _ in pieces) == len(raw)
    assert any(p is None for _, _, p, _ in pieces) and any(p for _, _, p, _ in pieces)


def test_local_blocks_contract(vol):
    """Pieces cover the range in order, clipped to the file; a replaced file is ESTALE."""
    import errno
    raw = st.save(big_model(37))
    put(vol, "/m.safetensors", raw)
    ino = vol.getattr("/m.safetensors").inode
    pieces = vol.local_blocks("/m.safetensors", 100, len(raw), inode=ino)
    assert pieces[0][0] == 100 and sum(n for _, n, _, _ in pieces) == len(raw) - 100
    assert all(a + n == b for (a, n, _, _), (b, _, _, _) in zip(pieces, pieces[1:]))
    for foff, n, path, loff in pieces:
        with open(path, "rb") as f:
            f.seek(loff)
            assert f.read(n) == raw[foff:foff + n]
    assert vol.local_blocks("/m.safetensors", len(raw), 10) == []
    put(vol, "/m2.safetensors", raw)
    vol.rename("/m2.safetensors", "/m.safetensors")          # replaced: a new inode
    with pytest.raises(OSError) as e:
        vol.local_blocks("/m.safetensors", 0, 10, inode=ino)
    assert e.value.errno == errno.ESTALE


@needs_linux
def test_mmap_compressed_blocks_are_copied(tmp_path):
    tj.format(f"sqlite3://{tmp_path}/meta.db", "c", storage=f"file://{tmp_path}/data",
              block_size=BS, compression="lz4")
    raw = st.save(big_model(34))
    with tj.connect("c") as vol:
        put(vol, "/m.safetensors", raw)
        assert {p for _, _, p, _ in vol.local_blocks("/m.safetensors", 0, len(raw))} == {None}
        got = tj.load_safetensors("/m.safetensors", volume=vol)
        assert_same(got, st_load(raw))
        assert mapped_share(got) == 0


@pytest.fixture
def cached(tmp_path):
    """A volume on an in-memory store (nothing local) with a disk cache."""
    tj.format(f"sqlite3://{tmp_path}/meta.db", "k", storage=f"mem://{os.urandom(4).hex()}",
              block_size=BS, compression="zstd")
    with tj.connect("k", cache_dir=str(tmp_path / "cache"), cache_size=1 << 30,
                    cache_writes=False) as v:
        yield v


@needs_linux
def test_mmap_maps_verified_disk_cache_blocks(cached, tmp_path):
    """Blocks in the disk cache (decompressed there) are checked and mapped; clearing the cache
    afterwards leaves the tensors valid."""
    import shutil
    raw = st.save(big_model(35))
    put(cached, "/m.safetensors", raw)
    got = tj.load_safetensors("/m.safetensors", volume=cached)   # cold: read, cached on the way
    assert_same(got, st_load(raw))
    assert mapped_share(got) == 0
    cached.warmup("/m.safetensors")
    m0 = cached.metrics()
    got = tj.load_safetensors("/m.safetensors", volume=cached)
    m1 = cached.metrics()
    assert_same(got, st_load(raw))
    assert mapped_share(got) == 1
    assert all(mapped_file(t).startswith(f"{tmp_path}/cache/") for t in got.values()
               if t.numel() * t.element_size() >= 4 * BS)
    assert m1["get_count"] == m0["get_count"] and m1["cache_hits"] > m0["cache_hits"]
    shutil.rmtree(tmp_path / "cache")                        # evicted, all of it
    assert_same(got, st_load(raw))


@needs_linux
def test_mmap_corrupt_cache_block_is_not_mapped(cached, tmp_path):
    import glob
    raw = st.save(big_model(36))
    put(cached, "/m.safetensors", raw)
    cached.warmup("/m.safetensors")
    files = sorted(glob.glob(f"{tmp_path}/cache/**/chunks/**/*_*_*", recursive=True))
    victim = files[len(files) // 2]
    with open(victim, "r+b") as f:                           # one bit flipped in the data
        f.seek(1234)
        b = f.read(1)
        f.seek(1234)
        f.write(bytes([b[0] ^ 0x10]))
    m0 = cached.metrics()
    got = tj.load_safetensors("/m.safetensors", volume=cached)
    m1 = cached.metrics()
    assert_same(got, st_load(raw))
    assert m1["cache_corrupt"] == m0["cache_corrupt"] + 1
    assert m1["get_count"] == m0["get_count"] + 1           # that block fetched again
    mapped = {mapped_file(t) for t in got.values()}
    assert victim not in mapped


@needs_linux
@pytest.mark.parametrize("where", [5000, 40 * BS // 3])
def test_mmap_corrupt_cache_block_partly_mapped(cached, tmp_path, where):
    """A corrupt byte in a block only partly mapped (the first one: its first page holds the
    header, read apart), in the mapped part: found by the segment checksums, the block dropped
    and fetched again; iter_safetensors hands out the right bytes."""
    raw = st.save(big_model(38))
    put(cached, "/m.safetensors", raw)
    cached.warmup("/m.safetensors")
    (_, _, victim, loff), = cached.local_blocks("/m.safetensors", where, 1)
    with open(victim, "r+b") as f:
        f.seek(loff)
        b = f.read(1)
        f.seek(loff)
        f.write(bytes([b[0] ^ 0x01]))
    m0 = cached.metrics()
    got = dict(models.iter_safetensors("/m.safetensors", volume=cached))
    m1 = cached.metrics()
    assert_same(got, st_load(raw))
    assert m1["cache_corrupt"] == m0["cache_corrupt"] + 1
    assert m1["get_count"] == m0["get_count"] + 1
    assert victim not in {mapped_file(t) for t in got.values()}
    assert mapped_share(got) > 0.5                           # the other blocks are still mapped


@needs_linux
@pytest.mark.parametrize("threads", [1, 2, 16])
def test_mmap_cache_checks_stop_with_the_iterator(cached, threads):
    """Blocks are checked in file order by the pool and by the waiting thread: a consumer that
    stops early stops them (nothing hangs, nothing is counted corrupt); any pool size works."""
    raw = st.save(big_model(40))
    put(cached, "/m.safetensors", raw)
    cached.warmup("/m.safetensors")
    want = st_load(raw)
    it = models.iter_safetensors("/m.safetensors", volume=cached, threads=threads)
    name, t = next(it)
    assert torch.equal(t, want[name])
    it.close()
    got = tj.load_safetensors("/m.safetensors", volume=cached, threads=threads)
    assert_same(got, want)
    assert mapped_share(got) == 1 and cached.metrics()["cache_corrupt"] == 0


def test_local_blocks_unverified_checks_what_the_caller_holds(cached):
    """verify=False: nothing is read but the trailers; each cache piece comes with a check of the
    caller's bytes -- the whole block, or a part (edge segments completed from the file)."""
    raw = st.save(big_model(39))
    put(cached, "/m.safetensors", raw)
    cached.warmup("/m.safetensors")
    h0 = cached.metrics()["cache_hits"]
    pieces = cached.local_blocks("/m.safetensors", 0, len(raw), verify=False)
    assert cached.metrics()["cache_hits"] == h0              # nothing checked yet
    assert sum(p[1] for p in pieces) == len(raw)
    for foff, n, path, loff, check in pieces:
        assert check is not None and check.path == path
        good = memoryview(bytearray(raw[foff:foff + n]))
        assert check.check(good, loff)
        if n > 3000:
            assert check.check(good[1000:n - 1000], loff + 1000)     # a part
    assert cached.metrics()["cache_hits"] > h0
    foff, n, path, loff, check = pieces[1]
    bad = bytearray(raw[foff:foff + n])
    bad[n // 2] ^= 0x40
    c0 = cached.metrics()["cache_corrupt"]
    assert not check.check(memoryview(bad), loff)
    assert cached.metrics()["cache_corrupt"] == c0 + 1 and not os.path.exists(path)


# -- the example inference server --------------------------------------------------------------------------
def test_serve_example_starts_and_answers(tmp_path):
    """examples/serve.py --demo: makes a volume and a tiny model, loads it from juice://, serves."""
    import os
    import subprocess
    import sys
    import threading
    import urllib.request

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, os.path.join(root, "examples", "serve.py"), "--demo",
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": root})
    lines: list[str] = []
    ready = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("listening on"):
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(120), "the server did not start"
        assert lines and lines[-1].startswith("listening on"), (lines, proc.stderr.read())
        base = lines[-1].split()[-1]
        assert lines[0].startswith("loaded juice://demo/models/tiny.safetensors: 4 tensors")

        health = json.loads(urllib.request.urlopen(base + "/health", timeout=30).read())
        assert health["status"] == "ok" and health["tensors"] == 4 and health["load_seconds"] > 0
        assert health["model"] == "juice://demo/models/tiny.safetensors"

        g = torch.Generator().manual_seed(1)
        x = torch.randn(3, 16, generator=g)
        req = urllib.request.Request(base + "/predict", data=json.dumps({"inputs": x.tolist()}).encode(),
                                     headers={"Content-Type": "application/json"})
        got = torch.tensor(json.loads(urllib.request.urlopen(req, timeout=30).read())["outputs"])
        # the same model, loaded here from the same volume, gives the same answers
        sd = tj.load_safetensors("juice://demo/models/tiny.safetensors")
        want = torch.nn.functional.gelu(x @ sd["fc1.weight"].T + sd["fc1.bias"]) @ sd["fc2.weight"].T \
            + sd["fc2.bias"]
        assert got.shape == (3, 4) and torch.allclose(got, want, atol=1e-5)

        one = json.loads(urllib.request.urlopen(
            base + "/predict?x=" + ",".join(str(v) for v in x[0].tolist()), timeout=30).read())
        assert torch.allclose(torch.tensor(one["outputs"]), want[:1], atol=1e-5)
        bad = urllib.request.Request(base + "/predict", data=b'{"inputs": [[1, 2]]}')
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(bad, timeout=30)
        assert e.value.code == 400
    finally:
        proc.terminate()
        proc.wait(30)
        tj.volume_for("demo").close()
