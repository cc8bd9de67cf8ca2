"""Packing and SAFE unpacking of `.expert` archives (tar.gz of manifest.json, adapter/, signature.json).

Unpacking never calls `tarfile.extract`: every member is checked first (name, type, size, count)
and its bytes are copied by us into a fresh directory, hashed on the way, then compared with the
manifest. What is refused: `..` or absolute names, links, devices and fifos, anything but the
declared layout, oversized members / too many members / too much in total, pickled weights
(`.bin`, `.pt`, ...) and files whose hashes differ from the manifest's. A directory package (the
same layout, unpacked) goes through the same checks.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import struct
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterator

from imoe_ray.packaging import PackageError
from imoe_ray.packaging.manifest import ADAPTER_DIR, PackageManifest, sha256_file
from imoe_ray.packaging.signing import Signature

MANIFEST = "manifest.json"
SIGNATURE = "signature.json"
SUFFIX = ".expert"
ADAPTER_FILES = ("adapter_config.json",)   # plus any *.safetensors
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib")


@dataclass
class Limits:
    max_member_bytes: int = 2 << 30
    max_members: int = 64
    max_total_bytes: int = 4 << 30

    @classmethod
    def of(cls, packages_cfg) -> "Limits":
        return cls(packages_cfg.max_member_bytes, packages_cfg.max_members, packages_cfg.max_total_bytes)


@dataclass
class Unpacked:
    root: Path                      # holds manifest.json, adapter/, maybe signature.json
    manifest: PackageManifest
    signature: Signature | None

    @property
    def adapter(self) -> Path:
        return self.root / ADAPTER_DIR

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.adapter.iterdir())


# ---- pack ---------------------------------------------------------------------------------------

def adapter_files(adapter_dir: Path) -> list[Path]:
    """The files of a PEFT adapter directory that go into a package (config + safetensors)."""
    files = sorted(p for p in adapter_dir.iterdir() if p.is_file() and (p.name in ADAPTER_FILES or p.suffix == ".safetensors"))
    if not any(p.suffix == ".safetensors" for p in files) or not (adapter_dir / "adapter_config.json").is_file():
        raise PackageError(f"{adapter_dir} is not a PEFT adapter with safetensors weights "
                           "(adapter_config.json + *.safetensors)")
    return files


def file_hashes(files: list[Path]) -> dict[str, str]:
    return {f"{ADAPTER_DIR}/{p.name}": sha256_file(p) for p in files}


def pack(manifest: PackageManifest, files: list[Path], out: Path, signature: Signature | None = None) -> Path:
    """Write the archive (temp, then rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        with tarfile.open(temp, "w:gz", compresslevel=1) as tar:
            _add_bytes(tar, MANIFEST, manifest.to_json().encode())
            if signature is not None:
                _add_bytes(tar, SIGNATURE, json.dumps(signature.to_json(), indent=2).encode())
            for p in files:
                info = tar.gettarinfo(str(p), arcname=f"{ADAPTER_DIR}/{p.name}")
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mode = 0o644
                with open(p, "rb") as f:
                    tar.addfile(info, f)
        os.replace(temp, out)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return out


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def resign(package: Path, signature: Signature) -> Path:
    """Put `signature` into an archive or a directory package, replacing any earlier one."""
    if package.is_dir():
        _write_atomic(package / SIGNATURE, json.dumps(signature.to_json(), indent=2).encode())
        return package
    with tempfile.TemporaryDirectory(dir=package.parent, prefix=".sign-") as d:
        unpacked = unpack(package, Path(d))
        return pack(unpacked.manifest, sorted(unpacked.adapter.iterdir()), package, signature)


def _write_atomic(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_bytes(data)
    os.replace(temp, path)


# ---- safe unpack --------------------------------------------------------------------------------

Entry = tuple[str, str, int, Callable[[], BinaryIO]]   # (name, kind: file|dir|other, size, opener)


def unpack(package: Path, into: Path, limits: Limits | None = None) -> Unpacked:
    """Check and copy a package (archive or directory) into a NEW directory under `into`; on any
    refusal that directory is removed and a PackageError says why."""
    limits = limits or Limits()
    if not package.exists():
        raise PackageError(f"package not found: {package}")
    into.mkdir(parents=True, exist_ok=True)
    dest = Path(tempfile.mkdtemp(prefix=".unpack-", dir=into))
    try:
        if package.is_dir():
            hashes = _copy_entries(_dir_entries(package), dest, limits, str(package))
        else:
            try:
                with tarfile.open(package, "r:*") as tar:
                    hashes = _copy_entries(_tar_entries(tar), dest, limits, str(package))
            except (tarfile.TarError, EOFError, OSError) as e:
                if isinstance(e, PackageError):
                    raise
                raise PackageError(f"{package} is not a readable .expert archive (tar.gz): {e}") from None
        return _verified(dest, hashes, str(package))
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _tar_entries(tar: tarfile.TarFile) -> Iterator[Entry]:
    for m in tar:   # streamed: a member-count bomb is stopped by the count check, not read whole
        kind = "file" if m.isreg() else "dir" if m.isdir() else "link" if (m.issym() or m.islnk()) else "special"
        yield m.name, kind, m.size, (lambda m=m: tar.extractfile(m))


def _dir_entries(root: Path) -> Iterator[Entry]:
    for dirpath, dirnames, filenames in os.walk(root):
        for n in sorted(dirnames) + sorted(filenames):
            p = Path(dirpath) / n
            st = os.lstat(p)
            kind = ("link" if stat.S_ISLNK(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode)
                    else "file" if stat.S_ISREG(st.st_mode) else "special")
            if kind == "file" and st.st_nlink > 1:
                kind = "link"
            yield p.relative_to(root).as_posix(), kind, st.st_size, (lambda p=p: open(p, "rb"))
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]


def _check_name(name: str, kind: str, where: str) -> str:
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise PackageError(f"{where}: member {name!r} has an absolute path")
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if ".." in parts:
        raise PackageError(f"{where}: member {name!r} climbs out of the package ('..')")
    if kind == "link":
        raise PackageError(f"{where}: member {name!r} is a symbolic or hard link; packages hold plain files only")
    if kind == "special":
        raise PackageError(f"{where}: member {name!r} is a device, fifo or other special file")
    parts = tuple(p for p in parts if p != ".")
    clean = "/".join(parts)
    if kind == "dir":
        if clean not in ("", ADAPTER_DIR):
            raise PackageError(f"{where}: undeclared directory {name!r} (only adapter/ is allowed)")
        return clean
    if clean in (MANIFEST, SIGNATURE):
        return clean
    if len(parts) != 2 or parts[0] != ADAPTER_DIR:
        raise PackageError(f"{where}: undeclared file {name!r} (a package holds manifest.json, signature.json and adapter/)")
    base = parts[1].lower()
    if base.endswith(PICKLE_SUFFIXES):
        raise PackageError(f"{where}: {name!r} is a pickle-based checkpoint; packages carry safetensors weights only")
    if not (base.endswith(".safetensors") or parts[1] in ADAPTER_FILES):
        raise PackageError(f"{where}: undeclared file {name!r} (adapter/ holds adapter_config.json and *.safetensors)")
    return clean


def _copy_entries(entries: Iterator[Entry], dest: Path, limits: Limits, where: str) -> dict[str, str]:
    hashes: dict[str, str] = {}
    total = count = 0
    for name, kind, size, opener in entries:
        count += 1
        if count > limits.max_members:
            raise PackageError(f"{where}: more than {limits.max_members} members")
        clean = _check_name(name, kind, where)
        if kind == "dir":
            continue
        if size > limits.max_member_bytes:
            raise PackageError(f"{where}: member {name!r} is {size:,} bytes, over the {limits.max_member_bytes:,}-byte limit")
        if total + size > limits.max_total_bytes:
            raise PackageError(f"{where}: unpacked size over the {limits.max_total_bytes:,}-byte limit")
        if clean in hashes:
            raise PackageError(f"{where}: member {name!r} appears twice")
        target = dest / clean
        target.parent.mkdir(exist_ok=True)
        h, written = hashlib.sha256(), 0
        src = opener()
        with src, open(target, "xb") as out:
            for block in iter(lambda: src.read(1 << 20), b""):
                written += len(block)
                if written > size or written > limits.max_member_bytes:   # never trust the header alone
                    raise PackageError(f"{where}: member {name!r} is larger than it declares")
                h.update(block)
                out.write(block)
        total += written
        hashes[clean] = h.hexdigest()
    return hashes


def _verified(dest: Path, hashes: dict[str, str], where: str) -> Unpacked:
    if MANIFEST not in hashes:
        raise PackageError(f"{where}: no manifest.json")
    manifest = PackageManifest.parse((dest / MANIFEST).read_bytes(), f"{where}: manifest.json")
    payload = {k: v for k, v in hashes.items() if k not in (MANIFEST, SIGNATURE)}
    extra = sorted(set(payload) - set(manifest.files))
    missing = sorted(set(manifest.files) - set(payload))
    if extra:
        raise PackageError(f"{where}: files not declared in the manifest: {', '.join(extra)}")
    if missing:
        raise PackageError(f"{where}: files the manifest declares are missing: {', '.join(missing)}")
    lying = sorted(k for k in payload if payload[k] != manifest.files[k])
    if lying:
        raise PackageError(f"{where}: the manifest's sha256 does not match the contents of {', '.join(lying)}")
    if f"{ADAPTER_DIR}/adapter_config.json" not in payload or not any(k.endswith(".safetensors") for k in payload):
        raise PackageError(f"{where}: the adapter needs adapter_config.json and safetensors weights")
    for k in payload:
        if k.endswith(".safetensors"):
            _check_safetensors(dest / k, f"{where}: {k}")
    signature = None
    if SIGNATURE in hashes:
        try:
            signature = Signature.from_json(json.loads((dest / SIGNATURE).read_bytes()))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise PackageError(f"{where}: signature.json is not valid JSON") from None
    return Unpacked(dest, manifest, signature)


def _check_safetensors(path: Path, where: str) -> None:
    """The safetensors header (8-byte length + JSON) must parse and fit: a renamed pickle does not."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        ok = 1 < n <= min(size - 8, 100 << 20)
        header = f.read(n) if ok else b""
    try:
        ok = ok and isinstance(json.loads(header), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise PackageError(f"{where} is not a safetensors file (a pickle or other format under that name?)")
