"""Writes the corpus of hostile `.expert` archives in tests/data/hostile/ and its `expected.json`
(which error each one must be refused with). Every change to the packaging code runs against it
(tests/test_packaging.py::test_hostile_corpus).

    python tests/data/make_hostile.py

Archives are written byte by byte (raw tar headers, gzip with mtime 0), so they come out the same
on every run and can hold what `tarfile` would never write: GNU long-name and pax headers of
hundreds of megabytes, members before the manifest, sparse files, lying sizes. They target a store
whose base fingerprint is "ab" * 32 and whose router embeds in 8 dimensions (tests' `_make_store`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save

HERE = Path(__file__).resolve().parent / "hostile"
FP = "ab" * 32
DIM = 8
BOMB = 200 << 20          # an extended header this long compresses to about 200 KB
PAYLOAD_BOMB = 505 << 20  # zeros that compress to about 0.5 MB
BLOCK = 512


def weights() -> bytes:
    rng = np.random.default_rng(0)
    return save({"base_model.model.layers.0.q_proj.lora_A.weight": rng.standard_normal((4, 16)).astype(np.float32),
                 "base_model.model.layers.0.q_proj.lora_B.weight": rng.standard_normal((16, 4)).astype(np.float32)})


CONFIG = json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 32}).encode()
WEIGHTS = weights()


def manifest(name: str = "hostile", files: dict[str, bytes] | None = None, **changes) -> dict:
    files = files if files is not None else {"adapter/adapter_config.json": CONFIG,
                                             "adapter/adapter_model.safetensors": WEIGHTS}
    data = {"format": "imoe-expert/1", "name": name, "version": "1.0.0",
            "category": {"name": name, "description": "a hostile package"},
            "routing": {"keywords": ["fish"], "centroid": [0.1] * DIM, "priority": 0.0},
            "base_model": {"id": "store:base", "fingerprint": FP},
            "adapter": {"type": "lora", "rank": 4, "settings": {}},
            "training": {"rows": 1, "tokens": 1, "categories": [name], "metrics": {}},
            "license": "unspecified", "created_at": "2026-01-01T00:00:00Z",
            "files": {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}}
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            data[section][field] = value
        else:
            data[section] = value
    return data


class Writer:
    """A gzip'd tar written header by header."""

    def __init__(self, path: Path, compress: bool = True):
        self.raw = open(path, "wb")
        self.out = gzip.GzipFile(fileobj=self.raw, mode="wb", mtime=0, compresslevel=9) if compress else self.raw

    def header(self, name: str, size: int, type: bytes = tarfile.REGTYPE, **attrs) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.type, info.mtime, info.mode = size, type, 0, 0o644
        for k, v in attrs.items():
            setattr(info, k, v)
        self.out.write(info.tobuf(tarfile.USTAR_FORMAT if len(name) <= 100 else tarfile.GNU_FORMAT,
                                  "utf-8", "surrogateescape"))

    def data(self, payload: bytes) -> None:
        self.out.write(payload + bytes(-len(payload) % BLOCK))

    def zeros(self, n: int) -> None:
        chunk = bytes(1 << 20)
        left = n
        while left > 0:
            self.out.write(chunk[:min(left, len(chunk))])
            left -= min(left, len(chunk))
        self.out.write(bytes(-n % BLOCK))

    def file(self, name: str, payload: bytes, **attrs) -> None:
        self.header(name, len(payload), **attrs)
        self.data(payload)

    def close(self, end: bool = True) -> None:
        if end:
            self.out.write(bytes(2 * BLOCK))
        if self.out is not self.raw:
            self.out.close()
        self.raw.close()


def standard(w: Writer, m: dict | None = None, files: dict[str, bytes] | None = None) -> None:
    w.file("manifest.json", json.dumps(m or manifest()).encode())
    for name, payload in (files or {"adapter/adapter_config.json": CONFIG,
                                    "adapter/adapter_model.safetensors": WEIGHTS}).items():
        w.file(name, payload)


def pax(records: dict[str, str]) -> bytes:
    out = b""
    for k, v in records.items():
        body = f" {k}={v}\n".encode()
        n = len(body) + 1
        while len(str(n)) + len(body) != n:
            n = len(str(n)) + len(body)
        out += str(n).encode() + body
    return out


def build() -> list[dict]:
    HERE.mkdir(parents=True, exist_ok=True)
    expected: list[dict] = []

    def case(name: str, error: str, allow_unsigned: bool = True, file: str | None = None) -> Writer | None:
        expected.append({"case": name, "file": f"{file or name}.expert", "error": error, "allow_unsigned": allow_unsigned})
        return None if file else Writer(HERE / f"{name}.expert")

    def simple(name: str, error: str, extra: list[tuple[str, bytes, dict]]) -> None:
        w = case(name, error)
        standard(w)
        for member, payload, attrs in extra:
            w.file(member, payload, **attrs)
        w.close()

    simple("dotdot", r"'\.\.'", [("adapter/../../escaped.txt", b"x", {})])
    simple("absolute", "absolute path", [("/tmp/imoe-absolute.txt", b"x", {})])
    simple("symlink", "link", [("adapter/link.safetensors", b"", {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"})])
    simple("hardlink", "link", [("adapter/hard.safetensors", b"", {"type": tarfile.LNKTYPE, "linkname": "manifest.json"})])
    simple("device", "device, fifo", [("adapter/dev.safetensors", b"", {"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3})])
    simple("fifo", "device, fifo", [("adapter/pipe.safetensors", b"", {"type": tarfile.FIFOTYPE})])
    simple("sparse", "device, fifo", [("adapter/sparse.safetensors", b"", {"type": tarfile.GNUTYPE_SPARSE})])
    simple("undeclared", "not declared", [("adapter/more.safetensors", WEIGHTS, {})])
    simple("outside-layout", "undeclared file", [("run.sh", b"#!/bin/sh\n", {})])
    simple("too-many", "more than 64 members", [("adapter/", b"", {"type": tarfile.DIRTYPE})] * 70)

    w = case("lying-hash", "sha256 does not match")
    standard(w, files={"adapter/adapter_config.json": CONFIG, "adapter/adapter_model.safetensors": WEIGHTS[:-4] + bytes(4)})
    w.close()

    blob = pickle.dumps({"weight": [1.0, 2.0]})
    for name, member in (("pickle-bin", "adapter/adapter_model.bin"), ("pickle-renamed", "adapter/adapter_model.safetensors")):
        files = {"adapter/adapter_config.json": CONFIG, member: blob}
        w = case(name, "pickle" if name == "pickle-bin" else "not a safetensors file")
        standard(w, manifest(files=files), files)
        w.close()

    # memory before trust: extended headers of 200 MB (about 200 KB compressed)
    w = case("longname-bomb", "extended tar header")
    w.file("manifest.json", json.dumps(manifest()).encode())
    w.header("././@LongLink", BOMB, tarfile.GNUTYPE_LONGNAME)
    w.zeros(BOMB)
    w.file("adapter/adapter_config.json", CONFIG)
    w.close()
    w = case("pax-bomb", "extended tar header")
    w.header("././@PaxHeader", BOMB, tarfile.XHDTYPE)
    w.zeros(BOMB)
    standard(w)
    w.close()
    w = case("pax-global", "global")
    g = pax({"comment": "x"})
    w.header("././@GlobalHead", len(g), tarfile.XGLTYPE)
    w.data(g)
    standard(w)
    w.close()
    long_name = "adapter/" + "a" * 3000 + ".safetensors"
    w = case("long-name", "not declared")
    standard(w)
    w.file(long_name, b"x")
    w.close()

    # disk before trust: a 505 MiB all-zero tensor (a valid safetensors file) declared in an unsigned
    # manifest, about 0.5 MB compressed
    head = json.dumps({"w": {"dtype": "F32", "shape": [PAYLOAD_BOMB // 4 - 64],
                             "data_offsets": [0, PAYLOAD_BOMB - 256]}}).encode()
    head = len(head.ljust(248)).to_bytes(8, "little") + head.ljust(248)
    h = hashlib.sha256(head)
    chunk = bytes(1 << 20)
    left = PAYLOAD_BOMB - len(head)
    while left > 0:
        h.update(chunk[:min(left, len(chunk))])
        left -= min(left, len(chunk))
    bomb_manifest = manifest(files={"adapter/adapter_config.json": CONFIG})
    bomb_manifest["files"]["adapter/adapter_model.safetensors"] = h.hexdigest()
    w = case("unsigned-bomb", "is not signed", allow_unsigned=False)
    w.file("manifest.json", json.dumps(bomb_manifest).encode())
    w.file("adapter/adapter_config.json", CONFIG)
    w.header("adapter/adapter_model.safetensors", PAYLOAD_BOMB)
    w.out.write(head)
    w.zeros(PAYLOAD_BOMB - len(head))
    w.close()
    case("decompression-bomb", "decompression bomb", allow_unsigned=True, file="unsigned-bomb")

    # the manifest: order, names, numbers
    w = case("manifest-not-first", "must be the first member")
    w.file("adapter/adapter_config.json", CONFIG)
    standard(w)
    w.close()
    w = case("manifest-twice", "only once")
    standard(w)
    w.file("manifest.json", json.dumps(manifest()).encode())
    w.close()
    for name, m, error in (
            ("name-base", manifest("base"), "reserved"),
            ("name-summarizer", manifest("summarizer"), "reserved"),
            ("name-dense", manifest("dense"), "reserved"),
            ("name-index", manifest("index"), "reserved"),
            ("name-index-json", manifest("index.json"), "name: String should match pattern"),
            ("name-dotdot", manifest(".."), "name: String should match pattern"),
            ("version-path", manifest(version="../../1.0.0"), "version: String should match pattern"),
            ("nan-centroid", manifest(routing__centroid=[float("nan"), float("inf")] + [0.1] * (DIM - 2)), "finite number"),
            ("huge-centroid", manifest(routing__centroid=[1e30] * DIM), "norm"),
            ("many-keywords", manifest(routing__keywords=[f"word{i}" for i in range(300)]), "keywords"),
            ("long-keyword", manifest(routing__keywords=["x" * 5000]), "keywords"),
            ("inf-priority", manifest(routing__priority=float("inf")), "priority")):
        w = case(name, error)
        w.file("manifest.json", json.dumps(m).encode())
        w.file("adapter/adapter_config.json", CONFIG)
        w.file("adapter/adapter_model.safetensors", WEIGHTS)
        w.close()

    w = case("truncated", "truncated")
    w.file("manifest.json", json.dumps(manifest()).encode())
    w.header("adapter/adapter_config.json", 10 << 20)
    w.out.write(b"x" * 1000)
    w.close(end=False)
    (HERE / "garbage.expert").write_bytes(b"\x1f\x8b" + b"not gzip at all" * 100)
    case("garbage", "not a readable", file="garbage")
    (HERE / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
    return expected


if __name__ == "__main__":
    for c in build():
        print(f"{c['case']:<20} {(HERE / c['file']).stat().st_size:>9,} bytes  → {c['error']}")
