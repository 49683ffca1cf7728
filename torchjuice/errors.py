"""Errors raised by torchjuice.

Every error a user can cause is a built-in ``OSError`` subclass with the right ``errno`` (so code
written against local files keeps working); a few also derive from ``ValueError`` where Python's own
file objects would raise that (a closed volume, a malformed URL).
"""
from __future__ import annotations

import errno
import os


class JuiceError(OSError):
    """Base class of torchjuice's own errors; an ``OSError`` with an errno."""

    default_errno = errno.EIO

    def __init__(self, message: str, *, errno_: int | None = None, filename: str | None = None):
        code = self.default_errno if errno_ is None else errno_
        if filename is None:
            super().__init__(code, message)
        else:
            super().__init__(code, message, filename)

    def __str__(self) -> str:  # one clear line, no "[Errno N]" noise for users
        if self.filename is not None:
            return f"{self.strerror}: {self.filename!r}"
        return str(self.strerror)


class InvalidURLError(JuiceError, ValueError):
    """A URL with an unknown scheme, or missing parts."""

    default_errno = errno.EINVAL


class NotFormattedError(JuiceError):
    """The metadata engine holds no volume: run ``torchjuice format`` first."""

    default_errno = errno.ENODEV


class AlreadyFormattedError(JuiceError, FileExistsError):
    """``format`` on an engine that already holds a volume (use force=True / --force)."""

    default_errno = errno.EEXIST


class VolumeMismatchError(JuiceError):
    """A ``juice://VOL/...`` URL whose VOL is not the name of the volume its engine holds."""

    default_errno = errno.EINVAL


class ClosedVolumeError(JuiceError, ValueError):
    """An operation on a volume (or file) after ``close()``."""

    default_errno = errno.EBADF


class PathEscapeError(JuiceError, PermissionError):
    """A path whose ``..`` components climb above the volume root."""

    default_errno = errno.EPERM


class CorruptBlockError(JuiceError):
    """A block whose bytes do not match what was written (checksum, size or decompression)."""

    default_errno = errno.EIO


def oserror(code: int, path: str | None = None, detail: str | None = None) -> OSError:
    """Build the built-in OSError subclass Python uses for ``code`` (FileNotFoundError for ENOENT...)."""
    msg = os.strerror(code) if detail is None else f"{os.strerror(code)} ({detail})"
    if path is None:
        return OSError(code, msg)
    return OSError(code, msg, path)
