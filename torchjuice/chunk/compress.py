"""Per-block compression: none, lz4 or zstd."""
from __future__ import annotations

from ..errors import CorruptBlockError, InvalidURLError


class Compressor:
    name = "none"

    def compress(self, data) -> bytes | memoryview:
        return data

    def decompress(self, data: bytes, size: int) -> bytes:
        return data


class LZ4(Compressor):
    name = "lz4"

    def __init__(self):
        import lz4.block
        self._lz4 = lz4.block

    def compress(self, data):
        return self._lz4.compress(data, store_size=False)

    def decompress(self, data, size):
        try:
            return self._lz4.decompress(data, uncompressed_size=size)
        except Exception as e:
            raise CorruptBlockError(f"lz4 block does not decompress: {e}") from None


class Zstd(Compressor):
    name = "zstd"

    def __init__(self):
        import zstandard
        self._c = zstandard
        self._local = None

    def compress(self, data):
        return self._c.ZstdCompressor(level=1).compress(data)

    def decompress(self, data, size):
        try:
            return self._c.ZstdDecompressor().decompress(data, max_output_size=size)
        except Exception as e:
            raise CorruptBlockError(f"zstd block does not decompress: {e}") from None


def new_compressor(name: str | None) -> Compressor:
    name = (name or "none").lower()
    if name == "none":
        return Compressor()
    if name == "lz4":
        return LZ4()
    if name == "zstd":
        return Zstd()
    raise InvalidURLError(f"unknown compression {name!r}: use none, lz4 or zstd")
