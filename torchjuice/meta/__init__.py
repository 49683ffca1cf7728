"""Metadata engines: one interface, the shared logic in ``base``, thin engines (SQL, Redis)."""
from .interface import (CHUNK_SIZE, RENAME_EXCHANGE, RENAME_NOREPLACE, ROOT_INODE, TRASH_INODE,
                        TRASH_NAME, TYPE_DIR, TYPE_FILE, TYPE_SYMLINK, XATTR_CREATE, XATTR_REPLACE,
                        Attr, Format, Meta, Slice, new_meta)
from .base import unpack_attr, unpack_slices

__all__ = ["CHUNK_SIZE", "RENAME_EXCHANGE", "RENAME_NOREPLACE", "ROOT_INODE", "TRASH_INODE",
           "TRASH_NAME", "TYPE_DIR", "TYPE_FILE", "TYPE_SYMLINK", "XATTR_CREATE", "XATTR_REPLACE",
           "Attr", "Format", "Meta", "Slice", "new_meta", "unpack_attr", "unpack_slices"]
