"""What a serving replica reads from a store, as a local directory: the store itself when it is local,
else a copy in the node's cache that follows the store.

    s3://bucket/store ──(first use: base, experts, router, fusion, ... ; then only what changed)──>
        CACHE/<store hash>/mirror/          (only a cache: delete it any time)

The knowledge bases are not copied: LanceDB opens them at their URI. Each file lands under a
temporary name and is renamed into place, so replicas on one node may share the copy and a reader
never sees half a file. `refresh()` is cheap when nothing changed (one listing of the watched files).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from imoe_ray.store import layout
from imoe_ray.store.store import Store, fsync_dir

# What serving reads, besides the knowledge bases.
SERVED = (layout.CONFIG, (layout.BASE,), (layout.EXPERTS,), ("router",), layout.DENSE, (layout.FUSION,),
          (layout.MANIFESTS,), layout.DISCOVERY_MODEL, layout.SHARDS_INDEX)
WATCHED = (layout.EXPERTS_INDEX, layout.ROUTER_EXTRA_EXPERTS)


class StoreMirror:
    """`root`: a local directory laid out like the store, for the code that reads files by path."""

    def __init__(self, store: str | Store, cache_dir: str | Path | None = None):
        self.store = store if isinstance(store, Store) else Store(store, create=False, cache_dir=cache_dir)
        if self.store.is_local:
            self.root = Path(self.store.root)
        else:
            key = hashlib.sha256(self.store.uri.encode()).hexdigest()[:12]
            self.root = self.store.cache_dir / key / "mirror"
            self.sync()
        self._seen = self._stamp()

    @property
    def uri(self) -> str:
        return self.store.uri

    def _stamp(self) -> tuple:
        return tuple(self.store.identity(*parts) for parts in WATCHED)

    def refresh(self) -> bool:
        """Bring the copy up to date when the experts changed (an install, a removal); True if they did."""
        stamp = self._stamp()
        if stamp == self._seen:
            return False
        if not self.store.is_local:
            self.sync()
        self._seen = stamp
        return True

    def sync(self) -> None:
        """Copy what is new or changed, drop what the store no longer has."""
        remote: dict[str, pafs.FileInfo] = {}
        for parts in SERVED:
            info = self.store.fs.get_file_info(self.store.path(*parts))
            if info.type == pafs.FileType.File:
                remote[info.path] = info
            elif info.type == pafs.FileType.Directory:
                for f in self.store.fs.get_file_info(pafs.FileSelector(info.path, recursive=True)):
                    if f.type == pafs.FileType.File and "/.tmp-" not in f.path:
                        remote[f.path] = f
        prefix = len(self.store.root) + 1
        wanted = set()
        for path, info in remote.items():
            local = self.root / path[prefix:]
            wanted.add(local)
            if _same(local, info):
                continue
            self._fetch(path, local, info)
        for parts in SERVED:
            top = self.root.joinpath(*parts)
            for local in (p for p in top.rglob("*") if p.is_file()) if top.is_dir() else []:
                if local not in wanted and not local.name.startswith(".stamp-"):
                    local.unlink(missing_ok=True)

    def _fetch(self, path: str, local: Path, info: pafs.FileInfo) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        temp = local.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{local.name}")
        with self.store.fs.open_input_stream(path) as src, open(temp, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        os.replace(temp, local)
        _stamp_file(local).write_text(f"{info.size} {info.mtime_ns}")
        fsync_dir(local.parent)


def _stamp_file(local: Path) -> Path:
    return local.with_name(f".stamp-{local.name}")


def _same(local: Path, info: pafs.FileInfo) -> bool:
    try:
        return local.is_file() and _stamp_file(local).read_text() == f"{info.size} {info.mtime_ns}"
    except FileNotFoundError:
        return False
