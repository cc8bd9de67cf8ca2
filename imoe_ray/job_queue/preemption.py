"""A job runs as a sequence of generation steps of a few tokens; between two steps it may be paused
(its generated token ids are in its record) and resumed later, possibly on another replica or after
a restart, by decoding on from prompt ids + generated ids. Under greedy decoding the next token
depends only on that sequence, so a job paused and resumed any number of times produces the same
tokens as one run straight through (tests/test_job_queue.py checks exactly that).

A whole-model expert (`imoe experts add-model`) decodes a job alone: its vocabulary is its own, so
it cannot join the adapters' token-level mixture. Its job's prompt and generated ids are in that
vocabulary, and each step continues them on the expert replicas' whole-model pool."""

from __future__ import annotations

from collections.abc import Container

from imoe_ray.job_queue.records import JobRecord
from imoe_ray.serving.generation import GenerationRequest
from imoe_ray.serving.model_experts import ModelRequest


def step_request(record: JobRecord, step_tokens: int) -> GenerationRequest | ModelRequest:
    """The next step of a job: continue from everything it has so far."""
    # a fresh draw per step, kept within the signed 64 bits a generator takes
    seed = None if record.seed is None else (record.seed + len(record.generated) + 2**63) % 2**64 - 2**63
    size = max(1, min(step_tokens, record.remaining))
    if record.model is not None:
        return ModelRequest(record.model, size, prompt_ids=tuple(record.prompt_ids + record.generated),
                            temperature=record.temperature, top_p=record.top_p, seed=seed)
    return GenerationRequest(prompt_ids=record.prompt_ids + record.generated, experts=dict(record.experts),
                             max_new_tokens=size, temperature=record.temperature, top_p=record.top_p,
                             stop_ids=tuple(record.stop_ids), seed=seed)


def decoded_by(experts: dict[str, float], whole_models: Container[str]) -> tuple[str | None, dict[str, float]]:
    """Who decodes a job routed or sent to `experts`: (a whole-model expert, {it: 1.0}) when the most
    probable one is a whole model; else (None, the adapters' mixture without the whole models,
    weights renormalised)."""
    top = max(experts, key=lambda e: experts[e])
    if top in whole_models:
        return top, {top: 1.0}
    adapters = {e: w for e, w in experts.items() if e not in whole_models}
    total = sum(adapters.values()) or 1.0
    return None, {e: w / total for e, w in adapters.items()}


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
