"""Whole models as experts: any local Hugging Face causal LM directory (its own architecture, size
and tokenizer) registered in a store next to the adapter experts.

    STORE/experts/NAME/model/          the model's Hugging Face directory, copied (safetensors weights only)
    STORE/experts/NAME/manifest.json   kind "model": architecture, bytes, file hashes, routing keywords, centroid

It joins routing the way a late-joining adapter expert does (`router/experts.json`: keywords and a
centroid, no category), without retraining the router; the centroid is the store's encoder's mean
vector of sample texts of its domain, or of its keywords. Serving loads it on demand under the
replica's byte budget (`imoe_ray.serving.model_pool`). Every write is temp-then-rename, under the
store's writer lock.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from imoe_ray.packaging import PackageError
from imoe_ray.packaging.manifest import sha256_file
from imoe_ray.packaging.names import check_name, inside
from imoe_ray.store import write_text_atomic
from imoe_ray.store.layout import EXPERT_MANIFEST, EXPERTS, EXPERTS_INDEX, ROUTER_EXTRA_EXPERTS, ROUTER_MODEL

KIND = "model"
MODEL_DIR = "model"
WEIGHT_SUFFIX = ".safetensors"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_UNSAFE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class ModelExpertError(PackageError):
    """A directory that cannot be registered as a whole-model expert; the message says why."""


@dataclass
class ModelExpert:
    name: str
    path: str                  # STORE/experts/NAME
    model_type: str
    architecture: str
    parameters: int
    weight_bytes: int          # what its weights take once loaded in float32 (the serving dtype on CPU)
    keywords: list[str]
    centroid_from: str         # "texts" or "keywords"


def is_model_expert(expert_dir: str | Path) -> bool:
    """Whether `STORE/experts/NAME` holds a whole model (not a PEFT adapter)."""
    try:
        info = json.loads((Path(expert_dir) / EXPERT_MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("kind") == KIND


def model_experts(store: str | Path) -> dict[str, Path]:
    """Every whole-model expert of a store: name → its Hugging Face directory."""
    root = Path(store)
    try:
        index = json.loads(root.joinpath(*EXPERTS_INDEX).read_text())
    except (OSError, ValueError):
        return {}
    return {e["name"]: root / EXPERTS / e["name"] / MODEL_DIR for e in index.get("experts", [])
            if e.get("kind") == KIND}


def safetensors_shapes(model_dir: str | Path) -> dict[str, tuple[list[int], str]]:
    """Each tensor's shape and dtype from the safetensors headers (no weight is read)."""
    from safetensors import safe_open

    out = {}
    for file in sorted(Path(model_dir).glob(f"*{WEIGHT_SUFFIX}")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                out[key] = (list(piece.get_shape()), str(piece.get_dtype()))
    return out


def weight_bytes(model_dir: str | Path, element_size: int = 4) -> tuple[int, int]:
    """(parameters, bytes at `element_size` bytes each) of a model directory's weights, from the headers."""
    numel = sum(int(np.prod(shape)) if shape else 1 for shape, _ in safetensors_shapes(model_dir).values())
    return numel, numel * element_size


def check_model_dir(path: str | Path) -> dict:
    """The model's config.json when `path` is a loadable causal LM directory with safetensors weights
    and a tokenizer; else ModelExpertError naming what is missing."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    root = Path(path)
    if not root.is_dir():
        raise ModelExpertError(f"{path} is not a directory (a Hugging Face model directory is expected)")
    if not (root / "config.json").is_file():
        raise ModelExpertError(f"{path} has no config.json: not a Hugging Face model directory")
    if not any(root.glob(f"*{WEIGHT_SUFFIX}")):
        pickled = sorted(p.name for p in root.iterdir() if p.suffix in _UNSAFE_WEIGHTS)
        hint = f" (it has {', '.join(pickled[:3])}: pickled weights are never loaded; convert them to safetensors)" \
            if pickled else ""
        raise ModelExpertError(f"{path} has no *.safetensors weights{hint}")
    if not any((root / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelExpertError(f"{path} has no tokenizer ({' or '.join(_TOKENIZER_FILES[:2])}): a whole-model "
                               "expert decodes with its own tokenizer")
    try:
        config = AutoConfig.from_pretrained(root)
    except (OSError, ValueError, KeyError) as e:
        raise ModelExpertError(f"{path}/config.json cannot be read by transformers: {e}") from None
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    saved = list(getattr(config, "architectures", None) or [])
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (saved and not causal.intersection(saved)):
        what = f"a {saved[0]}" if saved else f"a {config.model_type!r} model"
        raise ModelExpertError(f"{path} holds {what}, not a causal language model (its weights have no "
                               "language-model head that AutoModelForCausalLM would load)")
    return json.loads((root / "config.json").read_text())


def routing_centroid(encoder, texts: list[str]) -> list[float]:
    """The L2-normalised mean of the encoder's vectors of `texts` (how routing places the expert)."""
    vectors = encoder.encode(texts)
    mean = vectors.mean(axis=0)
    return (mean / max(float(np.linalg.norm(mean)), 1e-9)).astype(float).tolist()


def read_texts(path: str | Path, limit: int = 2000) -> list[str]:
    """Sample texts of a domain: a .jsonl file (a "text" field per line) or plain text (one per
    non-empty line); at most `limit`."""
    p = Path(path)
    if not p.is_file():
        raise ModelExpertError(f"--texts {path}: no such file")
    texts = []
    for line in p.read_text(errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        if p.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except ValueError:
                raise ModelExpertError(f"--texts {path}: a line is not JSON: {line[:60]!r}") from None
            line = str(row.get("text", "")).strip() if isinstance(row, dict) else ""
        if line:
            texts.append(line)
        if len(texts) >= limit:
            break
    if not texts:
        raise ModelExpertError(f"--texts {path} holds no text")
    return texts


def _copy_model(source: Path, target: Path) -> dict[str, str]:
    """Copy the model directory's regular files (symlinks followed, hidden entries and pickled weights
    left out) and return each file's sha256."""
    target.mkdir(parents=True)
    files = {}
    for item in sorted(source.iterdir()):
        if item.name.startswith(".") or not item.is_file() or item.suffix in _UNSAFE_WEIGHTS:
            continue
        shutil.copyfile(item, target / item.name)
        files[item.name] = sha256_file(target / item.name)
    return files


def _check_free(store: Path, name: str) -> None:
    served = inside(store / EXPERTS, name)
    listed = {e["name"] for e in json.loads(store.joinpath(*EXPERTS_INDEX).read_text()).get("experts", [])}
    if served.exists() or served.is_symlink() or name in listed:
        raise ModelExpertError(f"{store} already has an expert named {name!r} (experts/{name}); remove it first "
                               f"(`imoe experts remove-model {name}` or `imoe experts remove {name}`) or pick another name")
    for other in (store / "fusion" / name, store / "baselines" / name, store / "registry" / name):
        if other.exists():
            raise ModelExpertError(f"{name!r} is already taken in this store ({other}); choose another name")


def _check_dims(store: Path, centroid: list[float]) -> None:
    try:
        profiles = json.loads(store.joinpath(*ROUTER_MODEL).read_text()).get("profiles", [])
    except (OSError, ValueError):
        return
    dims = {len(p["centroid"]) for p in profiles if p.get("centroid")}
    if dims and len(centroid) not in dims:
        raise ModelExpertError(f"the centroid has {len(centroid)} dimensions but this store's router embeds in "
                               f"{sorted(dims)[0]}: embedding.encoder differs from the one the store was built with")


def add_model(store: str | Path, name: str, path: str | Path, keywords: list[str], texts: list[str] | None,
              load_encoder: Callable[[], Any]) -> ModelExpert:
    """Register the Hugging Face causal LM at `path` as the expert NAME of a local store: validated,
    copied under a temporary name and renamed into `experts/NAME`, then listed in `experts/index.json`
    and joined to routing (`router/experts.json`). `load_encoder()` returns the store's encoder (with
    `.encode(texts)`); it is called only once every cheap check has passed, so that a refusal does not
    wait for an encoder to load."""
    from imoe_ray.store import Store

    check_name(name)
    store = Path(store).resolve()
    if not store.joinpath(*EXPERTS_INDEX).is_file():
        raise ModelExpertError(f"{store} has no experts/index.json: build it first (`imoe build --store {store} "
                               "--until experts`)")
    keywords = [k.strip() for k in keywords if k.strip()]
    if not keywords and not texts:
        raise ModelExpertError("give the expert routing keywords (--keywords a,b) or sample texts (--texts FILE): "
                               "routing could not place it otherwise")
    _check_free(store, name)  # again under the lock below: this one only answers a taken name at once
    config = check_model_dir(path)
    centroid = routing_centroid(load_encoder(), texts or [", ".join(keywords)])
    _check_dims(store, centroid)
    with Store(store, create=False).lock(f"imoe experts add-model {name}"):
        _check_free(store, name)
        experts = store / EXPERTS
        staging = experts / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            files = _copy_model(Path(path), staging / MODEL_DIR)
            parameters, nbytes = weight_bytes(staging / MODEL_DIR)
            expert = ModelExpert(name, str(experts / name), config.get("model_type", "?"),
                                 (config.get("architectures") or ["?"])[0], parameters, nbytes, keywords,
                                 "texts" if texts else "keywords")
            manifest = {"name": name, "kind": KIND,
                        "model": {"architecture": expert.architecture, "model_type": expert.model_type,
                                  "parameters": parameters, "weight_bytes": nbytes, "source": str(Path(path).resolve()),
                                  "files": {f"{MODEL_DIR}/{k}": v for k, v in files.items()}},
                        "routing": {"keywords": keywords, "priority": 0, "centroid_from": expert.centroid_from},
                        "centroid": centroid, "categories": [name],
                        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            (staging / EXPERT_MANIFEST).write_text(json.dumps(manifest, indent=2))
            os.replace(staging, experts / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _register(store, name, keywords, centroid, {"kind": KIND, "parameters": parameters})
    return expert


def _register(store: Path, name: str, keywords: list[str], centroid: list[float], extra: dict) -> None:
    """List NAME for serving and routing: the routing profile first, the index last (a server that
    sees the index entry finds the profile already there)."""
    profiles_path = store.joinpath(*ROUTER_EXTRA_EXPERTS)
    profiles = json.loads(profiles_path.read_text()) if profiles_path.is_file() else []
    profile = {"name": name, "category": None, "keywords": keywords, "centroid": centroid, "priority": 0.0}
    write_text_atomic(profiles_path, json.dumps([p for p in profiles if p["name"] != name] + [profile], indent=2))
    index_path = store.joinpath(*EXPERTS_INDEX)
    index = json.loads(index_path.read_text())
    # "package": the experts stage keeps entries that carry it when the store is rebuilt (not the build's own)
    entry = {"name": name, "categories": [name], "kind": KIND, "package": {"kind": KIND}, **extra}
    index["experts"] = [e for e in index["experts"] if e["name"] != name] + [entry]
    write_text_atomic(index_path, json.dumps(index, indent=2))


def remove_model(store: str | Path, name: str) -> None:
    """Stop routing to and serving NAME and delete its files (requests already running finish)."""
    from imoe_ray.store import Store

    check_name(name)
    store = Path(store).resolve()
    folder = inside(store / EXPERTS, name)
    if not is_model_expert(folder):
        raise ModelExpertError(f"{store} has no whole-model expert named {name!r}; whole-model experts: "
                               f"{', '.join(sorted(model_experts(store))) or 'none'}")
    with Store(store, create=False).lock(f"imoe experts remove-model {name}"):
        index_path = store.joinpath(*EXPERTS_INDEX)
        index = json.loads(index_path.read_text())
        index["experts"] = [e for e in index["experts"] if e["name"] != name]
        write_text_atomic(index_path, json.dumps(index, indent=2))
        profiles_path = store.joinpath(*ROUTER_EXTRA_EXPERTS)
        if profiles_path.is_file():
            profiles = [p for p in json.loads(profiles_path.read_text()) if p["name"] != name]
            write_text_atomic(profiles_path, json.dumps(profiles, indent=2))
        retired = folder.parent / f".{name}.{uuid.uuid4().hex[:8]}.old"
        os.replace(folder, retired)
        shutil.rmtree(retired, ignore_errors=True)
