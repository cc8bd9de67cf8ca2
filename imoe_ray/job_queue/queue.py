"""The job queue without Ray: records (kept durable), the scheduler, the slots' bookkeeping and
preemption decisions. The JobQueue Serve deployment drives it; the tests drive it directly."""

from __future__ import annotations

import builtins
import time
from typing import Callable

from imoe_ray.job_queue.preemption import absorb
from imoe_ray.job_queue.records import FINISHED, JobRecord, JobStore
from imoe_ray.job_queue.scheduler import Scheduler


class JobQueueCore:
    def __init__(self, store_dir: str, slots: int, per_agent_limit: int = 0, retention_s: float = 7 * 86400,
                 decode: Callable[[JobRecord], str] | None = None):
        self.store = JobStore(store_dir)
        self.scheduler = Scheduler(slots, per_agent_limit)
        self.decode = decode or (lambda record: "")  # a job's generated ids as text, in its decoder's vocabulary
        self.jobs: dict[str, JobRecord] = {}
        self.recovered = self._recover(retention_s)

    def _recover(self, retention_s: float) -> int:
        """Reload every record: finished ones stay as they are (or go, past retention); running and
        preempted ones wait again, keeping the tokens they had; queued ones stay queued."""
        now, back = time.time(), 0
        for record in self.store.load_all():
            if record.finished and now - record.updated > retention_s:
                self.store.delete(record.id)
                continue
            if record.state == "running":
                record.mark("queued", now)
                self.store.save(record)
                back += 1
            self.jobs[record.id] = record
        return back

    # ---- views ----
    def waiting(self) -> list[JobRecord]:
        return [r for r in self.jobs.values() if r.state in ("queued", "preempted")]

    def running(self) -> list[JobRecord]:
        return [r for r in self.jobs.values() if r.state == "running"]

    def unfinished(self) -> int:
        return sum(1 for r in self.jobs.values() if not r.finished)

    def view(self, job_id: str) -> dict | None:
        record = self.jobs.get(job_id)
        if record is None:
            return None
        waiting = self.waiting()
        position = self.scheduler.position(record, waiting) if record.state in ("queued", "preempted") else None
        out = record.view(position)
        out["output"] = record.output or self.decode(record)
        return out

    def list(self, agent: str | None = None, state: str | None = None) -> list[dict]:
        rows = sorted((r for r in self.jobs.values() if (agent is None or r.agent == agent)
                       and (state is None or r.state == state)), key=lambda r: r.seq)
        return [r.view() for r in rows]

    # ---- transitions ----
    def submit(self, record: JobRecord) -> JobRecord:
        record.seq = max((r.seq for r in self.jobs.values()), default=0) + 1
        self.store.save(record)
        self.jobs[record.id] = record
        return record

    def cancel(self, job_id: str) -> JobRecord | None:
        """Cancel a job that has not finished (a running one stops at its next step boundary)."""
        record = self.jobs.get(job_id)
        if record is not None and not record.finished:
            self._finish(record, "cancelled")
        return record

    def take(self) -> JobRecord | None:
        """The next job for a free slot (marked running), or None."""
        if len(self.running()) >= self.scheduler.slots:
            return None
        self._expire()
        record = self.scheduler.pick(self.waiting(), self.running())
        if record is None:
            return None
        record.mark("running")
        self.scheduler.started(record)
        self.store.save(record)
        return record

    def urgent(self) -> JobRecord | None:
        """With every slot busy, the waiting job that outranks a running one, started at once in an
        extra slot (marked running): its first token does not wait for the victim's step to end;
        the victim yields at its next step boundary. None when there is no such job."""
        running = self.running()
        if len(running) != self.scheduler.slots:
            return None
        best = self.scheduler.pick(self.waiting(), running)
        if best is None or self.scheduler.victim(best, running) is None:
            return None
        best.mark("running")
        self.scheduler.started(best)
        self.store.save(best)
        return best

    def stepped(self, record: JobRecord, tokens: builtins.list[int], finish: str | None) -> str:
        """A step of a running job ended: keep its tokens; returns what happens to it now:
        "done", "preempted", "stopped" (cancelled or expired meanwhile) or "continue"."""
        if record.state != "running":
            return "stopped"
        if tokens and not record.generated and record.telemetry.first_token_ms is None:
            record.telemetry.first_token_ms = (time.time() - record.created) * 1000
        if absorb(record, tokens, finish):
            self._finish(record, "succeeded")
            return "done"
        if record.deadline is not None and time.time() > record.deadline:
            self._finish(record, "failed", "the job's deadline passed before it finished")
            return "stopped"
        if self.must_yield(record):
            record.mark("preempted")
            self.store.save(record)
            return "preempted"
        self.store.save(record)
        return "continue"

    def must_yield(self, record: JobRecord) -> bool:
        """Whether this running job is the one to make room: for a waiting job that outranks it, or
        for an urgent job already started in an extra slot (see `urgent`)."""
        running = self.running()
        if len(running) > self.scheduler.slots:
            return self.scheduler.victim_among(running) is record
        best = self.scheduler.pick(self.waiting(), [r for r in running if r.id != record.id])
        return best is not None and self.scheduler.victim(best, running) is record

    def failed(self, record: JobRecord, error: str) -> None:
        if not record.finished:
            self._finish(record, "failed", error)

    def _finish(self, record: JobRecord, state: str, error: str | None = None) -> None:
        record.mark(state)  # type: ignore[arg-type]
        record.error = error
        record.output = self.decode(record)
        self.store.save(record)

    def _expire(self) -> None:
        now = time.time()
        for record in self.waiting():
            if record.deadline is not None and now > record.deadline:
                self._finish(record, "failed", "the job's deadline passed before it finished")


__all__ = ["JobQueueCore", "FINISHED"]
