"""Small helpers shared by the stores: URL splitting, key checks, the errors they raise."""
from __future__ import annotations

import errno
from urllib.parse import parse_qs, urlsplit

from ..errors import InvalidURLError, JuiceError


class InvalidKeyError(JuiceError, ValueError):
    """An object key a store cannot hold: empty, absolute, or with ``.``/``..``/empty components."""

    default_errno = errno.EINVAL


def split_url(url: str, scheme: str) -> tuple[str, str, dict[str, str]]:
    """``scheme://netloc/path?k=v`` -> ``(netloc, path, {k: v})`` (last value wins)."""
    if not isinstance(url, str) or "://" not in url:
        raise InvalidURLError(f"not a {scheme}:// URL: {url!r}")
    got = url.split("://", 1)[0].lower()
    if got != scheme:
        raise InvalidURLError(f"not a {scheme}:// URL: {url!r}")
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    return parts.netloc, parts.path, query


def check_key(key: str) -> str:
    """Reject keys that would escape a directory or cannot be a file name; returns ``key``."""
    if not isinstance(key, str) or not key:
        raise InvalidKeyError(f"invalid object key {key!r}")
    if key.startswith("/") or "\0" in key:
        raise InvalidKeyError(f"invalid object key {key!r}: absolute or contains NUL")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise InvalidKeyError(f"invalid object key {key!r}: empty, '.' or '..' component")
    return key


def not_found(key: str, detail: str = "no such object") -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, detail, key)


def check_range(off: int, limit: int) -> None:
    if off < 0:
        raise ValueError(f"negative offset {off}")
