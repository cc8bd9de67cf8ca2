"""A local working copy of some parts of a store, for code that edits files by path (the package
registry): check out, edit, commit back. On a local store it is the store itself.

    with checkout(store, parts, last=[("experts", "index.json")]) as root:   # under the store's lock
        Registry(root).install(package)                                       # plain file edits
    # on leaving without an error: new and changed files uploaded, deleted ones deleted, `last` last

The files named in `last` are what makes the edit visible to readers (an index, a manifest), so they
go up after everything they point to. An error inside the block uploads nothing.
"""

from __future__ import annotations

import hashlib
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import pyarrow.fs as pafs

from imoe_ray.store.store import Store

Parts = tuple[str, ...]


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _local_files(root: Path, parts: Sequence[Parts]) -> dict[str, str]:
    """relative path -> sha256 of every file under the parts (a part may be a file or a folder)."""
    out = {}
    for p in parts:
        top = root.joinpath(*p)
        files = [top] if top.is_file() else [f for f in top.rglob("*") if f.is_file()] if top.is_dir() else []
        for f in files:
            out[f.relative_to(root).as_posix()] = _digest(f)
    return out


def _download(store: Store, parts: Sequence[Parts], root: Path) -> None:
    for p in parts:
        info = store.fs.get_file_info(store.path(*p))
        target = root.joinpath(*p)
        if info.type == pafs.FileType.File:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(store.read_bytes(*p))
        elif info.type == pafs.FileType.Directory:
            target.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(info.path, str(target), source_filesystem=store.fs,
                            destination_filesystem=pafs.LocalFileSystem())


@contextmanager
def checkout(store: Store, parts: Sequence[Parts], last: Sequence[Parts] = ()) -> Iterator[Path]:
    """Yield a local directory laid out like the store holding `parts` (and `last`); see the module."""
    if store.is_local:
        yield Path(store.root)
        return
    every = [*parts, *last]
    with tempfile.TemporaryDirectory(prefix="imoe-checkout-") as tmp:
        root = Path(tmp)
        _download(store, every, root)
        before = _local_files(root, every)
        yield root
        after = _local_files(root, every)
        final = {Path(*p).as_posix() for p in last}
        changed = sorted(k for k, v in after.items() if before.get(k) != v)
        for rel in sorted(changed, key=lambda r: any(r == f or r.startswith(f + "/") for f in final)):
            store.write_bytes((root / rel).read_bytes(), *rel.split("/"))
        for rel in sorted(set(before) - set(after)):
            store.remove(*rel.split("/"))
        _drop_empty_folders(store, root, every)


def _drop_empty_folders(store: Store, root: Path, parts: Sequence[Parts]) -> None:
    """Folders deleted locally (a removed expert) go on the store too, where a folder may be a marker."""
    for p in parts:
        if not store.exists(*p):
            continue
        if not root.joinpath(*p).exists():
            store.remove(*p)
            continue
        if store.fs.get_file_info(store.path(*p)).type != pafs.FileType.Directory:
            continue
        infos = store.fs.get_file_info(pafs.FileSelector(store.path(*p), recursive=True))
        for info in sorted((i for i in infos if i.type == pafs.FileType.Directory), key=lambda i: i.path):
            rel = info.path[len(store.root) + 1:]
            if not (root / rel).exists() and store.exists(*rel.split("/")):
                store.fs.delete_dir(info.path)
