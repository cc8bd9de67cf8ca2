"""The store: one directory (or pyarrow.fs URI) that every stage reads and writes."""

from imoe_ray.store.manifest import StageManifest
from imoe_ray.store.store import Store, write_text_atomic

__all__ = ["Store", "StageManifest", "write_text_atomic"]
