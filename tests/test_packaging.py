""".expert packages: manifest schema, signing, safe unpacking of hostile archives, the registry
(versions, trust, base compatibility, git), the CLI's exit codes, and hot add / drain on a real server.

Most tests run on a small store made here (real PEFT-layout safetensors adapter, real manifests),
which is cheap; the hot-add test serves a copy of the session's `built` store."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from safetensors.numpy import save_file
from typer.testing import CliRunner

from imoe_ray.config import PackagesConfig
from imoe_ray.packaging import PackageError
from imoe_ray.packaging.archive import Limits, pack, resign, unpack
from imoe_ray.packaging.manifest import SCHEMA_PATH, json_schema, sha256_file
from imoe_ray.packaging.registry import Registry, package_expert
from imoe_ray.packaging.signing import generate_keys, load_signing_key, sign

from conftest import start_imoe_serve, stop_imoe_serve

REPO = Path(__file__).resolve().parents[1]
IMOE = str(Path(sys.executable).parent / "imoe")
FP = "ab" * 32
DIM = 8


def _make_store(root: Path, fingerprint: str = FP) -> Path:
    """A store as the build leaves it, as far as packages care: base manifest, one trained expert, router profiles."""
    (root / "manifests").mkdir(parents=True)
    (root / "manifests" / "base.json").write_text(json.dumps({"stage": "base", "metrics": {"fingerprint": fingerprint}}))
    expert = root / "experts" / "alpha"
    expert.mkdir(parents=True)
    rng = np.random.default_rng(0)
    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": rng.standard_normal((4, 16)).astype(np.float32),
               "base_model.model.layers.0.q_proj.lora_B.weight": rng.standard_normal((16, 4)).astype(np.float32)},
              str(expert / "adapter_model.safetensors"))
    (expert / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 32}))
    (expert / "README.md").write_text("not packaged")
    (expert / "manifest.json").write_text(json.dumps({
        "name": "alpha", "kind": "expert", "base_model": {"name": "store:base", "fingerprint": fingerprint},
        "adapter": {"type": "lora", "r": 4, "alpha": 32.0, "dropout": 0.05, "target_modules": "all-linear"},
        "training": {"loss": 3.2, "tokens": 1000, "steps": 5}, "category": {"id": 0, "name": "alpha"},
        "categories": ["alpha"], "routing": {"keywords": ["aquarium", "fish"], "priority": 0},
        "centroid": [0.1 * i for i in range(DIM)], "rows": 12}))
    (root / "experts" / "index.json").write_text(json.dumps({"experts": [{"name": "alpha", "categories": ["alpha"]}],
                                                             "aliases": {}, "base_fingerprint": fingerprint}))
    (root / "router").mkdir()
    (root / "router" / "config.json").write_text(json.dumps({"profiles": [
        {"name": "alpha", "category": 0, "keywords": [], "centroid": [0.0] * DIM, "priority": 0}]}))
    from imoe_ray.store import Store
    with Store(root).lock("imoe build"):   # as a build leaves it: the lock's folder exists, no lease in it
        pass
    return root


@pytest.fixture
def store(tmp_path) -> Path:
    return _make_store(tmp_path / "store")


@pytest.fixture
def keys(tmp_path) -> tuple[Path, Path]:
    return generate_keys(tmp_path / "keys")


def _package(store: Path, out: Path, version: str = "1.0.0", name: str = "beta", key: Path | None = None) -> Path:
    path, manifest = package_expert(store, "alpha", version, out, new_name=name, description="fish keeping")
    if key is not None:
        resign(path, sign(manifest, load_signing_key(key)))
    return path


def _trusting(public: Path, **kw) -> PackagesConfig:
    return PackagesConfig(trusted_keys=[str(public)], **kw)


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ---- format and signing -----------------------------------------------------------------------

def test_committed_schema_equals_the_model():
    assert json.loads(SCHEMA_PATH.read_text()) == json_schema(), \
        "regenerate it: python -m imoe_ray.packaging.manifest"


def test_round_trip_package_sign_verify_install(store, keys, tmp_path):
    private, public = keys
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    pkg = _package(store, tmp_path / "beta.expert", key=private)
    with tarfile.open(pkg) as tar:
        assert sorted(tar.getnames()) == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                                          "manifest.json", "signature.json"]
    row = Registry(store, _trusting(public)).install(str(pkg))
    assert (row.name, row.version, row.trust, row.active, row.compatible) == ("beta", "1.0.0", "trusted", True, True)
    served = store / "experts" / "beta"
    assert sha256_file(served / "adapter_model.safetensors") == sha256_file(store / "experts" / "alpha" / "adapter_model.safetensors")
    assert json.loads((served / "manifest.json").read_text())["routing"]["keywords"] == ["aquarium", "fish"]
    index = json.loads((store / "experts" / "index.json").read_text())
    assert [e["name"] for e in index["experts"]] == ["alpha", "beta"]
    (profile,) = json.loads((store / "router" / "experts.json").read_text())
    assert profile["name"] == "beta" and profile["category"] is None and len(profile["centroid"]) == DIM
    from imoe_ray.serving.model import installed_experts
    assert installed_experts(store)["beta"] == served


def test_tampered_signature_is_refused_even_when_unsigned_is_allowed(store, keys, tmp_path):
    private, public = keys
    pkg = _package(store, tmp_path / "beta.expert", key=private)
    unpacked = unpack(pkg, tmp_path / "u")
    forged = unpacked.manifest.model_copy(update={"license": "MIT"})
    pack(forged, sorted(unpacked.adapter.iterdir()), pkg, unpacked.signature)
    with pytest.raises(PackageError, match="does not match the manifest"):
        Registry(store, _trusting(public, allow_unsigned=True)).install(str(pkg))
    assert not (store / "experts" / "beta").exists()


def test_unsigned_and_untrusted_are_refused_unless_allowed(store, keys, tmp_path):
    private, public = keys
    unsigned = _package(store, tmp_path / "u.expert")
    with pytest.raises(PackageError, match="is not signed.*--allow-unsigned"):
        Registry(store, _trusting(public)).install(str(unsigned))
    stranger, _ = generate_keys(tmp_path / "stranger")
    untrusted = _package(store, tmp_path / "s.expert", key=stranger)
    with pytest.raises(PackageError, match="not trusted"):
        Registry(store, _trusting(public)).install(str(untrusted))
    assert not (store / "experts" / "beta").exists() and not (store / "registry" / "beta").exists()
    assert Registry(store, _trusting(public)).install(str(untrusted), allow_unsigned=True).trust == "untrusted"


def test_base_fingerprint_mismatch_names_both(store, tmp_path):
    pkg = _package(store, tmp_path / "beta.expert")
    other = _make_store(tmp_path / "other", fingerprint="cd" * 32)
    with pytest.raises(PackageError) as e:
        Registry(other, PackagesConfig(allow_unsigned=True)).install(str(pkg))
    assert FP in str(e.value) and "cd" * 32 in str(e.value)
    assert not (other / "experts" / "beta").exists()


# ---- hostile archives -------------------------------------------------------------------------

DATA = REPO / "tests" / "data" / "hostile"
CORPUS = json.loads((DATA / "expected.json").read_text())


def _state(root: Path) -> dict[str, str]:
    """Every path under `root` with its content hash (directories as 'dir'): byte-for-byte equality."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else sha256_file(p) for p in sorted(root.rglob("*"))}


def test_the_corpus_lists_every_hostile_archive():
    assert {c["file"] for c in CORPUS} == {p.name for p in DATA.glob("*.expert")}


@pytest.mark.parametrize("case", CORPUS, ids=[c["case"] for c in CORPUS])
def test_hostile_corpus_is_refused_and_the_store_is_unchanged(store, tmp_path, case):
    """tests/data/hostile (python tests/data/make_hostile.py): each archive refused with its error,
    the store byte-for-byte as it was, nothing written anywhere else."""
    before = _state(store)
    cfg = PackagesConfig(allow_unsigned=case["allow_unsigned"])
    with pytest.raises(PackageError, match=case["error"]) as refused:
        Registry(store, cfg).install(str(DATA / case["file"]))
    assert len(str(refused.value)) < 400, str(refused.value)     # names quoted by a short prefix only
    assert _state(store) == before
    assert not Path("/tmp/imoe-absolute.txt").exists() and not (tmp_path / "escaped.txt").exists()


def test_hostile_archives_are_refused_within_300_mb_and_before_any_write(store, tmp_path):
    """The CLI, in a process of its own: peak RSS while refusing each bomb, and what it wrote."""
    # Peak RSS from the kernel's VmHWM: getrusage's ru_maxrss survives exec, so it would report the
    # forking pytest process's size (large once other test modules imported torch) instead of the CLI's.
    script = ("import re, sys\nfrom imoe_ray.cli import main\nsys.argv = ['imoe'] + sys.argv[1:]\n"
              "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
              "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
              "print('RSS', hwm, 'EXIT', code)\n")
    for case, flags in (("longname-bomb", ["--allow-unsigned"]), ("pax-bomb", ["--allow-unsigned"]),
                        ("unsigned-bomb", []), ("unsigned-bomb", ["--allow-unsigned"])):
        before = _state(store)
        done = subprocess.run([sys.executable, "-c", script, "experts", "install", str(DATA / f"{case}.expert"),
                               "--store", str(store), *flags], capture_output=True, text=True)
        rss_kb, code = done.stdout.split()[1], done.stdout.split()[3]
        assert code != "0" and done.stderr.count("\n") < 20 and len(done.stderr) < 2000, done.stderr
        assert int(rss_kb) < 300 * 1024, (case, rss_kb)
        assert _state(store) == before and not (store / "registry").exists()
        for command in (["info", str(DATA / f"{case}.expert")], ["verify", str(DATA / f"{case}.expert")]):
            checked = subprocess.run([sys.executable, "-c", script, "experts", *command], capture_output=True, text=True)
            assert checked.stdout.split()[3] != "0" and int(checked.stdout.split()[1]) < 300 * 1024, checked.stderr


def test_size_limits(store, tmp_path):
    good = _package(store, tmp_path / "good.expert")
    registry = Registry(store, PackagesConfig(allow_unsigned=True, max_member_bytes=1000))
    with pytest.raises(PackageError, match="over the 1,000-byte limit"):
        registry.install(str(good))
    with pytest.raises(PackageError, match="unpacked size over"):
        unpack(good, tmp_path / "u", Limits(max_total_bytes=600))


# ---- registry ---------------------------------------------------------------------------------

def test_versions_side_by_side_one_active(store, tmp_path):
    registry = Registry(store, PackagesConfig(allow_unsigned=True))
    registry.install(str(_package(store, tmp_path / "a.expert", "1.0.0")))
    registry.install(str(_package(store, tmp_path / "b.expert", "1.10.0")))
    older = str(_package(store, tmp_path / "c.expert", "1.2.0"))
    before = _state(store)
    with pytest.raises(PackageError, match="older than the active version 1.10.0.*--allow-downgrade"):
        registry.install(older)
    assert _state(store) == before
    registry.install(older, allow_downgrade=True)
    rows = registry.list()
    assert [(r.version, r.active) for r in rows] == [("1.0.0", False), ("1.2.0", True), ("1.10.0", False)]
    assert json.loads((store / "experts" / "beta" / "manifest.json").read_text())["package"]["version"] == "1.2.0"
    with pytest.raises(PackageError, match="older than the active"):
        registry.activate("beta", "1.0.0")
    registry.activate("beta", "1.0.0", allow_downgrade=True)
    assert json.loads((store / "experts" / "beta" / "manifest.json").read_text())["package"]["version"] == "1.0.0"
    assert registry.remove("beta", "1.0.0") == ["1.0.0"]          # the active one: drained
    assert not (store / "experts" / "beta").exists()
    assert "beta" not in [e["name"] for e in json.loads((store / "experts" / "index.json").read_text())["experts"]]
    assert json.loads((store / "router" / "experts.json").read_text()) == []
    assert registry.versions("beta") == ["1.2.0", "1.10.0"]
    with pytest.raises(PackageError, match="already has a trained expert named 'alpha'"):
        registry.install(str(_package(store, tmp_path / "d.expert", name="alpha")))
    assert (store / "experts" / "alpha" / "README.md").exists()   # the trained one is untouched


def test_names_reach_no_path_unchecked(store, tmp_path):
    """`remove ../experts` and `remove /some/dir` once deleted directories; now every name and
    version is a checked slug / semver before a path is built, at the API and the CLI."""
    registry = Registry(store, PackagesConfig(allow_unsigned=True))
    registry.install(str(_package(store, tmp_path / "b.expert")))
    project = tmp_path / "project"
    (project / "sub").mkdir(parents=True)
    (project / "sub" / "manifest.json").write_text("{}")
    before = _state(store)
    for name in ("../experts", str(project), "..", "experts/../../x", "index.json", "base", "summarizer", "dense",
                 "a" * 65, "Beta", ""):
        with pytest.raises(PackageError):
            registry.remove(name)
        with pytest.raises(PackageError):
            registry.activate(name, "1.0.0")
        with pytest.raises(PackageError):
            registry.manifest(name)
    for version in ("../../experts", "/etc", "1.0", "1.0.0/../../x"):
        with pytest.raises(PackageError):
            registry.remove("beta", version)
        with pytest.raises(PackageError):
            registry.activate("beta", version)
    assert _state(store) == before and (project / "sub" / "manifest.json").is_file()
    from imoe_ray.cli import app
    from imoe_ray.packaging.cli import Refused
    cli = CliRunner()
    for args in (["remove", "../experts"], ["remove", str(project)], ["activate", "../experts", "1.0.0"],
                 ["remove", "beta", "--version", "../../experts"], ["info", "../../x"]):
        result = cli.invoke(app, ["experts", *args, "--store", str(store)])
        assert isinstance(result.exception, Refused), (args, result.output)
    assert _state(store) == before and (project / "sub" / "manifest.json").is_file()


def test_a_trusted_key_publishes_only_its_own_names(store, tmp_path):
    """First publisher wins; another trusted key needs `imoe keys trust KEY --names`."""
    first, first_pub = generate_keys(tmp_path / "first")
    second, second_pub = generate_keys(tmp_path / "second")
    cfg = PackagesConfig(trusted_keys=[str(first_pub), str(second_pub)])
    Registry(store, cfg).install(str(_package(store, tmp_path / "a.expert", key=first)))
    before = _state(store)
    hijack = _package(store, tmp_path / "b.expert", "2.0.0", key=second)
    with pytest.raises(PackageError, match="'beta' is published by key .*keys trust"):
        Registry(store, cfg).install(str(hijack))
    unsigned = _package(store, tmp_path / "c.expert", "3.0.0")
    with pytest.raises(PackageError, match="published by key"):
        Registry(store, PackagesConfig(trusted_keys=cfg.trusted_keys, allow_unsigned=True)).install(str(unsigned))
    assert _state(store) == before
    from imoe_ray.cli import app
    done = CliRunner().invoke(app, ["keys", "trust", str(second_pub), "--names", "beta", "--store", str(store)])
    assert done.exit_code == 0, done.output
    assert Registry(store, cfg).install(str(hijack)).version == "2.0.0"
    # a key trusted in the store only (not in the config) may publish what it was given
    third, third_pub = generate_keys(tmp_path / "third")
    Registry(store).trust(str(third_pub), ["gamma"])
    assert Registry(store).install(str(_package(store, tmp_path / "g.expert", name="gamma", key=third))).trust == "trusted"


def test_a_changed_adapter_is_refused_at_load(store, tmp_path):
    from imoe_ray.packaging.registry import AdapterMismatch, verify_adapter

    Registry(store, PackagesConfig(allow_unsigned=True)).install(str(_package(store, tmp_path / "b.expert")))
    served = store / "experts" / "beta"
    verify_adapter(served)
    verify_adapter(store / "experts" / "alpha")          # a trained expert: no package, nothing to check
    weights = served / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterMismatch, match="adapter_model.safetensors does not match the sha256"):
        verify_adapter(served)
    weights.write_bytes(bytes(data[:-1]) + bytes([data[-1] ^ 1]))
    verify_adapter(served)
    (served / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(AdapterMismatch, match="does not declare"):
        verify_adapter(served)


def test_concurrent_installs_are_all_recorded_or_refused_with_a_lock_error(store, tmp_path):
    """Four installs at once, each in its own process: each either succeeds and is in the index and
    the routing profiles, or exits 2 naming the lock's holder. No update is lost."""
    packages = {f"pkg{i}": _package(store, tmp_path / f"p{i}.expert", name=f"pkg{i}") for i in range(4)}
    procs = {name: subprocess.Popen([IMOE, "experts", "install", str(path), "--store", str(store), "--allow-unsigned"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, path in packages.items()}
    done = {name: (p.wait(timeout=300), p.stderr.read()) for name, p in procs.items()}
    installed = {name for name, (code, _) in done.items() if code == 0}
    for name, (code, err) in done.items():
        assert code == 0 or (code == 2 and "locked by 'imoe experts install" in err), (name, code, err)
    assert installed, done
    index = {e["name"] for e in json.loads((store / "experts" / "index.json").read_text())["experts"]}
    profiles = {p["name"] for p in json.loads((store / "router" / "experts.json").read_text())}
    assert index == {"alpha"} | installed and profiles == installed
    assert {p.name for p in (store / "registry").iterdir() if p.is_dir() and not p.name.startswith(".")} == installed


def test_an_install_while_the_store_is_locked_is_refused_naming_the_holder(store, tmp_path):
    from imoe_ray.store import Store, StoreLocked

    pkg = _package(store, tmp_path / "b.expert")
    with Store(store).lock("imoe build --until experts"):
        before = _state(store)
        with pytest.raises(StoreLocked, match="locked by 'imoe build --until experts'"):
            Registry(store, PackagesConfig(allow_unsigned=True)).install(str(pkg))
        assert _state(store) == before
        done = subprocess.run([IMOE, "experts", "remove", "alpha", "--store", str(store)], capture_output=True, text=True)
        assert done.returncode == 2 and "locked by" in done.stderr
        assert _state(store) == before


def test_install_from_a_git_repository(store, keys, tmp_path):
    private, public = keys
    repo = tmp_path / "repo"
    (repo / "experts").mkdir(parents=True)
    _package(store, repo / "experts" / "beta-1.0.0.expert", key=private)
    (repo / "README.md").write_text("our experts")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "beta 1.0.0"]):
        subprocess.run(git + args, check=True, capture_output=True)
    row = Registry(store, _trusting(public)).install(f"file://{repo}")
    assert (row.name, row.trust, row.active) == ("beta", "trusted", True)
    with pytest.raises(PackageError, match="git clone .* failed"):
        Registry(store, _trusting(public)).install(f"file://{tmp_path}/missing.git")


def test_cli_exit_codes(store, keys, tmp_path):
    private, public = keys
    pkg = tmp_path / "beta.expert"
    run = [IMOE, "experts"]
    done = subprocess.run(run + ["package", "alpha", "--store", str(store), "--name", "beta", "-o", str(pkg)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    refused = subprocess.run(run + ["install", str(pkg), "--store", str(store)], capture_output=True, text=True)
    assert refused.returncode == 2 and "not signed" in refused.stderr
    from imoe_ray.cli import app
    from imoe_ray.packaging.cli import Refused
    cli = CliRunner()

    def status(*args: str) -> int:  # in process; `imoe`'s main turns Refused into exit status 2 (checked above)
        result = cli.invoke(app, list(args))
        return 2 if isinstance(result.exception, Refused) else result.exit_code

    assert status("experts", "sign", str(pkg), "--key", str(private)) == 0
    trust = ["--set", f'packages.trusted_keys=["{public}"]']
    assert status("experts", "verify", str(pkg), "--store", str(store)) == 2   # untrusted
    assert status("experts", "verify", str(pkg), "--store", str(store), *trust) == 0
    done = subprocess.run(run + ["install", str(pkg), "--store", str(store), *trust], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    listed = cli.invoke(app, ["experts", "list", "--store", str(store), "--json", *trust])
    assert listed.exit_code == 0 and json.loads(listed.stdout.splitlines()[0])["trust"] == "trusted"
    assert json.loads(cli.invoke(app, ["experts", "info", "beta", "--store", str(store)]).stdout)["version"] == "1.0.0"
    assert status("experts", "remove", "nope", "--store", str(store)) == 2
    assert status("experts", "remove", "beta", "--store", str(store)) == 0


# ---- hot add on a running server --------------------------------------------------------------

SERVE_SETTINGS = ["serve.expert_cpus=0.5", "serve.router_cpus=0.25", "serve.max_loaded_experts=2",
                  "serve.max_tokens=8", "serve.retry_s=90", "serve.max_replicas=1"]


def test_a_replica_reloads_an_expert_whose_active_version_changed(built, tmp_path):
    """Activating another version replaces `experts/NAME`: a replica holding the old weights loads
    the new ones at its next request; a removed expert is unknown from then on."""
    import torch
    from safetensors.torch import load_file, save_file

    from imoe_ray.serving.model import ServingModel, UnknownExpert

    _, built_store, _ = built
    store = tmp_path / "store"
    shutil.copytree(built_store.root, store, ignore=shutil.ignore_patterns("runs"))
    trained = json.loads((store / "experts" / "index.json").read_text())["experts"][0]["name"]
    v1, _ = package_expert(store, trained, "1.0.0", tmp_path / "v1.expert", new_name="swap")
    weights = store / "experts" / trained / "adapter_model.safetensors"
    save_file({k: t * 2 if "lora_B" in k else t for k, t in load_file(weights).items()}, str(weights))
    v2, _ = package_expert(store, trained, "2.0.0", tmp_path / "v2.expert", new_name="swap")
    registry = Registry(store, PackagesConfig(allow_unsigned=True))
    registry.install(str(v1))
    model = ServingModel(store, threads=1)
    assert model.ensure("swap") > 0 and model.ensure("swap") == 0.0
    before = model.bank.resident["swap"]
    registry.install(str(v2))                                     # the newest install becomes active
    assert model.ensure("swap") > 0                               # reloaded, not the resident v1
    after = model.bank.resident["swap"]
    module = next(iter(before.modules))
    assert torch.allclose(after.modules[module][1], 2 * before.modules[module][1])
    registry.remove("swap")
    with pytest.raises(UnknownExpert):
        model.ensure("swap")
    from imoe_ray.packaging.registry import AdapterMismatch
    registry.install(str(v1))
    assert model.ensure("swap") > 0
    served = store / "experts" / "swap" / "adapter_model.safetensors"
    tampered = load_file(served)
    save_file({k: t * 3 for k, t in tampered.items()}, str(served))   # write access to the store is not enough
    model.bank.evict("swap")                                       # the next load reads the store again
    with pytest.raises(AdapterMismatch, match="does not match the sha256"):
        model.ensure("swap")


def test_rebuilding_the_experts_keeps_installed_packages(ray_session, built, tmp_path):
    from imoe_ray.build import build
    from imoe_ray.config import load_config

    cfg, built_store, _ = built
    store = tmp_path / "store"
    shutil.copytree(built_store.root, store, ignore=shutil.ignore_patterns("runs"))
    trained = json.loads((store / "experts" / "index.json").read_text())["experts"][0]["name"]
    pkg, _ = package_expert(store, trained, "1.0.0", tmp_path / "kept.expert", new_name="kept")
    Registry(store, PackagesConfig(allow_unsigned=True)).install(str(pkg))
    messages: list[str] = []
    build(load_config(None, [], base=cfg.model_dump(mode="json") | {"store": str(store)}), until="experts",
          force_stages=("experts",), report=messages.append)
    assert any(m.startswith(("[experts] running", "[experts] resuming")) for m in messages)
    names = [e["name"] for e in json.loads((store / "experts" / "index.json").read_text())["experts"]]
    assert trained in names and "kept" in names
    assert (store / "experts" / "kept" / "adapter_config.json").is_file()


@pytest.mark.slow  # end to end, tens of seconds: `pytest -m slow`
def test_hot_add_and_drain_on_a_running_server(ray_cluster, built, tmp_path):
    from imoe_ray.retrieval.knowledge_base import KnowledgeBase
    from imoe_ray.retrieval.learning import list_learned

    cfg, built_store, _ = built
    store = tmp_path / "store"
    shutil.copytree(built_store.root, store)
    trained = json.loads((store / "experts" / "index.json").read_text())["experts"][0]["name"]
    pkg, _ = package_expert(store, trained, "1.0.0", tmp_path / "hot.expert", new_name="hot-added")
    shutil.rmtree(store / "runs", ignore_errors=True)
    proc, base = start_imoe_serve(store, ray_cluster["env"], SERVE_SETTINGS, tmp_path / "serve.log")

    def models() -> list[str]:
        return [m["id"] for m in requests.get(f"{base}/v1/models", timeout=30).json()["data"]]

    def wait_for(predicate, what: str) -> None:
        deadline = time.time() + 30
        while not predicate():
            assert time.time() < deadline, what
            time.sleep(0.5)

    try:
        assert "hot-added" not in models()
        done = subprocess.run([IMOE, "experts", "install", str(pkg), "--store", str(store), "--allow-unsigned"],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        wait_for(lambda: "hot-added" in models(), "the installed expert never joined /v1/models")
        query = " ".join(json.loads((store / "experts" / trained / "manifest.json").read_text())["routing"]["keywords"][:4])
        route = requests.post(f"{base}/v1/route", json={"text": query}, timeout=60).json()
        assert route["all_probabilities"].get("hot-added", 0) > 0, route   # joined routing by its centroid
        answer = requests.post(f"{base}/v1/completions", json={"model": "hot-added", "prompt": "the", "max_tokens": 4},
                               timeout=120)
        assert answer.status_code == 200, answer.text                  # a replica loaded it from the store
        ask = {"model": "hot-added", "prompt": query, "max_tokens": 8, "imoe": {"mode": "optimized"}}
        first = requests.post(f"{base}/v1/completions", json=ask, timeout=120)
        assert first.status_code == 200, first.text                    # no table of its own yet: all tables searched
        wait_for(lambda: [r for r in list_learned(KnowledgeBase(store / "kb", None)) if r["table"] == "hot-added"],
                 "the answer was not learned into a new table of the expert's")
        again = requests.post(f"{base}/v1/completions", json=ask, timeout=120).json()
        assert {c["table"] for c in again["imoe"]["citations"]} == {"hot-added"}, again["imoe"]  # its own table now
        assert subprocess.run([IMOE, "experts", "remove", "hot-added", "--store", str(store)]).returncode == 0
        wait_for(lambda: "hot-added" not in models(), "the removed expert is still listed")
        route = requests.post(f"{base}/v1/route", json={"text": query}, timeout=60).json()
        assert "hot-added" not in route["all_probabilities"] and "hot-added" not in route["experts"]
        gone = requests.post(f"{base}/v1/completions", json={"model": "hot-added", "prompt": "the"}, timeout=60)
        assert gone.status_code == 404
    finally:
        stop_imoe_serve(proc)
