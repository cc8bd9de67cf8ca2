"""The registry of a store: installed `.expert` packages side by side, one version of each active.

    STORE/registry/NAME/VERSION/{manifest.json, signature.json?, adapter/}   every installed version
    STORE/registry/NAME/active                                              the active version
    STORE/experts/NAME/                                                     the active one, materialised

`STORE/experts/NAME/` plus its entry in `experts/index.json` and its routing profile in
`router/experts.json` is the contract serving and routing already read, so an installed expert is
served like a trained one and joins routing by its centroid and keywords without retraining.
Every write is temp-then-rename; nothing is written outside the store.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from imoe_ray.config import PackagesConfig
from imoe_ray.packaging import PackageError
from imoe_ray.packaging.archive import MANIFEST, SIGNATURE, SUFFIX, Limits, Unpacked, adapter_files, file_hashes, pack, unpack
from imoe_ray.packaging.manifest import PackageManifest
from imoe_ray.packaging.signing import Signature, trust_status
from imoe_ray.store import write_text_atomic

REGISTRY = "registry"
ACTIVE = "active"
TEMP = ".tmp"
INDEX = ("experts", "index.json")
EXTRA_PROFILES = ("router", "experts.json")   # imoe_ray.routing.stage.EXTRA_EXPERTS


@dataclass
class Installed:
    name: str
    version: str
    category: str
    size: int
    signer: str            # 'unsigned' or the key's first 16 hex digits
    trust: str             # trusted | untrusted | unsigned
    compatible: bool
    active: bool
    path: str


def _write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2))


def _read_json(path: Path, default=None):
    return json.loads(path.read_text()) if path.is_file() else default


def is_git_url(source: str) -> bool:
    return source.startswith(("git@", "git+", "file://", "ssh://", "http://", "https://")) or source.endswith(".git")


class Registry:
    def __init__(self, store: str | Path, cfg: PackagesConfig | None = None):
        self.store = Path(store)
        if "://" in str(store):
            raise PackageError("the registry needs a local store directory")
        self.cfg = cfg or PackagesConfig()
        self.root = self.store / REGISTRY
        self.limits = Limits.of(self.cfg)

    # ---- the store's side ----
    def base_fingerprint(self) -> str:
        base = _read_json(self.store / "manifests" / "base.json")
        if not base or "fingerprint" not in base.get("metrics", {}):
            raise PackageError(f"{self.store} has no base model (manifests/base.json): run "
                               f"`imoe build --store {self.store} --until base` first")
        return base["metrics"]["fingerprint"]

    def _index(self) -> dict:
        index = _read_json(self.store.joinpath(*INDEX))
        if index is None:
            raise PackageError(f"{self.store} has no experts/index.json: run `imoe build --store {self.store} "
                               "--until experts` first")
        return index

    # ---- install ----
    def install(self, source: str, allow_unsigned: bool | None = None, name: str | None = None) -> Installed:
        """Install a package from an archive, a directory or a git URL and make it the active version."""
        allow = self.cfg.allow_unsigned if allow_unsigned is None else allow_unsigned
        temp_root = self.root / TEMP
        temp_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=temp_root, prefix="install-") as work:
            path = Path(source)
            if not path.exists() and is_git_url(source):
                path = find_package(clone(source, Path(work) / "clone"), name)
            elif path.is_dir() and not (path / MANIFEST).is_file():
                path = find_package(path, name)
            unpacked = unpack(path, Path(work), self.limits)
            return self._admit(unpacked, allow, str(path))

    def _admit(self, unpacked: Unpacked, allow_unsigned: bool, where: str) -> Installed:
        m = unpacked.manifest
        trust = trust_status(m, unpacked.signature, self.cfg.trusted_keys)
        if trust != "trusted" and not allow_unsigned:
            who = "is not signed" if trust == "unsigned" else f"is signed by key {unpacked.signature.key} which is not trusted"
            raise PackageError(f"{where} {who}; add the signer to packages.trusted_keys, or pass --allow-unsigned")
        ours = self.base_fingerprint()
        if m.base_model.fingerprint != ours:
            raise PackageError(f"{where} was trained on base model {m.base_model.id!r} with fingerprint "
                               f"{m.base_model.fingerprint}, but this store's base model has fingerprint {ours}: "
                               "an adapter only works on the base it was trained on")
        self._check_centroid(m)
        existing = self.store / "experts" / m.name
        if existing.is_dir() and not (self.root / m.name / ACTIVE).is_file():
            raise PackageError(f"{self.store} already has a trained expert named {m.name!r}; "
                               "package it under another name (`imoe experts package --name`)")
        target = self.root / m.name / m.version
        if target.exists():
            old = PackageManifest.parse((target / MANIFEST).read_bytes())
            if old.files != m.files:
                raise PackageError(f"{m.name} {m.version} is already installed with different contents; "
                                   f"remove it first (`imoe experts remove {m.name} --version {m.version}`)")
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(unpacked.root, target)
        self.activate(m.name, m.version)
        return self._row(m.name, m.version)

    def _check_centroid(self, m: PackageManifest) -> None:
        profiles = _read_json(self.store / "router" / "config.json", {}).get("profiles", [])
        dims = {len(p["centroid"]) for p in profiles if p.get("centroid")}
        if dims and len(m.routing.centroid) not in dims:
            raise PackageError(f"{m.name}: its routing centroid has {len(m.routing.centroid)} dimensions, but this "
                               f"store's router embeds in {sorted(dims)[0]}: it was made with another encoder")

    # ---- activate / deactivate ----
    def activate(self, name: str, version: str) -> None:
        """Materialise NAME VERSION as STORE/experts/NAME and register it for serving and routing."""
        source = self.root / name / version
        if not (source / MANIFEST).is_file():
            raise PackageError(f"{name} {version} is not installed; installed: {', '.join(self.versions(name)) or 'none'}")
        m = PackageManifest.parse((source / MANIFEST).read_bytes())
        signature = _read_json(source / SIGNATURE)
        experts = self.store / "experts"
        staging = experts / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
        shutil.copytree(source / "adapter", staging)
        (staging / "manifest.json").write_text(json.dumps(_expert_manifest(m, signature), indent=2))
        final = experts / name
        if final.exists():
            retired = experts / f".{name}.{uuid.uuid4().hex[:8]}.old"
            os.replace(final, retired)
            os.replace(staging, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, final)
        _write_json_atomic(self.root / name / ACTIVE, {"version": version})
        index = self._index()
        entry = {"name": name, "categories": [name], "rows": m.training.rows, "tokens": m.training.tokens,
                 "package": {"version": version, "category": m.category.name}}
        index["experts"] = [e for e in index["experts"] if e["name"] != name] + [entry]
        _write_json_atomic(self.store.joinpath(*INDEX), index)
        profile = {"name": name, "category": None, "keywords": m.routing.keywords, "centroid": m.routing.centroid,
                   "priority": m.routing.priority}
        extras = [p for p in _read_json(self.store.joinpath(*EXTRA_PROFILES), []) if p["name"] != name]
        _write_json_atomic(self.store.joinpath(*EXTRA_PROFILES), extras + [profile])

    def deactivate(self, name: str) -> None:
        """Stop routing to NAME and stop listing it (requests already running finish: replicas keep
        what they loaded until they evict it)."""
        marker = self.root / name / ACTIVE
        if not marker.is_file():
            return
        extras = [p for p in _read_json(self.store.joinpath(*EXTRA_PROFILES), []) if p["name"] != name]
        _write_json_atomic(self.store.joinpath(*EXTRA_PROFILES), extras)
        index = self._index()
        index["experts"] = [e for e in index["experts"] if e["name"] != name]
        _write_json_atomic(self.store.joinpath(*INDEX), index)
        final = self.store / "experts" / name
        if final.exists():
            retired = final.with_name(f".{name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(final, retired)
            shutil.rmtree(retired, ignore_errors=True)
        marker.unlink()

    def remove(self, name: str, version: str | None = None) -> list[str]:
        """Remove one version (or every version) of NAME; the active one is deactivated first."""
        versions = self.versions(name)
        if not versions:
            raise PackageError(f"no package named {name!r} in {self.root}; installed: {', '.join(self.names()) or 'none'}")
        if version is not None and version not in versions:
            raise PackageError(f"{name} has no version {version}; installed: {', '.join(versions)}")
        doomed = [version] if version else versions
        if self.active_version(name) in doomed:
            self.deactivate(name)
        for v in doomed:
            retired = self.root / TEMP / f"removed-{uuid.uuid4().hex[:8]}"
            retired.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.root / name / v, retired)
            shutil.rmtree(retired, ignore_errors=True)
        if not self.versions(name) and not (self.root / name / ACTIVE).exists():
            shutil.rmtree(self.root / name, ignore_errors=True)
        return doomed

    # ---- queries ----
    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and p.name != TEMP) if self.root.is_dir() else []

    def versions(self, name: str) -> list[str]:
        folder = self.root / name
        return sorted((p.name for p in folder.iterdir() if (p / MANIFEST).is_file()), key=_semver_key) if folder.is_dir() else []

    def active_version(self, name: str) -> str | None:
        marker = _read_json(self.root / name / ACTIVE)
        return marker["version"] if marker else None

    def manifest(self, name: str, version: str | None = None) -> PackageManifest:
        version = version or self.active_version(name) or (self.versions(name) or [None])[-1]
        if version is None:
            raise PackageError(f"no package named {name!r} in {self.root}")
        return PackageManifest.parse((self.root / name / version / MANIFEST).read_bytes())

    def _row(self, name: str, version: str) -> Installed:
        folder = self.root / name / version
        m = PackageManifest.parse((folder / MANIFEST).read_bytes())
        raw = _read_json(folder / SIGNATURE)
        try:
            signature = Signature.from_json(raw) if raw else None
            trust = trust_status(m, signature, self.cfg.trusted_keys)
        except PackageError:
            signature, trust = None, "invalid"
        size = sum(p.stat().st_size for p in (folder / "adapter").iterdir())
        return Installed(name, version, m.category.name, size, signature.key[:16] if signature else "unsigned", trust,
                         m.base_model.fingerprint == self.base_fingerprint(), self.active_version(name) == version,
                         str(folder))

    def list(self) -> list[Installed]:
        return [self._row(n, v) for n in self.names() for v in self.versions(n)]


def _semver_key(version: str) -> tuple:
    core, _, pre = version.split("+")[0].partition("-")
    nums = tuple(int(x) if x.isdigit() else 0 for x in core.split("."))
    return nums + ((1,) if not pre else (0, pre))


def _expert_manifest(m: PackageManifest, signature: dict | None) -> dict:
    """The store's expert manifest (what `imoe build` writes for a trained expert), from a package."""
    return {"name": m.name, "kind": "expert", "base_model": {"name": m.base_model.id, "fingerprint": m.base_model.fingerprint},
            "adapter": {"type": m.adapter.type, "r": m.adapter.rank, **m.adapter.settings},
            "training": m.training.metrics | {"tokens": m.training.tokens}, "category": {"id": None, "name": m.category.name},
            "categories": [m.name], "routing": {"keywords": m.routing.keywords, "priority": m.routing.priority},
            "centroid": m.routing.centroid, "rows": m.training.rows,
            "package": {"version": m.version, "license": m.license, "created_at": m.created_at,
                        "description": m.category.description, "signer": (signature or {}).get("key")}}


# ---- git ----------------------------------------------------------------------------------------

def clone(url: str, into: Path) -> Path:
    url = url[4:] if url.startswith("git+") else url
    try:
        done = subprocess.run(["git", "clone", "--depth", "1", "--quiet", "--", url, str(into)],
                              capture_output=True, text=True, timeout=600, env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
    except FileNotFoundError:
        raise PackageError("installing from a git URL needs the `git` program") from None
    except subprocess.TimeoutExpired:
        raise PackageError(f"git clone {url} took over 10 minutes") from None
    if done.returncode != 0:
        raise PackageError(f"git clone {url} failed: {done.stderr.strip() or done.stdout.strip()}")
    return into


def find_package(root: Path, name: str | None = None) -> Path:
    """The one package in a checkout: a `*.expert` file or a directory holding manifest.json + adapter/."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".git" and not os.path.islink(os.path.join(dirpath, d))]
        here = Path(dirpath)
        if MANIFEST in filenames and (here / "adapter").is_dir():
            found.append(here)
            dirnames[:] = []
        found += [here / f for f in filenames if f.endswith(SUFFIX) and not os.path.islink(here / f)]
    if name:
        found = [p for p in found if p.name in (name, f"{name}{SUFFIX}") or p.name.startswith(f"{name}-")]
    if len(found) != 1:
        listing = ", ".join(str(p.relative_to(root)) for p in found) or "none"
        raise PackageError(f"{root} must hold exactly one package{f' named {name!r}' if name else ''} "
                           f"(a *.expert file or a directory with manifest.json and adapter/); found: {listing}"
                           + ("; pick one with --name" if len(found) > 1 else ""))
    return found[0]


# ---- packaging a trained expert -----------------------------------------------------------------

def package_expert(store: str | Path, name: str, version: str, out: Path | None = None, new_name: str | None = None,
                   description: str = "", license: str = "unspecified") -> tuple[Path, PackageManifest]:
    """Write `STORE/experts/NAME` as an unsigned `.expert` archive."""
    folder = Path(store) / "experts" / name
    info = _read_json(folder / "manifest.json")
    if info is None:
        raise PackageError(f"no expert named {name!r} in {store} (experts/{name}/manifest.json)")
    if not info.get("centroid"):
        raise PackageError(f"expert {name!r} has no centroid (the dense baseline?): routing could not place it")
    files = adapter_files(folder)
    adapter = dict(info.get("adapter", {}))
    kind, rank = adapter.pop("type", "lora"), adapter.pop("r", None)
    training = info.get("training", {})
    metrics = {k: v for k, v in training.items() if isinstance(v, (int, float)) and k != "tokens"}
    data = {"name": new_name or name, "version": version,
            "category": {"name": (info.get("category") or {}).get("name") or name, "description": description},
            "routing": {"keywords": info.get("routing", {}).get("keywords", []), "centroid": info["centroid"],
                        "priority": info.get("routing", {}).get("priority", 0)},
            "base_model": {"id": info["base_model"]["name"], "fingerprint": info["base_model"]["fingerprint"]},
            "adapter": {"type": kind, "rank": rank, "settings": adapter},
            "training": {"rows": info.get("rows"), "tokens": training.get("tokens"),
                         "categories": info.get("categories", [name]), "metrics": metrics},
            "license": license, "files": file_hashes(files)}
    manifest = PackageManifest.parse(json.dumps(data), f"the manifest made for {name}")
    out = out or Path(f"{manifest.name}-{version}{SUFFIX}")
    return pack(manifest, files, out), manifest


def as_dict(row: Installed) -> dict:
    return asdict(row)
