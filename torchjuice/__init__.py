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

__all__ = ["AlreadyFormattedError", "ClosedVolumeError", "CorruptBlockError", "InvalidURLError",
           "JuiceError", "NotFormattedError", "PathEscapeError", "VolumeMismatchError", "Volume",
           "connect", "format", "open_url", "split_url", "volume_for"]
