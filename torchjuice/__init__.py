"""torchjuice: a JuiceFS-design storage system in Python that plugs straight into PyTorch.

    import torchjuice as tj
    tj.format(None, "myvol")                 # an embedded volume (SQLite + local dir)
    vol = tj.connect("myvol")
    with vol.open("/a.bin", "wb") as f:
        f.write(b"hello")
"""
from .errors import (AlreadyFormattedError, ClosedVolumeError, CorruptBlockError, InvalidURLError,
                     JuiceError, NotFormattedError, PathEscapeError, VolumeMismatchError)
from .volume import Volume, connect, format, open_url, split_url, volume_for

__version__ = "0.1.0"

# The PyTorch layer imports torch; load it only when one of its names is used, so that
# `import torchjuice` (the CLI, fsspec, DataLoader workers) stays fast.
_LAZY = {
    "JuiceDataset": "data", "JuiceIterableDataset": "data", "JuiceDataLoader": "data",
    "save": "checkpoint", "load": "checkpoint", "async_save": "checkpoint",
    "load_safetensors": "models", "safe_open": "models", "save_safetensors": "models",
}


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'torchjuice' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


__all__ = list(_LAZY) + ["AlreadyFormattedError", "ClosedVolumeError", "CorruptBlockError", "InvalidURLError",
           "JuiceError", "NotFormattedError", "PathEscapeError", "VolumeMismatchError", "Volume",
           "connect", "format", "open_url", "split_url", "volume_for"]
