"""Per-stage JSON manifests: what a stage was run with, what it produced, how long it took.

A stage is up to date when its manifest exists, says `complete`, and records the same config
hash and input fingerprints as the run about to start; then the stage is skipped.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from imoe_ray.store.store import Store


@dataclass
class StageManifest:
    stage: str
    config_hash: str
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    complete: bool = False
    finished_at: str | None = None

    @staticmethod
    def location(stage: str) -> tuple[str, str]:
        return ("manifests", f"{stage}.json")

    @classmethod
    def load(cls, store: Store, stage: str) -> "StageManifest | None":
        if not store.exists(*cls.location(stage)):
            return None
        return cls(**store.read_json(*cls.location(stage)))

    def save(self, store: Store) -> None:
        store.write_json(asdict(self), *self.location(self.stage))

    def finish(self, store: Store) -> None:
        self.complete = True
        self.finished_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.save(store)

    def matches(self, config_hash: str, inputs: dict[str, str]) -> bool:
        return self.complete and self.config_hash == config_hash and self.inputs == inputs
