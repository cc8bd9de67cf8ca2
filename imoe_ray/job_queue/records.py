"""Job records and their durable store: one JSON file per job under STORE/jobs/, written
temp-then-rename (a reader never sees half a record; a crash leaves the previous version).

One file per job rather than SQLite: the store is a directory tree everyone can read with `cat`,
a job is written by one owner (the single JobQueue replica) so there is no concurrent writer to
arbitrate, and a record is rewritten only at a step boundary (a few writes per second per job)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from imoe_ray.store.layout import JOBS

State = Literal["queued", "running", "preempted", "succeeded", "failed", "cancelled"]
FINISHED = ("succeeded", "failed", "cancelled")


class Telemetry(BaseModel):
    queued_ms: float = 0.0          # time spent waiting (queued or preempted), summed over waits
    run_ms: float = 0.0             # time spent generating, summed over runs
    preemptions: int = 0
    tokens: int = 0
    first_token_ms: float | None = None   # submission → first token


class StateChange(BaseModel):
    state: State
    at: float                       # unix time of the change


class JobRecord(BaseModel):
    id: str = Field(default_factory=lambda: f"job-{uuid.uuid4().hex[:20]}")
    agent: str
    priority: int
    idempotency_key: str | None = None   # a retried POST with the same key (and agent) gets this job back
    seq: int = 0                    # submission order: FIFO within a priority class
    state: State = "queued"
    prompt_ids: list[int]
    experts: dict[str, float]
    model: str | None = None        # a whole-model expert decoding alone; prompt_ids and generated are its ids
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: list[int] = []
    deadline: float | None = None   # unix time after which a job that has not finished fails
    generated: list[int] = []       # the token ids so far: a resumed job continues from prompt + these
    finish_reason: str | None = None
    output: str = ""
    error: str | None = None
    created: float = Field(default_factory=time.time)
    updated: float = Field(default_factory=time.time)
    waiting_since: float | None = Field(default_factory=time.time)
    running_since: float | None = None
    telemetry: Telemetry = Telemetry()
    history: list[StateChange] = []  # every state it entered, in order (a record saved before this field: its submission)

    @model_validator(mode="after")
    def _submitted(self) -> "JobRecord":
        if not self.history:
            self.history = [StateChange(state="queued", at=self.created)]
        return self

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @property
    def remaining(self) -> int:
        return self.max_tokens - len(self.generated)

    def mark(self, state: State, now: float | None = None) -> None:
        """Move to a state, accounting the time spent in the previous one."""
        now = time.time() if now is None else now
        if self.running_since is not None:
            self.telemetry.run_ms += (now - self.running_since) * 1000
            self.running_since = None
        if self.waiting_since is not None:
            self.telemetry.queued_ms += (now - self.waiting_since) * 1000
            self.waiting_since = None
        if state == "running":
            self.running_since = now
        elif state in ("queued", "preempted"):
            self.waiting_since = now
        if state == "preempted":
            self.telemetry.preemptions += 1
        self.state, self.updated = state, now
        self.history.append(StateChange(state=state, at=now))

    def view(self, position: int | None = None) -> dict:
        """What GET /v1/jobs/{id} answers (times of the current state included)."""
        out = self.model_dump(include={"id", "agent", "priority", "state", "output", "finish_reason", "error",
                                       "max_tokens", "created", "updated", "history", "experts"})
        t = self.telemetry.model_copy()
        now = time.time()
        if self.running_since is not None:
            t.run_ms += (now - self.running_since) * 1000
        if self.waiting_since is not None:
            t.queued_ms += (now - self.waiting_since) * 1000
        t.tokens = len(self.generated)
        out["telemetry"] = {k: round(v, 3) if isinstance(v, float) else v for k, v in t.model_dump().items()}
        out["tokens"] = len(self.generated)
        out["position"] = position
        return out


class JobStore:
    """STORE/jobs/<id>.json, one file per job, in the store itself (a local directory or a URI)."""

    def __init__(self, root: str | Path):
        from imoe_ray.store import Store

        self.store = Store(root)

    def save(self, record: JobRecord) -> None:
        record.telemetry.tokens = len(record.generated)
        self.store.write_bytes(record.model_dump_json().encode(), JOBS, f"{record.id}.json")

    def load_all(self) -> list[JobRecord]:
        from imoe_ray.store import StoreError

        out = []
        for name in self.store.listdir(JOBS):
            if not name.endswith(".json"):
                continue
            try:
                out.append(JobRecord.model_validate_json(self.store.read_bytes(JOBS, name)))
            except (OSError, StoreError, ValueError):
                continue  # a record another version wrote; never fatal to the queue
        return out

    def delete(self, job_id: str) -> None:
        self.store.remove(JOBS, f"{job_id}.json")
