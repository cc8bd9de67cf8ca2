"""Where everything lives in a store, the records shared by several stages, and the held-out split.

    STORE/
      config.yaml                      the settings the store was built with (honoured by every command)
      manifests/STAGE.json             one per stage, written last: the stage's outputs count from then on
      locks/writer.json                the writer lease (imoe_ray.store.lock)
      corpus/chunks/                   Parquet: the input's columns + chunk_id, chunk_index, n_tokens
      embeddings/                      Parquet parts: chunk_id, embedding
      discovery/model.json             categories (names, keywords, centroids), t_C
      assignments.parquet              chunk_id, id, memberships, top_category, categories, ...
      router/                          config.json, weights.safetensors, experts.json (late-joining experts)
      shards/NAME/ + shards/index.json Parquet per category (multi-label; fallback rows to all)
      kb/                              LanceDB: one table per expert
      base/                            Hugging Face causal LM + tokenizer
      experts/NAME/ + experts/index.json  PEFT adapters with manifest.json
      baselines/dense/                 the dense baseline adapter
      fusion/summarizer/               the summarizer adapter
      registry/                        installed `.expert` package versions
      runs/                            Ray Train/Tune run directories (checkpoints) of every training stage
      jobs/                            the job queue's durable records
      auth/keys.json                   API keys: names, roles, limits and SHA-256 digests (never the keys)

Every path is relative to the store's root, as a tuple of parts for `Store` methods.
"""

from __future__ import annotations

import hashlib
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

CONFIG = ("config.yaml",)
MANIFESTS = "manifests"
CHUNKS = ("corpus", "chunks")
EMBEDDINGS = ("embeddings",)
DISCOVERY_MODEL = ("discovery", "model.json")
ASSIGNMENTS = ("assignments.parquet",)
ROUTER_MODEL = ("router", "config.json")
ROUTER_WEIGHTS = ("router", "weights.safetensors")
ROUTER_EXTRA_EXPERTS = ("router", "experts.json")
ROUTER_REFERENCE = ("router", "reference-head.safetensors")
SHARDS = "shards"
SHARDS_INDEX = (SHARDS, "index.json")
KB = "kb"
BASE = "base"
EXPERTS = "experts"
EXPERTS_INDEX = (EXPERTS, "index.json")
EXPERT_MANIFEST = "manifest.json"
DENSE = ("baselines", "dense")
FUSION = "fusion"
REGISTRY = "registry"
RUNS = "runs"
JOBS = "jobs"
API_KEYS = ("auth", "keys.json")


# ---- records -----------------------------------------------------------------------------------
class ExpertEntry(BaseModel):
    """One servable expert in `experts/index.json` (trained by the build, or installed from a package)."""
    model_config = ConfigDict(extra="allow")
    name: str
    categories: list[str] = Field(default_factory=list)
    rows: int | None = None
    tokens: int | None = None
    package: dict[str, Any] | None = None  # set for experts installed from `.expert` packages


class ExpertsIndex(BaseModel):
    """`experts/index.json`: the experts, which categories too small for one are served by, the base."""
    model_config = ConfigDict(extra="allow")
    experts: list[ExpertEntry] = Field(default_factory=list)
    aliases: dict[str, str] = Field(default_factory=dict)
    base_fingerprint: str | None = None
    dense_baseline: str | None = None

    def names(self) -> list[str]:
        return [e.name for e in self.experts]

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


class ExpertManifest(BaseModel):
    """`experts/NAME/manifest.json` (also the dense baseline's and the summarizer's): what the adapter
    is, what it was trained on and how, and how the router reaches it."""
    model_config = ConfigDict(extra="allow")
    name: str
    kind: str                                   # expert | dense-baseline | summarizer | package
    base_model: dict[str, Any] = Field(default_factory=dict)    # {name, fingerprint}
    adapter: dict[str, Any] = Field(default_factory=dict)       # {type, r, alpha, target_modules, ...}
    training: dict[str, Any] = Field(default_factory=dict)      # loss, tokens, steps, wall_s, resumed_from_step
    training_key: str | None = None             # what the build compares to skip an expert that is up to date
    routing: dict[str, Any] = Field(default_factory=dict)       # {keywords, priority}
    centroid: list[float] | None = None
    created_at: str | None = None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def read_experts_index(store) -> ExpertsIndex:
    """The store's experts index; empty when the experts stage has not run."""
    return ExpertsIndex.model_validate(store.read_json(*EXPERTS_INDEX)) if store.exists(*EXPERTS_INDEX) else ExpertsIndex()


# ---- the held-out split ------------------------------------------------------------------------
def split_of(key: str, calib: float, test: float, offset: float = 0.0) -> str:
    """A stable train/calib/test split by input row id, so overlapping chunks of one document stay
    together; the router calibrates on `calib`, and no model trains on `test` (`imoe eval`).
    `offset` rotates the split: offsets 0, 1/k, …, (k-1)/k with `test` 1/k are the k folds of a
    cross-validation, each row in one fold's test split."""
    u = (int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2**64 + offset) % 1.0
    return "test" if u < test else "calib" if u < test + calib else "train"


def is_heldout(row_id: str, calib: float, test: float) -> bool:
    return split_of(str(row_id), calib, test) == "test"
