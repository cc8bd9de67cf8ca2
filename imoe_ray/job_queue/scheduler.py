"""Which job runs next and which running job makes room for it.

- Priority classes: a higher `priority` always goes first.
- Within a class, fairness between agents: the agent served least recently goes first (so one agent's
  hundred jobs cannot starve another's one), and each agent's own jobs go in submission order (FIFO;
  a preempted job keeps its place, so it resumes before its agent's later jobs).
- Optional per-agent limit: an agent with `per_agent_limit` jobs running waits for one of them.
- Victim: when every slot is busy and the job that would run next outranks a running one, the
  lowest-priority running job (the most recently started among equals: least work in flight) yields.
"""

from __future__ import annotations

from imoe_ray.job_queue.records import JobRecord


class Scheduler:
    def __init__(self, slots: int, per_agent_limit: int = 0):
        self.slots, self.per_agent_limit = slots, per_agent_limit
        self.last_served: dict[str, int] = {}   # agent → the tick its last job started
        self._tick = 0

    def pick(self, waiting: list[JobRecord], running: list[JobRecord]) -> JobRecord | None:
        """The job that should run next (ignoring whether a slot is free), or None."""
        busy: dict[str, int] = {}
        for r in running:
            busy[r.agent] = busy.get(r.agent, 0) + 1
        allowed = [w for w in waiting
                   if not self.per_agent_limit or busy.get(w.agent, 0) < self.per_agent_limit]
        if not allowed:
            return None
        top = max(w.priority for w in allowed)
        first_of_agent: dict[str, JobRecord] = {}
        for w in sorted((w for w in allowed if w.priority == top), key=lambda w: w.seq):
            first_of_agent.setdefault(w.agent, w)
        return min(first_of_agent.values(), key=lambda w: (self.last_served.get(w.agent, -1), w.seq))

    def started(self, record: JobRecord) -> None:
        self._tick += 1
        self.last_served[record.agent] = self._tick

    def victim(self, candidate: JobRecord, running: list[JobRecord]) -> JobRecord | None:
        """The running job that yields its slot to `candidate` (None: nobody; a free slot or no lower priority)."""
        if len(running) < self.slots:
            return None
        lower = [r for r in running if r.priority < candidate.priority]
        if not lower:
            return None
        return self.victim_among(lower)

    @staticmethod
    def victim_among(running: list[JobRecord]) -> JobRecord:
        """The lowest priority; among equals the most recently started (the least work in flight)."""
        return min(running, key=lambda r: (r.priority, -(r.running_since or 0.0), -r.seq))

    def position(self, record: JobRecord, waiting: list[JobRecord]) -> int:
        """0-based place in the waiting line: jobs of a higher class, and earlier ones of its class."""
        return sum(1 for w in waiting if w.id != record.id and
                   (w.priority > record.priority or (w.priority == record.priority and w.seq < record.seq)))
