"""`imoe keys generate` and `imoe experts package|sign|verify|install|list|remove|activate|info|add-model|remove-model`
(registered in imoe_ray/cli.py). A refused package exits with status 2 and one line saying why."""

from __future__ import annotations

import enum
import functools
import json
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Literal, Optional

import click
import typer
from rich.console import Console
from rich.table import Table

from imoe_ray.packaging import PackageError

console = Console(stderr=True)
keys_app = typer.Typer(help="ed25519 keys that sign .expert packages.", no_args_is_help=True)
experts_app = typer.Typer(help="Signed, versioned .expert packages and the store's registry.", no_args_is_help=True)
StoreOpt = typer.Option("store", "--store", "-s", help="Store directory (built through the experts stage).")
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML configuration file.")
SetOpt = typer.Option(None, "--set", help="Override one setting, e.g. --set packages.allow_unsigned=true (repeatable).")


def _refusals(fn):
    """A PackageError (or the store's lock held by another writer) becomes `error: ...` and exit
    status 2 (the install contract: non-zero when refused)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from imoe_ray.store import StoreLocked

        try:
            return fn(*args, **kwargs)
        except (PackageError, StoreLocked) as e:
            raise Refused(str(e)) from None
    return wrapper


class Refused(click.ClickException):
    """Shown as `Error: ...` with exit status 2 by `imoe`'s main (a typer.Exit would be swallowed there)."""
    exit_code = 2


def _packages_cfg(store: str | None, config: Optional[Path], overrides: Optional[list[str]]):
    from imoe_ray.config import load_config, store_config

    cfg = store_config(store, config, overrides) if store else load_config(config, overrides)
    return cfg.packages


# What the registry reads and writes in a store: checked out of a URI store and committed back, with
# the files that make an install visible (the router's late-joined profiles, the experts index) last.
REGISTRY_PARTS = [("registry",), ("experts",), ("manifests", "base.json"), ("router", "config.json")]
REGISTRY_LAST = [("router", "experts.json"), ("experts", "index.json")]


@contextmanager
def _registry(store: str, config: Optional[Path], overrides: Optional[list[str]], purpose: str | None = None):
    """The store's registry; on an object store a local checkout of its files, taken under the store's
    lock when `purpose` (a write) is given and committed back when the block succeeds."""
    from imoe_ray.packaging.registry import Registry
    from imoe_ray.store import Store
    from imoe_ray.store.checkout import checkout
    from imoe_ray.store.store import is_uri

    packages = _packages_cfg(store, config, overrides)
    if not is_uri(store):
        if not Path(store).is_dir():
            raise PackageError(f"store {store} does not exist")
        yield Registry(store, packages)
        return
    remote = Store(store, create=False)
    with ExitStack() as held:
        if purpose:
            held.enter_context(remote.lock(purpose))
        root = held.enter_context(checkout(remote, REGISTRY_PARTS, REGISTRY_LAST))
        yield Registry(root, packages)


@keys_app.command("generate")
@_refusals
def keys_generate(out: Path = typer.Option(Path("."), "--out", "-o", help="Directory for imoe-expert.key / .pub.")) -> None:
    """Generate an ed25519 key pair: the private key (mode 0600) and the public key to share."""
    from imoe_ray.packaging.signing import generate_keys

    private, public = generate_keys(out)
    console.print(f"private key {private} (keep it secret), public key {public}: {public.read_text().strip()}")
    print(public.read_text().strip())


@keys_app.command("trust")
@_refusals
def keys_trust(key: str = typer.Argument(..., help="Public key: hex, base64 or a .pub file."),
               names: str = typer.Option(..., "--names", help="Comma-separated package names this key may publish."),
               store: str = StoreOpt, config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = SetOpt) -> None:
    """Trust KEY to publish the named packages in this store (besides their first publisher)."""
    with _registry(store, config, overrides, "imoe keys trust") as registry:
        allowed = registry.trust(key, [n.strip() for n in names.split(",") if n.strip()])
    console.print(f"key {key[:16]}… may publish: {', '.join(allowed)}")


@experts_app.command("package")
@_refusals
def package(name: str = typer.Argument(..., help="The expert in STORE/experts/NAME."),
            store: str = StoreOpt,
            out: Optional[Path] = typer.Option(None, "--out", "-o", help="Archive to write (default NAME-VERSION.expert)."),
            version: str = typer.Option("1.0.0", "--version", help="Semantic version of the package."),
            new_name: Optional[str] = typer.Option(None, "--name", help="Publish under another name."),
            description: str = typer.Option("", "--description", help="What the expert knows."),
            license: str = typer.Option("unspecified", "--license", help="License of the weights.")) -> None:
    """Write a trained expert as an (unsigned) .expert archive; sign it with `imoe experts sign`."""
    from imoe_ray.packaging.registry import package_expert

    with _registry(store, None, None) as registry:  # a URI store's expert: read from a local checkout
        path, m = package_expert(registry.store, name, version, out, new_name, description, license)
    console.print(f"packaged {m.name} {m.version} ({len(m.files)} files) → {path}")
    print(path)


@experts_app.command("sign")
@_refusals
def sign(package: Path = typer.Argument(..., help=".expert archive or package directory."),
         key: Path = typer.Option(..., "--key", "-k", help="Private key file (imoe keys generate)."),
         config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = SetOpt) -> None:
    """Sign a package's manifest (which holds every file's sha256) with an ed25519 key. The package is
    checked under packages.* limits first (an archive is unpacked beside itself, never elsewhere)."""
    from imoe_ray.packaging.archive import Limits, read_package, resign
    from imoe_ray.packaging.signing import load_signing_key, sign as sign_manifest

    signing_key = load_signing_key(key)
    limits = Limits.of(_packages_cfg(None, config, overrides))
    manifest, _ = read_package(package, limits)
    signature = sign_manifest(manifest, signing_key)
    resign(package, signature, limits)
    console.print(f"signed {manifest.name} {manifest.version} with key {signature.key}")


@experts_app.command("verify")
@_refusals
def verify(package: Path = typer.Argument(..., help=".expert archive or package directory."),
           store: Optional[str] = typer.Option(None, "--store", "-s", help="Also check base-model compatibility with this store."),
           config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = SetOpt) -> None:
    """Check a package without installing it (nothing is written): layout, hashes, signature and trust
    (and the store's base). Exit 0 only when it would install without --allow-unsigned."""
    from imoe_ray.packaging.archive import Limits, read_package
    from imoe_ray.packaging.registry import Registry
    from imoe_ray.packaging.signing import trust_status

    cfg = _packages_cfg(store, config, overrides)
    m, signature = read_package(package, Limits.of(cfg))
    registry = Registry(store, cfg) if store else None
    trust = trust_status(m, signature, registry.trusted_keys() if registry else cfg.trusted_keys)
    signer = signature.key if signature else "-"
    console.print(f"{m.name} {m.version}: {len(m.files)} files match their sha256; signature: {trust} (key {signer})")
    if registry is not None and m.model is not None:
        console.print("a whole model: it needs no particular base model")
    elif registry is not None and m.base_model is not None:
        ours = registry.base_fingerprint()
        if ours != m.base_model.fingerprint:
            raise PackageError(f"base model mismatch: the package needs fingerprint {m.base_model.fingerprint}, "
                               f"the store's base model has {ours}")
        console.print("base model: compatible with the store")
    if trust != "trusted":
        raise PackageError(f"{package} is {trust}: not installable without --allow-unsigned")


@experts_app.command("install")
@_refusals
def install(source: str = typer.Argument(..., help="A .expert archive, a package directory, or a git URL."),
            store: str = StoreOpt,
            allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help="Install unsigned or untrusted packages."),
            allow_downgrade: bool = typer.Option(False, "--allow-downgrade", help="Install (and activate) a version older than the active one."),
            name: Optional[str] = typer.Option(None, "--name", help="Which package, when a directory or repository holds several."),
            config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = SetOpt) -> None:
    """Verify and install a package into the store's registry and make it the active version: a running
    server picks it up without a restart. Exit status 2 when refused."""
    with _registry(store, config, overrides, f"imoe experts install {Path(source).name[:60]}") as registry:
        row = registry.install(source, allow_unsigned or None, name, allow_downgrade)
    console.print(f"installed {row.name} {row.version} (category {row.category!r}, {row.size:,} bytes, signature "
                  f"{row.trust}) → {row.path}; active as experts/{row.name}")


@experts_app.command("list")
@_refusals
def list_(store: str = StoreOpt, as_json: bool = typer.Option(False, "--json", help="Print JSON lines."),
          config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = SetOpt) -> None:
    """The installed packages: name, version, category, size, signer, base compatibility, active."""
    from imoe_ray.packaging.registry import as_dict

    with _registry(store, config, overrides) as registry:
        rows = registry.list()
    if as_json:
        for r in rows:
            print(json.dumps(as_dict(r)))
        return
    table = Table(title=f"{len(rows)} package version(s) in {Path(store) / 'registry'}")
    for col in ("name", "version", "category", "size", "signer", "base", "active"):
        table.add_column(col, justify="right" if col == "size" else "left")
    for r in rows:
        table.add_row(r.name, r.version, r.category, f"{r.size / 1e6:.2f} MB", f"{r.signer} ({r.trust})",
                      "compatible" if r.compatible else "MISMATCH", "yes" if r.active else "")
    Console().print(table)


@experts_app.command("remove")
@_refusals
def remove(name: str = typer.Argument(...), store: str = StoreOpt,
           version: Optional[str] = typer.Option(None, "--version", help="Only this version (default: all)."),
           config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = SetOpt) -> None:
    """Remove an installed package (the active version is drained: no new requests, running ones finish)."""
    with _registry(store, config, overrides, f"imoe experts remove {name[:60]}") as registry:
        removed = registry.remove(name, version)
    console.print(f"removed {name} {', '.join(removed)}")


@experts_app.command("activate")
@_refusals
def activate(name: str = typer.Argument(...), version: str = typer.Argument(...), store: str = StoreOpt,
             allow_downgrade: bool = typer.Option(False, "--allow-downgrade", help="Activate a version older than the active one."),
             config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = SetOpt) -> None:
    """Make another installed version of NAME the active one."""
    with _registry(store, config, overrides, f"imoe experts activate {name[:60]}") as registry:
        registry.activate(name, version, allow_downgrade)
    console.print(f"{name} {version} is active")


@experts_app.command("info")
@_refusals
def info(target: str = typer.Argument(..., help="An installed package's name (with --store) or a .expert file."),
         store: str = StoreOpt, version: Optional[str] = typer.Option(None, "--version"),
         config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = SetOpt) -> None:
    """Print a package's manifest (centroid shortened) and its signature as JSON (nothing is written)."""
    from imoe_ray.packaging.archive import Limits, read_package

    path = Path(target)
    if path.exists():
        manifest, signature = read_package(path, Limits.of(_packages_cfg(None, config, overrides)))
        data = manifest.model_dump(mode="json")
        data["signature"] = signature.to_json() if signature else None
    else:
        with _registry(store, config, overrides) as registry:
            data = registry.manifest(target, version).model_dump(mode="json")
            data["installed"] = {"versions": registry.versions(target), "active": registry.active_version(target)}
    centroid = data["routing"]["centroid"]
    data["routing"]["centroid"] = f"[{len(centroid)} floats]"
    json.dump(data, sys.stdout, indent=2)
    print()


@experts_app.command("add-model")
@_refusals
def add_model(name: str = typer.Argument(..., help="The expert's name (lowercase letters, digits, '-', '_')."),
              path: Path = typer.Option(..., "--path", "-p", help="A local Hugging Face causal LM directory "
                                        "(config.json, *.safetensors, its tokenizer)."),
              store: str = StoreOpt,
              keywords: str = typer.Option("", "--keywords", "-k", help="Comma-separated routing keywords."),
              texts: Optional[Path] = typer.Option(None, "--texts", help="Sample texts of its domain (one per line, "
                                                   "or .jsonl with a text field): its routing centroid."),
              config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = SetOpt) -> None:
    """Register a whole model (any architecture, size and tokenizer) as an expert: routed by its keywords
    and a centroid (of --texts, else of its keywords) without retraining the router, loaded on demand
    under serve.memory_budget_mb. A running server picks it up without a restart."""
    from imoe_ray.config import store_config
    from imoe_ray.experts.whole_model import add_model as register, read_texts

    def store_encoder():  # the store's: routing embeds with it
        from imoe_ray.routing.stage import make_encoder

        return make_encoder(store_config(store, config, overrides))

    sample = read_texts(texts) if texts is not None else None
    with _registry(store, config, overrides, f"imoe experts add-model {name[:60]}") as registry:
        expert = register(registry.store, name, path, keywords.split(","), sample, store_encoder)
    console.print(f"added {expert.name}: {expert.architecture} ({expert.parameters:,} parameters, "
                  f"{expert.weight_bytes / 2**20:.1f} MB in float32), routed by keywords "
                  f"{', '.join(expert.keywords) or '-'} and a centroid of its {expert.centroid_from} → {expert.path}")


@experts_app.command("remove-model")
@_refusals
def remove_model(name: str = typer.Argument(...), store: str = StoreOpt,
                 config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = SetOpt) -> None:
    """Remove a whole-model expert (`add-model`): no new requests reach it; running ones finish."""
    from imoe_ray.experts.whole_model import remove_model as unregister

    with _registry(store, config, overrides, f"imoe experts remove-model {name[:60]}") as registry:
        unregister(registry.store, name)
    console.print(f"removed {name}")


class _ExportFormat(str, enum.Enum):
    peft = "peft"
    vllm = "vllm"


@experts_app.command("export")
def export(name: str = typer.Argument(..., help="The expert in STORE/experts/NAME."), store: str = StoreOpt,
           fmt: _ExportFormat = typer.Option("vllm", "--format", "-f",
                                             help="peft: as trained; vllm: what vLLM's LoRA loader accepts."),
           out: Path = typer.Option(..., "--out", "-o", help="The adapter directory to write (new or empty).")) -> None:
    """Write an expert as a portable PEFT adapter directory (vLLM, LoRAX, plain PEFT) with its model card."""
    from imoe_ray.experts.export import ExportError, export_expert
    from imoe_ray.store import Store

    kind: Literal["peft", "vllm"] = "peft" if _ExportFormat(fmt) is _ExportFormat.peft else "vllm"
    s = Store(store)
    if not name or "/" in name or name.startswith(".") or not s.exists("experts", name, "adapter_config.json"):
        raise Refused(f"no expert named {name!r} in {store} (see `imoe experts list --store {store}`)")
    base = s.local_dir("base") if s.is_local else None
    try:
        summary = export_expert(s.local_dir("experts", name), out, kind, store_base=base)
    except ExportError as e:
        raise Refused(str(e)) from None
    if summary["dropped"]:
        console.print(f"left out LoRA on {', '.join(summary['dropped'])} (not loadable by vLLM): the exported expert "
                      f"differs from the served one there", highlight=False)
    console.print(f"[green]exported[/] {name} ({kind}, r={summary['r']}) to {summary['out']}", highlight=False)
