"""The store: one directory (or pyarrow.fs URI) that every stage reads and writes."""

from imoe_ray.store.manifest import StageManifest
from imoe_ray.store.store import Store

__all__ = ["Store", "StageManifest"]
