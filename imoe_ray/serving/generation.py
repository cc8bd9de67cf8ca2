"""Batched decoding over the adapter bank: many requests, each with its own expert or mix of experts.

A request for one expert is one row of the batch; a request mixing k experts (the c-BTM token-level
ensemble) is k rows that share the prompt and every sampled token, and whose next-token
distributions are mixed with the router's weights before sampling. Rows of different experts go
through the same forward pass (the bank applies each row's adapter), prompts are left-padded, and a
request leaves the batch (and the KV cache) as soon as it is finished.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from imoe_ray.experts.mixture import mix_logprobs
from imoe_ray.serving.lora_bank import AdapterBank


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    experts: dict[str, float]                 # adapter name ("base": none) → mixture weight
    max_new_tokens: int = 64
    temperature: float = 0.0                  # 0: greedy
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("the prompt is empty")
        if not self.experts or any(w < 0 for w in self.experts.values()) or sum(self.experts.values()) <= 0:
            raise ValueError(f"need at least one expert with a positive weight, got {self.experts}")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")


@dataclass
class Generated:
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None          # "stop" (a stop token) or "length"


def _pick(logprobs: torch.Tensor, request: GenerationRequest, rng: torch.Generator | None) -> int:
    if request.temperature <= 0:
        return int(logprobs.argmax())
    probs = torch.softmax(logprobs / request.temperature, dim=-1)
    if request.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < request.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=rng))


Step = tuple[int, "str | None"]  # (token, finish reason): "stop" (the token is the stop token, not text) or "length"


@torch.inference_mode()
def decode_steps(model, bank: AdapterBank, requests: list[GenerationRequest], pad_id: int = 0,
                 ) -> Iterator[list[Step | None]]:
    """Decode every request together; yields, after each step, each request's (token, finish reason),
    or None for a request that finished earlier. The caller may stop iterating at any time."""
    from transformers import DynamicCache

    rows = [(i, name) for i, r in enumerate(requests) for name in r.experts]
    owner = torch.tensor([i for i, _ in rows])
    width = max(len(r.prompt_ids) for r in requests)
    device = bank.device
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (i, _) in enumerate(rows):
        prompt = requests[i].prompt_ids
        ids[row, width - len(prompt):] = torch.as_tensor(prompt)
        mask[row, width - len(prompt):] = 1
    ids, mask = ids.to(device), mask.to(device)
    names = [name for _, name in rows]
    weights = {i: list(r.experts.values()) for i, r in enumerate(requests)}
    rngs = {i: torch.Generator().manual_seed(r.seed) if r.seed is not None else None for i, r in enumerate(requests)}
    produced = [0] * len(requests)
    cache = DynamicCache()
    step_input, positions = ids, (mask.cumsum(-1) - 1).clamp(min=0)
    while True:
        with bank.use(names):
            logits = model(input_ids=step_input, attention_mask=mask, position_ids=positions,
                           past_key_values=cache, use_cache=True).logits[:, -1].float()
        logprobs = torch.log_softmax(logits, dim=-1).cpu()
        step: list[Step | None] = [None] * len(requests)
        for i in dict.fromkeys(owner.tolist()):
            mine = (owner == i).nonzero()[:, 0]
            mixed = logprobs[mine[0]] if len(mine) == 1 else mix_logprobs([logprobs[m] for m in mine], weights[i])
            token = _pick(mixed, requests[i], rngs[i])
            produced[i] += 1
            r = requests[i]
            finish = "stop" if token in r.stop_ids else "length" if produced[i] >= r.max_new_tokens else None
            step[i] = (token, finish)
        yield step
        keep = torch.tensor([step[i][1] is None for i in owner.tolist()], dtype=torch.bool)
        if not keep.any():
            return
        if not keep.all():
            index = keep.nonzero()[:, 0]
            cache.batch_select_indices(index.to(device))
            owner, mask, positions = owner[index], mask[index.to(device)], positions[index.to(device)]
            names = [names[int(k)] for k in index]
        step_input = torch.tensor([[step[i][0]] for i in owner.tolist()], dtype=torch.long, device=device)
        mask = torch.cat([mask, mask.new_ones((len(owner), 1))], dim=1)
        positions = positions[:, -1:] + 1


def collect(steps: Iterator[list[Step | None]], n: int, budget_s: float | None = None) -> tuple[list[Generated], bool]:
    """Advance decoding until it ends (or for about `budget_s`): the text tokens and finish reason
    each request produced meanwhile, and whether decoding ended."""
    out = [Generated() for _ in range(n)]
    deadline = None if budget_s is None else time.perf_counter() + budget_s
    for step in steps:
        for i, item in enumerate(step):
            if item is None:
                continue
            token, finish = item
            if finish != "stop":
                out[i].token_ids.append(token)
            out[i].finish_reason = finish
        if deadline is not None and time.perf_counter() >= deadline:
            return out, False
    return out, True


def generate(model, bank: AdapterBank, requests: list[GenerationRequest], pad_id: int = 0) -> list[Generated]:
    """Decode every request to completion, in one batch."""
    return collect(decode_steps(model, bank, requests, pad_id), len(requests))[0]
