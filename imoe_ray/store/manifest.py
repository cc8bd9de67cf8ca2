"""Per-stage JSON manifests: what a stage was run with, what it produced, how long it took.

A stage is up to date when its manifest records the same config hash and input fingerprints as
the run about to start; then it is skipped. While a stage runs, its settings sit in a separate
`.partial.json`, so a failed or killed run never replaces the last complete manifest, and the
next run with the same settings resumes from what the partial run left.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from pydantic import BaseModel, Field

from imoe_ray.store.store import Store


class StageManifest(BaseModel):
    """`manifests/STAGE.json` (and `STAGE.partial.json` while the stage runs)."""
    stage: str
    config_hash: str
    inputs: dict[str, str] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    timings_s: dict[str, float] = Field(default_factory=dict)
    complete: bool = False
    finished_at: str | None = None
    reruns: int = 0  # forced re-runs with the same settings and inputs: their output may differ all the same

    def __init__(self, stage: str, config_hash: str, inputs: dict[str, str] | None = None, **fields: Any):
        super().__init__(stage=stage, config_hash=config_hash, inputs=inputs or {}, **fields)

    @staticmethod
    def location(stage: str, partial: bool = False) -> tuple[str, str]:
        return ("manifests", f"{stage}.partial.json" if partial else f"{stage}.json")

    @classmethod
    def load(cls, store: Store, stage: str, partial: bool = False) -> "StageManifest | None":
        where = cls.location(stage, partial)
        return cls(**store.read_json(*where)) if store.exists(*where) else None

    def start(self, store: Store) -> None:
        """Record that the stage is running with these settings."""
        store.write_json(self.model_dump(mode="json"), *self.location(self.stage, partial=True))

    def finish(self, store: Store) -> None:
        self.complete = True
        self.finished_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        store.write_json(self.model_dump(mode="json"), *self.location(self.stage))
        store.remove(*self.location(self.stage, partial=True))

    def matches(self, config_hash: str, inputs: dict[str, str]) -> bool:
        return self.config_hash == config_hash and self.inputs == inputs

    def fingerprint(self) -> str:
        """Identifies the stage's output by what produced it, so downstream stages know when to re-run:
        after a forced re-run (new code, a retrained model) they re-run too."""
        produced = f"{self.stage}|{self.config_hash}|{sorted(self.inputs.items())}"
        if self.reruns:  # stores written before re-runs were counted keep their fingerprints
            produced += f"|rerun {self.reruns}"
        return hashlib.sha256(produced.encode()).hexdigest()[:16]
