"""The store: one directory (or pyarrow.fs URI) that every stage reads and writes."""

from imoe_ray.store.lock import StoreLock, StoreLocked
from imoe_ray.store.manifest import StageManifest
from imoe_ray.store.store import Store, StoreError, write_bytes_atomic, write_text_atomic

__all__ = ["Store", "StoreError", "StoreLock", "StoreLocked", "StageManifest", "write_bytes_atomic",
           "write_text_atomic"]
