"""A job runs as a sequence of generation steps of a few tokens; between two steps it may be paused
(its generated token ids are in its record) and resumed later, possibly on another replica or after
a restart, by decoding on from prompt ids + generated ids. Under greedy decoding the next token
depends only on that sequence, so a job paused and resumed any number of times produces the same
tokens as one run straight through (tests/test_job_queue.py checks exactly that)."""

from __future__ import annotations

from imoe_ray.job_queue.records import JobRecord
from imoe_ray.serving.generation import GenerationRequest


def step_request(record: JobRecord, step_tokens: int) -> GenerationRequest:
    """The next step of a job: continue from everything it has so far."""
    # a fresh draw per step, kept within the signed 64 bits a generator takes
    seed = None if record.seed is None else (record.seed + len(record.generated) + 2**63) % 2**64 - 2**63
    return GenerationRequest(prompt_ids=record.prompt_ids + record.generated, experts=dict(record.experts),
                             max_new_tokens=max(1, min(step_tokens, record.remaining)),
                             temperature=record.temperature, top_p=record.top_p,
                             stop_ids=tuple(record.stop_ids), seed=seed)


def absorb(record: JobRecord, tokens: list[int], finish: str | None) -> bool:
    """Add a step's tokens to the job; True when the job is complete (a stop token or max_tokens)."""
    record.generated = record.generated + list(tokens)[: max(0, record.remaining)]
    if finish == "stop":
        record.finish_reason = "stop"
        return True
    if record.remaining <= 0:
        record.finish_reason = "length"
        return True
    return False
