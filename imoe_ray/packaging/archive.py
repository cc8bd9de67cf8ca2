"""Packing and SAFE reading of `.expert` archives (tar.gz of manifest.json, signature.json, adapter/).

An archive is read once, as a stream, and never with `tarfile`'s random-access reader or
`extract`: each 512-byte header is parsed (`tarfile.TarInfo.frombuf`), extended headers (GNU long
names, pax records) are refused above `max_header_bytes` before they are read, and every member
is checked (name, type, size, count) before its bytes are. Decompressed bytes are counted against
`max_total_bytes` and against `max_ratio` times the archive's size (a decompression bomb stops early).

The manifest must be the first member and the signature, if any, the second: the caller's
`admit` check (signature, trust policy, base model) runs on them before any payload byte is
read into a file, and each payload member is hashed as it streams and compared with the
manifest. What is refused: `..` or absolute names, links, devices and fifos, anything but the
declared layout, oversized members / headers / too many members / too much in total, pickled
weights and files whose hashes differ from the manifest's. A directory package (the same layout,
unpacked) goes through the same checks.
"""

from __future__ import annotations

import gzip
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
from imoe_ray.packaging.manifest import ADAPTER_DIR, MODEL_DIR, MODEL_FILES, PICKLE_SUFFIXES, PackageManifest, sha256_file
from imoe_ray.packaging.names import short
from imoe_ray.packaging.signing import Signature

MANIFEST = "manifest.json"
SIGNATURE = "signature.json"
SUFFIX = ".expert"
ADAPTER_FILES = ("adapter_config.json",)   # plus any *.safetensors
MAX_MANIFEST_BYTES = 1 << 20
MAX_SIGNATURE_BYTES = 4096
MAX_SAFETENSORS_HEADER = 16 << 20
BLOCK = 512
_EXTENDED = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)


@dataclass
class Limits:
    max_member_bytes: int = 2 << 30
    max_members: int = 64
    max_total_bytes: int = 4 << 30
    max_header_bytes: int = 4096
    max_ratio: float = 100.0

    @classmethod
    def of(cls, packages_cfg) -> "Limits":
        return cls(packages_cfg.max_member_bytes, packages_cfg.max_members, packages_cfg.max_total_bytes,
                   packages_cfg.max_header_bytes, packages_cfg.max_ratio)


@dataclass
class Unpacked:
    root: Path                      # holds manifest.json, adapter/, maybe signature.json
    manifest: PackageManifest
    signature: Signature | None

    @property
    def adapter(self) -> Path:
        """The payload folder: adapter/, or model/ for a whole-model package."""
        return self.root / self.manifest.payload_dir

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


def file_hashes(files: list[Path], folder: str = ADAPTER_DIR) -> dict[str, str]:
    return {f"{folder}/{p.name}": sha256_file(p) for p in files}


def pack(manifest: PackageManifest, files: list[Path], out: Path, signature: Signature | None = None) -> Path:
    """Write the archive (temp, then rename): manifest first, then the signature, then the payload."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        with tarfile.open(temp, "w:gz", compresslevel=1, format=tarfile.USTAR_FORMAT) as tar:
            _add_bytes(tar, MANIFEST, manifest.to_json().encode())
            if signature is not None:
                _add_bytes(tar, SIGNATURE, json.dumps(signature.to_json(), indent=2).encode())
            for p in files:
                info = tar.gettarinfo(str(p), arcname=f"{manifest.payload_dir}/{p.name}")
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


def resign(package: Path, signature: Signature, limits: Limits | None = None) -> Path:
    """Put `signature` into an archive or a directory package, replacing any earlier one. An archive
    is checked and unpacked (under `limits`) beside itself, then packed again."""
    if package.is_dir():
        read_package(package, limits or Limits())
        _write_atomic(package / SIGNATURE, json.dumps(signature.to_json(), indent=2).encode())
        return package
    with tempfile.TemporaryDirectory(dir=package.parent, prefix=".sign-") as d:
        unpacked = unpack(package, Path(d), limits)
        return pack(unpacked.manifest, sorted(unpacked.adapter.iterdir()), package, signature)


def _write_atomic(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_bytes(data)
    os.replace(temp, path)


# ---- streamed reading ---------------------------------------------------------------------------

@dataclass
class Member:
    name: str
    kind: str                       # file | dir | link | special
    size: int
    chunks: Callable[[], Iterator[bytes]]


class _Counted:
    """The decompressed stream: every byte counted against the total and the expansion ratio."""

    def __init__(self, raw: io.BufferedIOBase, packed_size: int, limits: Limits, where: str):
        self.raw, self.limits, self.where = raw, limits, where
        self.cap = limits.max_total_bytes + limits.max_members * (2 * BLOCK + limits.max_header_bytes) + 2 * BLOCK
        self.ratio_cap = max(1 << 20, int(limits.max_ratio * max(packed_size, 1)))
        self.read_bytes = 0

    def read(self, n: int) -> bytes:
        data = self.raw.read(n)
        self.read_bytes += len(data)
        if self.read_bytes > self.ratio_cap:
            raise PackageError(f"{self.where}: expands to over {self.limits.max_ratio:g} times its size "
                               "(a decompression bomb?)")
        if self.read_bytes > self.cap:
            raise PackageError(f"{self.where}: unpacked size over the {self.limits.max_total_bytes:,}-byte limit")
        return data

    def exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            data = self.read(min(n - len(out), 1 << 20))
            if not data:
                raise PackageError(f"{self.where}: the archive is truncated")
            out += data
        return bytes(out)


def _pax_records(data: bytes, where: str) -> dict[str, str]:
    """`LEN key=value\\n` records of a pax extended header."""
    out, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.find(b" ", pos, pos + 20)
        try:
            length = int(data[pos:space]) if space > pos else 0
        except ValueError:
            length = 0
        record = data[pos:pos + length]
        if length <= space - pos or len(record) != length or not record.endswith(b"\n") or b"=" not in record:
            raise PackageError(f"{where}: a malformed pax header")
        key, _, value = record[space - pos + 1:-1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _tar_members(stream: _Counted, limits: Limits, where: str) -> Iterator[Member]:
    pending: dict[str, str] = {}
    headers = 0
    while True:
        block = stream.exact(BLOCK)
        if block == bytes(BLOCK):
            return   # end of archive
        headers += 1
        if headers > limits.max_members:
            raise PackageError(f"{where}: more than {limits.max_members} members")
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.TarError as e:
            raise PackageError(f"{where}: a damaged tar header ({e})") from None
        if info.type in _EXTENDED:
            if info.size > limits.max_header_bytes:
                raise PackageError(f"{where}: an extended tar header (long name or pax records) of {info.size:,} bytes, "
                                   f"over the {limits.max_header_bytes:,}-byte limit")
            data = stream.exact(-(-info.size // BLOCK) * BLOCK)[:info.size]
            if info.type == tarfile.XGLTYPE:
                raise PackageError(f"{where}: pax global headers are not allowed in a package")
            if info.type == tarfile.GNUTYPE_LONGNAME:
                pending["path"] = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            elif info.type == tarfile.GNUTYPE_LONGLINK:
                pending["linkpath"] = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            else:
                pending.update(_pax_records(data, where))
            continue
        name = pending.get("path", info.name)
        try:
            size = int(pending.get("size", info.size))
        except ValueError:
            raise PackageError(f"{where}: member {short(name)} has a pax size that is not a number") from None
        pending = {}
        kind = ("file" if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE) else "dir" if info.isdir()
                else "link" if info.issym() or info.islnk() else "special")
        if kind != "file":
            size = 0 if kind != "special" or info.type != tarfile.GNUTYPE_SPARSE else size
        left = [size]

        def chunks(left=left) -> Iterator[bytes]:
            while left[0] > 0:
                data = stream.read(min(left[0], 1 << 20))
                if not data:
                    raise PackageError(f"{where}: the archive is truncated")
                left[0] -= len(data)
                yield data

        yield Member(name, kind, size, chunks)
        for _ in chunks():   # what the reader left is skipped, still counted
            pass
        stream.exact(-size % BLOCK)


def _archive_members(package: Path, limits: Limits) -> Iterator[Member]:
    where = str(package)
    with open(package, "rb") as f:
        magic = f.read(2)
        f.seek(0)
        raw: io.BufferedIOBase = gzip.GzipFile(fileobj=f, mode="rb") if magic == b"\x1f\x8b" else f
        try:
            yield from _tar_members(_Counted(raw, os.fstat(f.fileno()).st_size, limits, where), limits, where)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise PackageError(f"{where} is not a readable .expert archive (tar.gz): {e}") from None


def _dir_members(root: Path) -> Iterator[Member]:
    """A directory package's entries: manifest.json and signature.json first, like an archive."""
    def member(p: Path, rel: str) -> Member:
        st = os.lstat(p)
        kind = ("link" if stat.S_ISLNK(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode)
                else "file" if stat.S_ISREG(st.st_mode) else "special")
        if kind == "file" and st.st_nlink > 1:
            kind = "link"

        def chunks() -> Iterator[bytes]:
            with open(p, "rb") as f:
                left = st.st_size
                while left > 0:
                    data = f.read(min(left, 1 << 20))
                    if not data:
                        raise PackageError(f"{root}: {short(rel)} shrank while it was read")
                    left -= len(data)
                    yield data
        return Member(rel, kind, st.st_size if kind == "file" else 0, chunks)

    first = [n for n in (MANIFEST, SIGNATURE) if os.path.lexists(root / n)]
    for n in first:
        yield member(root / n, n)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not os.path.islink(os.path.join(dirpath, d)))
        for n in sorted(filenames) + [d for d in dirnames]:
            p = Path(dirpath) / n
            rel = p.relative_to(root).as_posix()
            if rel not in first:
                yield member(p, rel)
        for d in os.listdir(dirpath):   # symlinked folders are not walked, but still refused
            if os.path.islink(os.path.join(dirpath, d)) and os.path.isdir(os.path.join(dirpath, d)):
                yield member(Path(dirpath) / d, (Path(dirpath) / d).relative_to(root).as_posix())


def _check_name(name: str, kind: str, where: str) -> str:
    quoted = short(name)
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise PackageError(f"{where}: member {quoted} has an absolute path")
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if ".." in parts:
        raise PackageError(f"{where}: member {quoted} climbs out of the package ('..')")
    if kind == "link":
        raise PackageError(f"{where}: member {quoted} is a symbolic or hard link; packages hold plain files only")
    if kind == "special":
        raise PackageError(f"{where}: member {quoted} is a device, fifo or other special file")
    parts = tuple(p for p in parts if p != ".")
    clean = "/".join(parts)
    if kind == "dir":
        if clean not in ("", ADAPTER_DIR, MODEL_DIR):
            raise PackageError(f"{where}: undeclared directory {quoted} (only adapter/ or model/ is allowed)")
        return clean
    if clean in (MANIFEST, SIGNATURE):
        return clean
    if len(parts) != 2 or parts[0] not in (ADAPTER_DIR, MODEL_DIR):
        raise PackageError(f"{where}: undeclared file {quoted} (a package holds manifest.json, signature.json and "
                           "adapter/ or model/)")
    base = parts[1].lower()
    if base.endswith(PICKLE_SUFFIXES):
        raise PackageError(f"{where}: {quoted} is a pickle-based checkpoint; packages carry safetensors weights only")
    if parts[0] == MODEL_DIR and not (base.endswith(".safetensors") or parts[1] in MODEL_FILES):
        raise PackageError(f"{where}: undeclared file {quoted} (model/ holds a model's config, tokenizer files and "
                           "*.safetensors)")
    if parts[0] == ADAPTER_DIR and not (base.endswith(".safetensors") or parts[1] in ADAPTER_FILES):
        raise PackageError(f"{where}: undeclared file {quoted} (adapter/ holds adapter_config.json and *.safetensors)")
    return clean


def _small(member: Member, limit: int, where: str) -> bytes:
    if member.size > limit:
        raise PackageError(f"{where}: {member.name} is {member.size:,} bytes, over the {limit:,}-byte limit")
    return b"".join(member.chunks())


class _SafetensorsHead:
    """Checks, as the bytes stream by, that a file starts like safetensors: an 8-byte length and a JSON object."""

    def __init__(self, size: int, where: str):
        self.size, self.where = size, where
        self.head, self.need, self.checked = bytearray(), 8, False

    def feed(self, data: bytes) -> None:
        while not self.checked and data:
            take = self.need - len(self.head)
            self.head += data[:take]
            data = data[take:]
            if len(self.head) < self.need:
                return
            if self.need == 8:
                n = struct.unpack("<Q", bytes(self.head))[0]
                if not 1 < n <= min(self.size - 8, MAX_SAFETENSORS_HEADER):
                    self._refuse()
                self.need = 8 + n
                continue
            try:
                ok = isinstance(json.loads(bytes(self.head[8:])), dict)
            except (json.JSONDecodeError, UnicodeDecodeError):
                ok = False
            if not ok:
                self._refuse()
            self.checked, self.head = True, bytearray()

    def done(self) -> None:
        if not self.checked:
            self._refuse()

    def _refuse(self) -> None:
        raise PackageError(f"{self.where} is not a safetensors file (a pickle or other format under that name?)")


Admit = Callable[[PackageManifest, "Signature | None"], None]
Sink = Callable[[str], BinaryIO]


def read_package(package: Path, limits: Limits, admit: Admit | None = None,
                 sink: Sink | None = None) -> tuple[PackageManifest, Signature | None]:
    """Stream a package (archive or directory): check every member, call `admit(manifest, signature)`
    before the first payload byte, hand each payload member's bytes to `sink(name)` (a writable
    file; None: only hashed), and check every hash against the manifest. Raises PackageError."""
    where = str(package)
    if not package.exists():
        raise PackageError(f"package not found: {package}")
    members = _dir_members(package) if package.is_dir() else _archive_members(package, limits)
    manifest: PackageManifest | None = None
    signature: Signature | None = None
    admitted = False
    hashes: dict[str, str] = {}
    total = count = 0
    for m in members:
        count += 1
        if count > limits.max_members:
            raise PackageError(f"{where}: more than {limits.max_members} members")
        clean = _check_name(m.name, m.kind, where)
        if m.kind == "dir":
            continue
        if m.size > limits.max_member_bytes:
            raise PackageError(f"{where}: member {short(m.name)} is {m.size:,} bytes, over the "
                               f"{limits.max_member_bytes:,}-byte limit")
        if total + m.size > limits.max_total_bytes:
            raise PackageError(f"{where}: unpacked size over the {limits.max_total_bytes:,}-byte limit")
        total += m.size
        if clean == MANIFEST:
            if manifest is not None or signature is not None or admitted:
                raise PackageError(f"{where}: manifest.json must be the first member, and only once")
            manifest = PackageManifest.parse(_small(m, min(MAX_MANIFEST_BYTES, limits.max_member_bytes), where),
                                             f"{where}: manifest.json")
            continue
        if manifest is None:
            raise PackageError(f"{where}: manifest.json must be the first member (found {short(m.name)} first)")
        if clean == SIGNATURE:
            if signature is not None or admitted:
                raise PackageError(f"{where}: signature.json must come right after manifest.json, once")
            try:
                signature = Signature.from_json(json.loads(_small(m, MAX_SIGNATURE_BYTES, where)))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise PackageError(f"{where}: signature.json is not valid JSON") from None
            continue
        if not admitted:
            if admit is not None:
                admit(manifest, signature)
            admitted = True
        if clean not in manifest.files:
            raise PackageError(f"{where}: files not declared in the manifest: {short(clean)}")
        if clean in hashes:
            raise PackageError(f"{where}: member {short(m.name)} appears twice")
        hashes[clean] = _copy(m, manifest.files[clean], clean, sink, where)
    if manifest is None:
        raise PackageError(f"{where}: no manifest.json")
    if not admitted and admit is not None:
        admit(manifest, signature)
    missing = sorted(set(manifest.files) - set(hashes))
    if missing:
        raise PackageError(f"{where}: files the manifest declares are missing: {', '.join(missing)}")
    if manifest.model is not None:
        if f"{MODEL_DIR}/config.json" not in hashes or not any(k.endswith(".safetensors") for k in hashes):
            raise PackageError(f"{where}: the model needs config.json and safetensors weights")
    elif f"{ADAPTER_DIR}/adapter_config.json" not in hashes or not any(k.endswith(".safetensors") for k in hashes):
        raise PackageError(f"{where}: the adapter needs adapter_config.json and safetensors weights")
    return manifest, signature


def _copy(m: Member, expected: str, clean: str, sink: Sink | None, where: str) -> str:
    h, written = hashlib.sha256(), 0
    head = _SafetensorsHead(m.size, f"{where}: {clean}") if clean.endswith(".safetensors") else None
    out = sink(clean) if sink is not None else None
    try:
        for block in m.chunks():
            written += len(block)
            if written > m.size:   # never trust the header alone
                raise PackageError(f"{where}: member {short(m.name)} is larger than it declares")
            h.update(block)
            if head is not None:
                head.feed(block)
            if out is not None:
                out.write(block)
    finally:
        if out is not None:
            out.close()
    if head is not None:
        head.done()
    if h.hexdigest() != expected:
        raise PackageError(f"{where}: the manifest's sha256 does not match the contents of {clean}")
    return expected


def unpack(package: Path, into: Path, limits: Limits | None = None, admit: Admit | None = None) -> Unpacked:
    """Check and copy a package into a NEW directory under `into`, created only once `admit` has
    passed; on any refusal that directory is removed and a PackageError says why."""
    limits = limits or Limits()
    dest: list[Path] = []

    def folder() -> Path:
        if not dest:
            into.mkdir(parents=True, exist_ok=True)
            dest.append(Path(tempfile.mkdtemp(prefix=".unpack-", dir=into)))
        return dest[0]

    def sink(name: str) -> BinaryIO:
        target = folder() / name
        target.parent.mkdir(exist_ok=True)
        return open(target, "xb")

    try:
        manifest, signature = read_package(package, limits, admit, sink)
        root = folder()
        (root / MANIFEST).write_text(manifest.to_json())
        if signature is not None:
            (root / SIGNATURE).write_text(json.dumps(signature.to_json(), indent=2))
        return Unpacked(root, manifest, signature)
    except BaseException:
        if dest:
            shutil.rmtree(dest[0], ignore_errors=True)
        raise
