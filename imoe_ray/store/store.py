"""A directory or any URI that `pyarrow.fs` opens (`s3://`, `gs://`, `file://`), with atomic writes.

Atomicity, once for the whole project:
- Every artifact is written under a temporary sibling name (`.tmp-…`) and then committed onto its
  final name. On a local disk a file is committed with `os.replace` (atomic: a reader or a kill sees
  the old file or the new one, never none) after an fsync of the file, and the folder is fsynced
  after the rename; a directory is swapped with two renames, and a kill between them is repaired by
  `clean_temps` (the old one is put back).
- An object store has no rename: a commit there is a copy, visible object by object. What makes a
  stage's outputs count is its manifest (`manifests/STAGE.json`), written last, after every output;
  a stage that starts drops its old manifest first, so a killed stage is re-run, never half-read.
- Writers take the store's lock (`Store.lock`, see `imoe_ray.store.lock`), which works on both.

S3 settings come from the standard AWS variables every S3 tool reads (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, or the instance's role).
"""

from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

TEMP_PREFIX = ".tmp-"
OLD_PREFIX = ".tmp-old-"  # a directory moved aside during a commit; put back if the commit was cut off
DEFAULT_CACHE = Path.home() / ".cache" / "imoe-ray"
SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")


class StoreError(RuntimeError):
    """The store is missing something a stage needs, or cannot be opened; the message says what."""


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new file in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write a local file durably: a temporary sibling, fsync, `os.replace`, fsync of the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex[:8]}-{path.name}")
    with open(temp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
    fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """`write_bytes_atomic` for text (UTF-8)."""
    return write_bytes_atomic(path, text.encode())


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def _s3_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """S3 with the standard AWS variables and short timeouts, so a wrong endpoint fails in seconds."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    has_keys = bool(os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"))
    if endpoint and not has_keys and not os.environ.get("AWS_PROFILE"):
        raise StoreError(f"no S3 credentials for {uri} at {endpoint}: set AWS_ACCESS_KEY_ID and "
                         f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
    options: dict[str, Any] = {"connect_timeout": 5, "request_timeout": 30,
                               "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3)}
    if endpoint:
        options["endpoint_override"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    path = uri.split("://", 1)[1].split("?", 1)[0].rstrip("/")
    return pafs.S3FileSystem(**options), path


def open_filesystem(location: str | Path) -> tuple[pafs.FileSystem, str, bool]:
    """(filesystem, root path inside it, is it the local disk) for a path or a URI."""
    text = str(location)
    if not is_uri(text):
        return pafs.LocalFileSystem(), str(Path(text).expanduser().resolve()), True
    scheme = text.split("://", 1)[0].lower()
    if scheme not in SCHEMES:
        raise StoreError(f"unknown URI scheme {scheme!r} in {text!r}: use a local path or one of "
                         f"{', '.join(s + '://' for s in SCHEMES)}")
    if scheme == "s3":
        fs, root = _s3_filesystem(text)
        return fs, root, False
    try:
        fs, root = pafs.FileSystem.from_uri(text)
    except (pa.ArrowInvalid, OSError) as e:
        raise StoreError(f"cannot open {text!r}: {e}") from None
    return fs, root.rstrip("/"), isinstance(fs, pafs.LocalFileSystem)


def _short(error: Exception) -> str:
    return str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__


class Store:
    """Paths, atomic writes and reads relative to the store's root, on a local disk or an object store."""

    def __init__(self, uri: str | Path, create: bool = True, cache_dir: str | Path | None = None):
        self.fs, self.root, self.is_local = open_filesystem(uri)
        # Absolute, so that Ray workers (whose working directory is not the caller's) find the same store.
        self.uri = str(uri).rstrip("/") if is_uri(uri) else self.root
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else DEFAULT_CACHE
        self._check_reachable()
        if create:
            self.fs.create_dir(self.root, recursive=True)

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    def _check_reachable(self) -> None:
        """An object store's bucket must exist and answer; one clear line otherwise, in seconds."""
        if self.is_local:
            return
        bucket = self.root.split("/", 1)[0]
        try:
            info = self.fs.get_file_info(bucket)
        except OSError as e:
            raise StoreError(f"cannot reach the store {self.uri}: {_short(e)}") from None
        if info.type == pafs.FileType.NotFound:
            raise StoreError(f"the bucket {bucket!r} of the store {self.uri} does not exist: create it first")
        try:
            self.fs.get_file_info(self.root)
        except OSError as e:
            raise StoreError(f"cannot read the store {self.uri}: {_short(e)}") from None

    # ---- names ---------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.root, *[p.strip("/") for p in parts if p]])

    def uri_of(self, *parts: str) -> str:
        """The location as a URI (a plain path for a local store), for libraries and Ray workers."""
        path = self.path(*parts)
        if self.is_local:
            return path
        return f"{self.uri.split('://', 1)[0]}://{path}"

    def local_path(self, *parts: str) -> Path:
        """A real filesystem path, for libraries that need one and cannot read a URI."""
        if not self.is_local:
            raise StoreError(f"{self.uri} is not a local store; this step needs a local directory")
        return Path(self.path(*parts))

    def storage_options(self) -> dict[str, str]:
        """Options for libraries with their own object-store client (LanceDB): plain-HTTP endpoints
        (a local S3 server) must be allowed explicitly there."""
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
        if not self.is_local and endpoint.startswith("http://"):
            return {"allow_http": "true"}
        return {}

    # ---- reading -------------------------------------------------------------------------------
    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def is_file(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type == pafs.FileType.File

    def listdir(self, *parts: str) -> list[str]:
        base = self.path(*parts)
        if not self.exists(*parts):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=False))
        return sorted(i.base_name for i in infos if not i.base_name.startswith(TEMP_PREFIX))

    def identity(self, *parts: str) -> tuple | None:
        """What changes when a file is replaced (size, modification time), or None when it is absent."""
        info = self.fs.get_file_info(self.path(*parts))
        if info.type == pafs.FileType.NotFound:
            return None
        return info.size, info.mtime_ns

    def read_bytes(self, *parts: str) -> bytes:
        if not self.is_file(*parts):
            raise StoreError(f"{self.uri_of(*parts)} does not exist")
        with self.fs.open_input_stream(self.path(*parts)) as f:
            return f.read()

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts))

    def read_table(self, *parts: str, columns: list[str] | None = None) -> pa.Table:
        if not self.exists(*parts):
            raise StoreError(f"{self.uri_of(*parts)} does not exist")
        return pq.read_table(self.path(*parts), filesystem=self.fs, columns=columns)

    def local_dir(self, *parts: str, cache: str | Path | None = None) -> Path:
        """A local directory holding `parts`: the path itself in a local store, else a copy in the
        cache (one folder per store and path, refreshed when the stored files change)."""
        if not self.exists(*parts):
            raise StoreError(f"{self.uri_of(*parts)} does not exist")
        if self.is_local:
            return Path(self.path(*parts))
        return self._cached(self.path(*parts), Path(cache) if cache else self.cache_dir)

    def _cached(self, remote: str, cache: Path) -> Path:
        infos = [i for i in self.fs.get_file_info(pafs.FileSelector(remote, recursive=True))
                 if i.type == pafs.FileType.File]
        stamp = json.dumps(sorted((i.path, i.size, i.mtime_ns) for i in infos)).encode()
        import hashlib

        key = hashlib.sha256(stamp).hexdigest()[:16]
        target = cache / hashlib.sha256(self.uri.encode()).hexdigest()[:12] / remote[len(self.root):].strip("/") / key
        if (target / ".complete").is_file():
            return target
        temp = target.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex[:8]}-{key}")
        temp.mkdir(parents=True)
        pafs.copy_files(remote, str(temp), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
        (temp / ".complete").write_text(remote)
        try:
            os.replace(temp, target)
        except OSError:  # another process filled the same cache entry first
            import shutil

            shutil.rmtree(temp, ignore_errors=True)
        return target

    # ---- writing -------------------------------------------------------------------------------
    def temp_path(self, *parts: str) -> str:
        """A temporary sibling of the target; move it into place with `commit`."""
        target = self.path(*parts)
        parent, _, name = target.rpartition("/")
        self.fs.create_dir(parent, recursive=True)
        return f"{parent}/{TEMP_PREFIX}{uuid.uuid4().hex[:8]}-{name}"

    def commit(self, temp: str, *parts: str) -> str:
        """Move a finished temporary file or directory onto its final name, replacing any old one
        (see the module's docstring for what is atomic where)."""
        target = self.path(*parts)
        if self.is_local:
            self._commit_local(temp, target)
            return target
        old = self.fs.get_file_info(target)
        if self.fs.get_file_info(temp).type == pafs.FileType.Directory:
            if old.type != pafs.FileType.NotFound:
                self._delete(old)
            pafs.copy_files(temp, target, source_filesystem=self.fs, destination_filesystem=self.fs)
            self.fs.delete_dir(temp)
        else:
            self.fs.move(temp, target)  # one object: a server-side copy that replaces the old one
        return target

    @staticmethod
    def _commit_local(temp: str, target: str) -> None:
        if not os.path.isdir(temp) or not os.path.exists(target):
            os.replace(temp, target)
        else:
            parent, name = os.path.split(target)
            aside = os.path.join(parent, f"{OLD_PREFIX}{uuid.uuid4().hex[:8]}-{name}")
            os.replace(target, aside)
            os.replace(temp, target)
            import shutil

            shutil.rmtree(aside, ignore_errors=True) if os.path.isdir(aside) else os.remove(aside)
        fsync_dir(os.path.dirname(target))

    def _delete(self, info: pafs.FileInfo) -> None:
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(info.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(info.path)

    def remove(self, *parts: str) -> None:
        self._delete(self.fs.get_file_info(self.path(*parts)))

    def clean_temps(self, *parts: str) -> None:
        """Remove temporaries that a killed run left behind under a folder; a directory moved aside
        by a commit that was cut off goes back to its name."""
        base = self.path(*parts)
        if not self.exists(*parts):
            return
        for info in self.fs.get_file_info(pafs.FileSelector(base, recursive=False)):
            name = info.base_name
            if name.startswith(OLD_PREFIX):
                original = f"{base}/{name[len(OLD_PREFIX) + 9:]}"
                if self.fs.get_file_info(original).type == pafs.FileType.NotFound:
                    self.fs.move(info.path, original)
                    continue
            if name.startswith(TEMP_PREFIX):
                self._delete(info)

    def write_bytes(self, data: bytes, *parts: str) -> str:
        if self.is_local:
            return str(write_bytes_atomic(self.path(*parts), data))
        temp = self.temp_path(*parts)
        with self.fs.open_output_stream(temp) as f:
            f.write(data)
        return self.commit(temp, *parts)

    def write_json(self, obj: Any, *parts: str) -> str:
        return self.write_bytes(json.dumps(obj, indent=2, sort_keys=False, default=str).encode(), *parts)

    def write_table(self, table: pa.Table, *parts: str) -> str:
        temp = self.temp_path(*parts)
        pq.write_table(table, temp, filesystem=self.fs)
        return self.commit(temp, *parts)

    def put_dir(self, local_dir: str | Path, *parts: str) -> str:
        """Upload a finished local directory (a model, an adapter) under `parts`, replacing any old one."""
        temp = self.temp_path(*parts)
        self.fs.create_dir(temp, recursive=True)
        pafs.copy_files(str(local_dir), temp, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
        return self.commit(temp, *parts)

    @contextmanager
    def lock(self, purpose: str, wait_s: float = 0.0) -> Iterator[None]:
        """Hold the store's one writer lock while the block runs; raises `StoreLocked` (naming the
        holder) when another build, install or edit holds it."""
        from imoe_ray.store.lock import StoreLock

        with StoreLock(self, purpose, wait_s=wait_s):
            yield
