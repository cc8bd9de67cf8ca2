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

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from imoe_ray.config import PackagesConfig
from imoe_ray.packaging import PackageError
from imoe_ray.packaging.archive import MANIFEST, SIGNATURE, SUFFIX, Limits, Unpacked, adapter_files, file_hashes, pack, unpack
from imoe_ray.packaging.manifest import MODEL_DIR, PackageManifest, sha256_file
from imoe_ray.packaging.names import NAME_PATTERN, check_name, check_version, inside, semver_key, short
from imoe_ray.packaging.signing import Signature, check, parse_public_key, trust_status
from imoe_ray.store import write_text_atomic

REGISTRY = "registry"
ACTIVE = "active"
TEMP = ".tmp"
TRUST = "trust.json"
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
        if "://" in str(store):
            raise PackageError("the registry needs a local store directory")
        self.store = Path(store).resolve()
        self.cfg = cfg or PackagesConfig()
        self.root = self.store / REGISTRY
        self.limits = Limits.of(self.cfg)

    # ---- paths: every one checked to lie inside the registry (or the store's experts/) ----
    def _dir(self, name: str, version: str | None = None) -> Path:
        check_name(name)
        return inside(self.root, name, check_version(version)) if version is not None else inside(self.root, name)

    def _served(self, name: str) -> Path:
        return inside(self.store / "experts", check_name(name))

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

    # ---- trust: which keys may publish which names ----
    def trust_file(self) -> dict:
        """`registry/trust.json`: {"keys": {KEY: {"names": [...], "trusted": bool}}}: the names each key
        publishes (its first install of a name binds it) and whether `imoe keys trust` trusted it here."""
        data = _read_json(self.root / TRUST, {"keys": {}})
        return data if isinstance(data.get("keys"), dict) else {"keys": {}}

    def publishers(self, name: str) -> set[str]:
        return {k for k, v in self.trust_file()["keys"].items() if name in v.get("names", [])}

    def trusted_keys(self) -> list[str]:
        return list(self.cfg.trusted_keys) + [k for k, v in self.trust_file()["keys"].items() if v.get("trusted")]

    def lock(self, purpose: str):
        """The store's one writer lock (`Store.lock`): raises StoreLocked naming the holder."""
        from imoe_ray.store import Store

        return Store(self.store, create=False).lock(purpose)

    def trust(self, key: str, names: list[str], trusted: bool = True) -> list[str]:
        """Let `key` publish `names` (besides any key already bound to them); `trusted`: also trust it
        in this store (`imoe keys trust`)."""
        with self.lock("imoe keys trust"):
            return self._trust(key, names, trusted)

    def _trust(self, key: str, names: list[str], trusted: bool) -> list[str]:
        key = parse_public_key(key)
        names = [check_name(n) for n in names]
        data = self.trust_file()
        entry = data["keys"].setdefault(key, {"names": [], "trusted": False})
        entry["names"] = sorted(set(entry["names"]) | set(names))
        entry["trusted"] = bool(entry.get("trusted")) or trusted
        self.root.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(self.root / TRUST, data)
        return entry["names"]

    def _bind(self, name: str, key: str) -> None:
        """First publisher wins: a name nobody publishes yet is bound to the key that signed it."""
        if not self.publishers(name):
            self._trust(key, [name], trusted=False)

    # ---- install ----
    def install(self, source: str, allow_unsigned: bool | None = None, name: str | None = None,
                allow_downgrade: bool = False) -> Installed:
        """Install a package from an archive, a directory or a git URL and make it the active version.
        Nothing is written under the registry before the manifest, its signature and the trust policy
        have passed; a refusal leaves the store as it was."""
        allow = self.cfg.allow_unsigned if allow_unsigned is None else allow_unsigned
        path = Path(source)
        clone_dir = None
        held = contextlib.ExitStack()

        def admit(m: PackageManifest, signature: Signature | None) -> None:
            self._check_trust(m, signature, allow, where)   # refused here: not a byte written anywhere
            held.enter_context(self.lock(f"imoe experts install {m.name} {m.version}"))
            self._check(m, signature, allow, allow_downgrade, where)   # again under the lock, with the store's state

        try:
            if not path.exists() and is_git_url(source):
                self.root.mkdir(parents=True, exist_ok=True)
                clone_dir = Path(tempfile.mkdtemp(prefix="clone-", dir=self._temp()))
                path = find_package(clone(source, clone_dir / "repo"), name)
            elif path.is_dir() and not (path / MANIFEST).is_file():
                path = find_package(path, name)
            where = str(path)
            with held:
                unpacked = unpack(path, self.root / TEMP, self.limits, admit=admit)
                try:
                    return self._admit(unpacked, allow_downgrade)
                finally:
                    shutil.rmtree(unpacked.root, ignore_errors=True)
                    self._drop_empty_temp()
        finally:
            if clone_dir is not None:
                shutil.rmtree(clone_dir, ignore_errors=True)
            self._drop_empty_temp()

    def _temp(self) -> Path:
        temp = self.root / TEMP
        temp.mkdir(parents=True, exist_ok=True)
        return temp

    def _drop_empty_temp(self) -> None:
        for folder in (self.root / TEMP, self.root):
            try:
                folder.rmdir()   # only when empty: a refused install leaves no trace
            except OSError:
                pass

    def _check(self, m: PackageManifest, signature: Signature | None, allow_unsigned: bool, allow_downgrade: bool,
               where: str) -> None:
        """Everything decided from the manifest, the signature and the store, before a payload byte is written."""
        self._check_trust(m, signature, allow_unsigned, where)
        bound = self.publishers(m.name)
        if bound and (signature is None or signature.key not in bound):
            signer = f"key {signature.key[:16]}…" if signature else "nobody (unsigned)"
            raise PackageError(f"{m.name!r} is published by key {sorted(bound)[0][:16]}…, but {where} is signed by "
                               f"{signer}; to let that key publish it: `imoe keys trust KEY --names {m.name}`")
        ours = self.base_fingerprint()
        if m.adapter is not None and m.base_model is not None and m.base_model.fingerprint != ours:  # a whole model needs no base
            raise PackageError(f"{where} was trained on base model {short(m.base_model.id)} with fingerprint "
                               f"{m.base_model.fingerprint}, but this store's base model has fingerprint {ours}: "
                               "an adapter only works on the base it was trained on")
        self._check_centroid(m)
        served = self._served(m.name)
        if (served.exists() or served.is_symlink()) and not (self._dir(m.name) / ACTIVE).is_file():
            what = "a trained expert" if served.is_dir() else "a file"
            raise PackageError(f"{self.store} already has {what} named {m.name!r} in experts/; "
                               "package it under another name (`imoe experts package --name`)")
        for other in (self.store / "fusion" / m.name, self.store / "baselines" / m.name):
            if other.exists():
                raise PackageError(f"{m.name!r} is the name of a built-in adapter of this store ({other}); choose another")
        self._check_downgrade(m.name, m.version, allow_downgrade)
        target = self._dir(m.name, m.version)
        if target.exists():
            old = PackageManifest.parse((target / MANIFEST).read_bytes())
            if old.files != m.files:
                raise PackageError(f"{m.name} {m.version} is already installed with different contents; "
                                   f"remove it first (`imoe experts remove {m.name} --version {m.version}`)")

    def _check_trust(self, m: PackageManifest, signature: Signature | None, allow_unsigned: bool, where: str) -> None:
        check_name(m.name)
        check_version(m.version)
        trust = trust_status(m, signature, self.trusted_keys())
        if trust != "trusted" and not allow_unsigned:
            who = "is not signed" if trust == "unsigned" or signature is None else f"is signed by key {signature.key} which is not trusted"
            raise PackageError(f"{where} {who}; add the signer to packages.trusted_keys, or pass --allow-unsigned")

    def _check_downgrade(self, name: str, version: str, allow_downgrade: bool) -> None:
        active = self.active_version(name)
        if active and semver_key(version) < semver_key(active) and not allow_downgrade:
            raise PackageError(f"{name} {version} is older than the active version {active}; "
                               "pass --allow-downgrade to go back")

    def _admit(self, unpacked: Unpacked, allow_downgrade: bool) -> Installed:
        m = unpacked.manifest
        target = self._dir(m.name, m.version)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(unpacked.root, target)
        self._activate(m.name, m.version, allow_downgrade)
        if unpacked.signature is not None:
            self._bind(m.name, unpacked.signature.key)
        return self._row(m.name, m.version)

    def _check_centroid(self, m: PackageManifest) -> None:
        profiles = _read_json(self.store / "router" / "config.json", {}).get("profiles", [])
        dims = {len(p["centroid"]) for p in profiles if p.get("centroid")}
        if dims and len(m.routing.centroid) not in dims:
            raise PackageError(f"{m.name}: its routing centroid has {len(m.routing.centroid)} dimensions, but this "
                               f"store's router embeds in {sorted(dims)[0]}: it was made with another encoder")

    # ---- activate / deactivate ----
    def activate(self, name: str, version: str, allow_downgrade: bool = False) -> None:
        """Materialise NAME VERSION as STORE/experts/NAME and register it for serving and routing."""
        self._dir(name, version)
        with self.lock(f"imoe experts activate {name} {version}"):
            self._activate(name, version, allow_downgrade)

    def _activate(self, name: str, version: str, allow_downgrade: bool) -> None:
        source = self._dir(name, version)
        if not (source / MANIFEST).is_file():
            raise PackageError(f"{name} {version} is not installed; installed: {', '.join(self.versions(name)) or 'none'}")
        self._check_downgrade(name, version, allow_downgrade)
        m = PackageManifest.parse((source / MANIFEST).read_bytes())
        signature = _read_json(source / SIGNATURE)
        final = self._served(name)
        experts = final.parent
        staging = experts / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
        # an adapter is served from experts/NAME/, a whole model from experts/NAME/model/ (`add-model`'s layout)
        shutil.copytree(source / m.payload_dir, staging / MODEL_DIR if m.model is not None else staging)
        (staging / "manifest.json").write_text(json.dumps(_expert_manifest(m, signature), indent=2))
        if final.exists():
            retired = experts / f".{name}.{uuid.uuid4().hex[:8]}.old"
            os.replace(final, retired)
            os.replace(staging, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, final)
        _write_json_atomic(self._dir(name) / ACTIVE, {"version": version})
        index = self._index()
        entry = {"name": name, "categories": [name], "rows": m.training.rows, "tokens": m.training.tokens,
                 "package": {"version": version, "category": m.category.name}}
        if m.model is not None:
            entry |= {"kind": "model", "parameters": m.model.parameters}
        index["experts"] = [e for e in index["experts"] if e["name"] != name] + [entry]
        _write_json_atomic(self.store.joinpath(*INDEX), index)
        profile = {"name": name, "category": None, "keywords": m.routing.keywords, "centroid": m.routing.centroid,
                   "priority": m.routing.priority}
        extras = [p for p in _read_json(self.store.joinpath(*EXTRA_PROFILES), []) if p["name"] != name]
        _write_json_atomic(self.store.joinpath(*EXTRA_PROFILES), extras + [profile])

    def deactivate(self, name: str) -> None:
        """Stop routing to NAME and stop listing it (requests already running finish: replicas keep
        what they loaded until they evict it)."""
        self._dir(name)
        with self.lock(f"imoe experts deactivate {name}"):
            self._deactivate(name)

    def _deactivate(self, name: str) -> None:
        marker = self._dir(name) / ACTIVE
        if not marker.is_file():
            return
        extras = [p for p in _read_json(self.store.joinpath(*EXTRA_PROFILES), []) if p["name"] != name]
        _write_json_atomic(self.store.joinpath(*EXTRA_PROFILES), extras)
        index = self._index()
        index["experts"] = [e for e in index["experts"] if e["name"] != name]
        _write_json_atomic(self.store.joinpath(*INDEX), index)
        final = self._served(name)
        if final.exists():
            retired = final.with_name(f".{name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(final, retired)
            shutil.rmtree(retired, ignore_errors=True)
        marker.unlink()

    def remove(self, name: str, version: str | None = None) -> list[str]:
        """Remove one version (or every version) of NAME; the active one is deactivated first."""
        folder = self._dir(name)
        if version is not None:
            check_version(version)
        with self.lock(f"imoe experts remove {name}"):
            return self._remove(name, version, folder)

    def _remove(self, name: str, version: str | None, folder: Path) -> list[str]:
        versions = self.versions(name)
        if not versions:
            raise PackageError(f"no package named {name!r} in {self.root}; installed: {', '.join(self.names()) or 'none'}")
        if version is not None and version not in versions:
            raise PackageError(f"{name} has no version {version}; installed: {', '.join(versions)}")
        doomed = [version] if version else versions
        if self.active_version(name) in doomed:
            self._deactivate(name)
        for v in doomed:
            retired = self._temp() / f"removed-{uuid.uuid4().hex[:8]}"
            os.replace(self._dir(name, v), retired)
            shutil.rmtree(retired, ignore_errors=True)
        if not self.versions(name) and not (folder / ACTIVE).exists():
            shutil.rmtree(folder, ignore_errors=True)
        self._drop_empty_temp()
        return doomed

    # ---- queries ----
    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.is_symlink() and _is_name(p.name))

    def versions(self, name: str) -> list[str]:
        folder = self._dir(name)
        if not folder.is_dir():
            return []
        found = [p.name for p in folder.iterdir() if _is_version(p.name) and (p / MANIFEST).is_file()]
        return sorted(found, key=semver_key)

    def active_version(self, name: str) -> str | None:
        marker = _read_json(self._dir(name) / ACTIVE)
        version = marker.get("version") if isinstance(marker, dict) else None
        return version if _is_version(version) else None

    def manifest(self, name: str, version: str | None = None) -> PackageManifest:
        version = version or self.active_version(name) or next(reversed(self.versions(name)), None)
        if version is None or not (self._dir(name, version) / MANIFEST).is_file():
            raise PackageError(f"no package named {name!r}{f' version {version}' if version else ''} in {self.root}")
        return PackageManifest.parse((self._dir(name, version) / MANIFEST).read_bytes())

    def _row(self, name: str, version: str) -> Installed:
        folder = self._dir(name, version)
        m = PackageManifest.parse((folder / MANIFEST).read_bytes())
        raw = _read_json(folder / SIGNATURE)
        try:
            signature = Signature.from_json(raw) if raw else None
            trust = trust_status(m, signature, self.trusted_keys())
        except PackageError:
            signature, trust = None, "invalid"
        size = sum(p.stat().st_size for p in (folder / m.payload_dir).iterdir())
        compatible = m.adapter is None or (m.base_model is not None  # a whole model: any store
                                           and m.base_model.fingerprint == self.base_fingerprint())
        return Installed(name, version, m.category.name, size, signature.key[:16] if signature else "unsigned", trust,
                         compatible, self.active_version(name) == version, str(folder))

    def list(self) -> list[Installed]:
        return [self._row(n, v) for n in self.names() for v in self.versions(n)]


def _passes(check, text: object) -> bool:
    try:
        check(text)
        return True
    except PackageError:
        return False


def _is_name(text: object) -> bool:
    return _passes(check_name, text)


def _is_version(text: object) -> bool:
    return _passes(check_version, text)


def verify_adapter(adapter_dir: str | Path) -> None:
    """Before a replica loads `experts/NAME`: when it was installed from a package, every file must
    hash as the registry's manifest of the active version says (and that manifest's signature, if
    any, must hold). Raises AdapterMismatch; trained experts (no package) pass unchecked."""
    adapter_dir = Path(adapter_dir)
    info = _read_json(adapter_dir / "manifest.json") or {}
    package = info.get("package") if isinstance(info, dict) else None
    if not package:
        return
    name = adapter_dir.name
    where = f"adapter {name!r} ({adapter_dir})"
    try:
        registry = Registry(adapter_dir.parent.parent)
        version = check_version(package.get("version"))
        source = registry._dir(name, version)
        m = PackageManifest.parse((source / MANIFEST).read_bytes(), f"{where}: registry manifest")
        raw = _read_json(source / SIGNATURE)
        if raw:
            check(m, Signature.from_json(raw))
    except (PackageError, OSError, ValueError) as e:
        raise AdapterMismatch(f"{where} cannot be checked against its package manifest: {e}") from None
    if m.model is not None:   # a whole model: its files are under experts/NAME/model/
        expected = dict(m.files)
        present = {f"{MODEL_DIR}/{p.name}" for p in (adapter_dir / MODEL_DIR).iterdir()} \
            if (adapter_dir / MODEL_DIR).is_dir() else set()
        present |= {p.name for p in adapter_dir.iterdir() if p.name not in ("manifest.json", MODEL_DIR)}
    else:
        expected = {path.split("/", 1)[1]: digest for path, digest in m.files.items()}
        present = {p.name for p in adapter_dir.iterdir() if p.name != "manifest.json"}
    extra = sorted(present - set(expected))
    if extra:
        raise AdapterMismatch(f"{where} holds files its package does not declare ({', '.join(map(short, extra))}): "
                              "refusing to load it")
    for file, digest in expected.items():
        if not (adapter_dir / file).is_file() or sha256_file(adapter_dir / file) != digest:
            raise AdapterMismatch(f"{where}: {file} does not match the sha256 in its package manifest "
                                  f"({name} {version}): it was changed in the store after install; refusing to load it")


class AdapterMismatch(PackageError):
    """An installed adapter's files differ from its package manifest."""


def _expert_manifest(m: PackageManifest, signature: dict | None) -> dict:
    """The store's expert manifest (what `imoe build` writes for a trained expert, or `imoe experts
    add-model` for a whole model), from a package."""
    package = {"version": m.version, "license": m.license, "created_at": m.created_at,
               "description": m.category.description, "signer": (signature or {}).get("key"), "files": m.files}
    if m.model is not None:
        return {"name": m.name, "kind": "model", "model": m.model.model_dump(mode="json") | {"files": m.files},
                "category": {"id": None, "name": m.category.name}, "categories": [m.name],
                "routing": {"keywords": m.routing.keywords, "priority": m.routing.priority},
                "centroid": m.routing.centroid, "package": package}
    assert m.base_model is not None and m.adapter is not None  # an adapter package (the manifest's validator)
    return {"name": m.name, "kind": "expert", "base_model": {"name": m.base_model.id, "fingerprint": m.base_model.fingerprint},
            "adapter": {"type": m.adapter.type, "r": m.adapter.rank, **m.adapter.settings},
            "training": m.training.metrics | {"tokens": m.training.tokens}, "category": {"id": None, "name": m.category.name},
            "categories": [m.name], "routing": {"keywords": m.routing.keywords, "priority": m.routing.priority},
            "centroid": m.routing.centroid, "rows": m.training.rows,
            "package": {"version": m.version, "license": m.license, "created_at": m.created_at,
                        "description": m.category.description, "signer": (signature or {}).get("key"),
                        "files": m.files}}


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
    if not isinstance(name, str) or not re.match(NAME_PATTERN, name):
        raise PackageError(f"{short(name)} is not an expert's name")
    folder = inside(Path(store) / "experts", name)
    info = _read_json(folder / "manifest.json")
    if info is None:
        raise PackageError(f"no expert named {name!r} in {store} (experts/{name}/manifest.json)")
    if not info.get("centroid"):
        raise PackageError(f"expert {name!r} has no centroid (the dense baseline?): routing could not place it")
    if info.get("kind") == "model":
        return _package_model(folder, info, version, out, new_name, description, license)
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


def _package_model(folder: Path, info: dict, version: str, out: Path | None, new_name: str | None, description: str,
                   license: str) -> tuple[Path, PackageManifest]:
    """A whole-model expert (`imoe experts add-model`) as an unsigned `.expert` archive: model/ holds its
    Hugging Face directory's config, tokenizer files and safetensors weights."""
    from imoe_ray.packaging.manifest import MODEL_FILES

    model_dir = folder / MODEL_DIR
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and (p.name in MODEL_FILES or p.suffix == ".safetensors"))
    model = info.get("model", {})
    data = {"name": new_name or info["name"], "version": version,
            "category": {"name": (info.get("category") or {}).get("name") or info["name"], "description": description},
            "routing": {"keywords": info.get("routing", {}).get("keywords", []), "centroid": info["centroid"],
                        "priority": info.get("routing", {}).get("priority", 0)},
            "model": {"architecture": model.get("architecture", "?"), "model_type": model.get("model_type", "?"),
                      "parameters": model.get("parameters", 1)},
            "license": license, "files": file_hashes(files, MODEL_DIR)}
    manifest = PackageManifest.parse(json.dumps(data), f"the manifest made for {info['name']}")
    out = out or Path(f"{manifest.name}-{version}{SUFFIX}")
    return pack(manifest, files, out), manifest
