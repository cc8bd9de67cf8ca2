"""The package manifest: what a `.expert` archive claims about its adapter, checked at install.

`canonical()` is the byte string that signatures cover; it holds the sha256 of every file, so a
valid signature vouches for the adapter weights too. The JSON schema in `schema/` is generated
from this model (`python -m imoe_ray.packaging.manifest`), and a test keeps the two equal.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from pathlib import Path
from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from imoe_ray.packaging import PackageError
from imoe_ray.packaging.names import NAME_PATTERN, RESERVED, SEMVER_PATTERN, short

FORMAT: Final = "imoe-expert/1"
SCHEMA_PATH = Path(__file__).parent / "schema" / "expert-manifest.schema.json"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"           # a whole-model package (`imoe experts add-model`): a Hugging Face causal LM directory
MODEL_FILES = frozenset({"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                         "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                         "chat_template.jinja"})   # plus any *.safetensors
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib")
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


MAX_KEYWORDS = 32
MAX_KEYWORD_CHARS = 64
MAX_CENTROID_NORM = 100.0   # a centroid is a mean of unit embeddings: its norm is at most 1
MAX_PRIORITY = 100.0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Category(_Strict):
    name: str = Field(min_length=1, max_length=200)
    description: str = Field("", max_length=4000)


class Routing(_Strict):
    keywords: list[Annotated[str, Field(min_length=1, max_length=MAX_KEYWORD_CHARS)]] = Field(
        default_factory=list, max_length=MAX_KEYWORDS)
    centroid: list[float] = Field(min_length=1, max_length=8192,
                                  description="the category's mean embedding: how the router places it")
    priority: float = Field(0.0, ge=-MAX_PRIORITY, le=MAX_PRIORITY)

    @field_validator("centroid")
    @classmethod
    def _bounded(cls, centroid: list[float]) -> list[float]:
        norm = math.sqrt(sum(x * x for x in centroid))
        if not 0 < norm <= MAX_CENTROID_NORM:
            raise ValueError(f"the centroid's norm is {norm:.4g}; it must be above 0 and at most {MAX_CENTROID_NORM:g}")
        return centroid


class BaseModelRef(_Strict):
    id: str = Field(min_length=1, description="the base model's name (HF id, path, or store:base)")
    fingerprint: str = Field(pattern=SHA256_PATTERN, description="sha256 fingerprint of the base model's weights")


class Adapter(_Strict):
    type: Literal["lora", "dora", "ia3"]
    rank: int | None = Field(None, ge=1)
    settings: dict[str, str | int | float | bool | list[str] | None] = Field(default_factory=dict)


class WholeModel(_Strict):
    architecture: str = Field(min_length=1, max_length=200, description="the saved architecture, e.g. LlamaForCausalLM")
    model_type: str = Field(min_length=1, max_length=100)
    parameters: int = Field(ge=1)


class Training(_Strict):
    rows: int | None = Field(None, ge=0)
    tokens: int | None = Field(None, ge=0)
    categories: list[str] = Field(default_factory=list)
    metrics: dict[str, float | int | None] = Field(default_factory=dict)


class PackageManifest(_Strict):
    format: Literal["imoe-expert/1"] = FORMAT
    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=SEMVER_PATTERN)
    category: Category
    routing: Routing
    base_model: BaseModelRef | None = Field(None, description="what an adapter was trained on (adapter packages)")
    adapter: Adapter | None = None
    model: WholeModel | None = Field(None, description="a whole model instead of an adapter (files under model/)")
    training: Training = Training()
    license: str = Field("unspecified", min_length=1, max_length=200)
    created_at: str = Field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    files: dict[str, str] = Field(min_length=1, max_length=256, description="path inside the package → sha256 of its bytes")

    @property
    def payload_dir(self) -> str:
        """The package's payload folder: adapter/ or, for a whole model, model/."""
        return MODEL_DIR if self.model is not None else ADAPTER_DIR

    def _dump(self) -> dict:
        data = self.model_dump(mode="json")
        if data.get("model") is None:   # an adapter package's bytes (and signatures) as before whole models
            data.pop("model", None)
        return data

    def canonical(self) -> bytes:
        """The bytes a signature covers: sorted keys, no whitespace."""
        return json.dumps(self._dump(), sort_keys=True, separators=(",", ":")).encode()

    def to_json(self) -> str:
        return json.dumps(self._dump(), indent=2)

    @classmethod
    def parse(cls, raw: bytes | str, where: str = "manifest.json") -> "PackageManifest":
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PackageError(f"{where} is not valid JSON: {e}") from None
        try:
            manifest = cls.model_validate(data)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, x['loc'])) or '(root)'}: {x['msg']}" for x in e.errors()[:8])
            raise PackageError(f"{where} is not a valid expert manifest: {problems}") from None
        if manifest.name in RESERVED:
            raise PackageError(f"{where}: the name {manifest.name!r} is reserved (a built-in role or a file of the store)")
        if (manifest.adapter is None) == (manifest.model is None):
            raise PackageError(f"{where} must describe exactly one of an adapter or a whole model")
        if manifest.adapter is not None and manifest.base_model is None:
            raise PackageError(f"{where}: an adapter package must name its base_model (id and fingerprint)")
        folder = manifest.payload_dir
        for path, digest in manifest.files.items():
            file = path[len(folder) + 1:]
            if file.lower().endswith(PICKLE_SUFFIXES):
                raise PackageError(f"{where}: {short(path)} is a pickle-based checkpoint; packages carry safetensors "
                                   "weights only")
            allowed = file in MODEL_FILES if manifest.model is not None else file == "adapter_config.json"
            if (not path.startswith(f"{folder}/") or not _FILE.match(file) or not _is_sha256(digest)
                    or not (allowed or file.endswith(".safetensors"))):
                what = f"model/<{'|'.join(sorted(MODEL_FILES))}>" if manifest.model is not None \
                    else "adapter/adapter_config.json"
                raise PackageError(f"{where}: file entry {short(path)} must be {what} or {folder}/<file>.safetensors "
                                   "with a sha256 hex digest")
        return manifest


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def json_schema() -> dict:
    schema = PackageManifest.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://imoe-ray/schemas/expert-manifest.schema.json"
    return schema


def write_schema(path: Path = SCHEMA_PATH) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_schema(), indent=2, sort_keys=True) + "\n")
    return path


if __name__ == "__main__":
    print(write_schema())
