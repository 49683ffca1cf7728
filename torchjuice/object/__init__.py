"""Object stores behind one interface: local directory, S3, in-memory (tests), fault injection."""
from .interface import ObjectInfo, ObjectStore, create_store

__all__ = ["ObjectInfo", "ObjectStore", "create_store"]
