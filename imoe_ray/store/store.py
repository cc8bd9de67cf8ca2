"""A directory or any URI that `pyarrow.fs` opens, with atomic writes.

Everything is written to a temporary sibling first and renamed into place, so a killed run
never leaves a half-written artifact under its final name.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


class StoreError(RuntimeError):
    """The store is missing something a stage needs; the message says what and how to make it."""


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a local file through a temporary name in the same folder, then rename it into place."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    temp.write_text(text)
    os.replace(temp, path)
    return path


def _split_uri(uri: str) -> tuple[pafs.FileSystem, str, bool]:
    if "://" in uri:
        fs, root = pafs.FileSystem.from_uri(uri)
        return fs, root.rstrip("/"), isinstance(fs, pafs.LocalFileSystem)
    path = Path(uri).expanduser().resolve()
    return pafs.LocalFileSystem(), str(path), True


class Store:
    """Paths, atomic writes and reads relative to the store's root."""

    def __init__(self, uri: str | Path):
        self.fs, self.root, self.is_local = _split_uri(str(uri))
        # Absolute, so that Ray workers (whose working directory is not the caller's) find the same store.
        self.uri = str(uri) if "://" in str(uri) else self.root
        self.fs.create_dir(self.root, recursive=True)

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *[p.strip("/") for p in parts if p]])

    def local_path(self, *parts: str) -> Path:
        """A real filesystem path, for libraries that need one (LanceDB, Hugging Face)."""
        if not self.is_local:
            raise StoreError(f"{self.uri} is not a local store; this step needs a local directory")
        return Path(self.path(*parts))

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def listdir(self, *parts: str) -> list[str]:
        base = self.path(*parts)
        if not self.exists(*parts):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=False))
        return sorted(i.base_name for i in infos if not i.base_name.startswith(".tmp-"))

    def remove(self, *parts: str) -> None:
        info = self.fs.get_file_info(self.path(*parts))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(info.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(info.path)

    def temp_path(self, *parts: str) -> str:
        """A temporary sibling of the target; rename it into place with `commit`."""
        target = self.path(*parts)
        parent, _, name = target.rpartition("/")
        self.fs.create_dir(parent, recursive=True)
        return f"{parent}/.tmp-{uuid.uuid4().hex[:8]}-{name}"

    def commit(self, temp: str, *parts: str) -> str:
        """Move a finished temporary file or directory onto its final name, replacing any old one."""
        target = self.path(*parts)
        self.remove(*parts)
        self.fs.move(temp, target)
        return target

    def clean_temps(self, *parts: str) -> None:
        """Remove temporaries that a killed run left behind under a folder."""
        base = self.path(*parts)
        if not self.exists(*parts):
            return
        for info in self.fs.get_file_info(pafs.FileSelector(base, recursive=False)):
            if info.base_name.startswith(".tmp-"):
                if info.type == pafs.FileType.Directory:
                    self.fs.delete_dir(info.path)
                else:
                    self.fs.delete_file(info.path)

    def write_bytes(self, data: bytes, *parts: str) -> str:
        temp = self.temp_path(*parts)
        with self.fs.open_output_stream(temp) as f:
            f.write(data)
        return self.commit(temp, *parts)

    def read_bytes(self, *parts: str) -> bytes:
        if not self.exists(*parts):
            raise StoreError(f"{self.path(*parts)} does not exist")
        with self.fs.open_input_stream(self.path(*parts)) as f:
            return f.read()

    def write_json(self, obj: Any, *parts: str) -> str:
        return self.write_bytes(json.dumps(obj, indent=2, sort_keys=False, default=str).encode(), *parts)

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts))

    def write_table(self, table: pa.Table, *parts: str) -> str:
        temp = self.temp_path(*parts)
        pq.write_table(table, temp, filesystem=self.fs)
        return self.commit(temp, *parts)

    def uri_of(self, *parts: str) -> str:
        """The location as a URI (a plain path for a local store), for libraries that take one."""
        path = self.path(*parts)
        if self.is_local:
            return path
        return f"{self.uri.split('://', 1)[0]}://{path}"

    def put_dir(self, local_dir: str | Path, *parts: str) -> str:
        """Upload a finished local directory (a model, an adapter) atomically under `parts`."""
        temp = self.temp_path(*parts)
        self.fs.create_dir(temp, recursive=True)
        pafs.copy_files(str(local_dir), temp, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
        return self.commit(temp, *parts)

    def local_dir(self, *parts: str, cache: str | Path | None = None) -> Path:
        """A local directory holding `parts`: the path itself in a local store, else a downloaded copy."""
        if not self.exists(*parts):
            raise StoreError(f"{self.path(*parts)} does not exist")
        if self.is_local:
            return Path(self.path(*parts))
        import tempfile

        target = Path(cache or tempfile.mkdtemp(prefix="imoe-")) / parts[-1]
        if not target.exists():
            target.mkdir(parents=True)
            pafs.copy_files(self.path(*parts), str(target), source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem())
        return target

    def read_table(self, *parts: str, columns: list[str] | None = None) -> pa.Table:
        if not self.exists(*parts):
            raise StoreError(f"{self.path(*parts)} does not exist")
        return pq.read_table(self.path(*parts), filesystem=self.fs, columns=columns)
