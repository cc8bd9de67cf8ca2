"""Batched decoding over the adapter bank: many requests, each with its own expert or mix of experts.

A request for one expert is one row of the batch; a request mixing k experts (the c-BTM token-level
ensemble) is k rows that share the prompt and every sampled token, and whose next-token
distributions are mixed with the router's weights before sampling. Rows of different experts go
through the same forward pass (the bank applies each row's adapter), prompts are left-padded, and a
request leaves the batch (and the KV cache) as soon as it is finished.
"""

from __future__ import annotations

import inspect
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


# (token, finish reason): "stop" (the token is the stop token, not text), "length", or "cancelled" (`leave`)
Step = tuple[int, "str | None"]


class DecodeBatch:
    """A batch being decoded that requests join and leave between steps (continuous batching).

    Every step runs one forward pass over the rows already decoding (one new token each) and, when
    requests joined since the last step, one prefill pass over their prompts; the newcomers' KV cache
    is then left-padded to the batch's width and appended, so from the next step on they decode in
    the same forward passes. Rows are kept grouped by adapter (one slice each, see `lora_bank`), a
    request leaves (and its cache rows with it) as soon as it is finished, and cache columns no row
    attends to any more are dropped. Each row carries its own positions, so padding changes nothing
    in what a request computes."""

    def __init__(self, model, bank: AdapterBank, pad_id: int = 0):
        self.model, self.bank, self.pad_id = model, bank, pad_id
        self.requests: dict[int, GenerationRequest] = {}   # request key → request, decoding or joining
        self._joining: list[int] = []
        self._leaving: set[int] = set()
        self._rngs: dict[int, torch.Generator | None] = {}
        self._produced: dict[int, int] = {}
        self._next_key = 0
        self.rows: list[tuple[int, str]] = []             # (request key, adapter) per row of the cache
        self._cache = None
        self._mask = self._positions = self._next = None   # (rows, width), (rows, 1), (rows, 1)
        # only the last position's logits: a prompt's other positions would cost a vocabulary-wide projection each
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    def join(self, request: GenerationRequest) -> int:
        """Add a request; it is prefilled with the next step. Returns its key in `step`'s results."""
        key, self._next_key = self._next_key, self._next_key + 1
        self.requests[key] = request
        self._joining.append(key)
        self._rngs[key] = torch.Generator().manual_seed(request.seed) if request.seed is not None else None
        self._produced[key] = 0
        return key

    def leave(self, key: int) -> None:
        """Stop decoding a request (its client went away); it leaves with the next step."""
        if key in self._joining:
            self._joining.remove(key)
            del self.requests[key], self._rngs[key], self._produced[key]
        elif key in self.requests:
            self._leaving.add(key)

    def __len__(self) -> int:
        """Rows decoding or about to join (a mixture of k experts is k rows)."""
        return len(self.rows) + sum(len(self.requests[k].experts) for k in self._joining)

    def adapters(self) -> set[str]:
        """The adapters the batch's rows and joining requests use."""
        return {name for _, name in self.rows} | {n for k in self._joining for n in self.requests[k].experts}

    @torch.inference_mode()
    def step(self) -> dict[int, Step]:
        """One decoding step: every request's (token, finish reason), by key. Finished requests leave."""
        logprobs = []
        if self.rows:
            with self.bank.use([name for _, name in self.rows]):
                logits = self.model(input_ids=self._next, attention_mask=self._mask, position_ids=self._positions,
                                    past_key_values=self._cache, use_cache=True, **self._last_only).logits[:, -1]
            logprobs.append(torch.log_softmax(logits.float(), dim=-1).cpu())
        if self._joining:
            logprobs.append(self._prefill())
        if not logprobs:
            return {}
        logprobs = torch.cat(logprobs) if len(logprobs) > 1 else logprobs[0]
        out: dict[int, Step] = {}
        for key, rows in self._rows_by_request().items():
            r = self.requests[key]
            mixed = logprobs[rows[0]] if len(rows) == 1 else mix_logprobs([logprobs[i] for i in rows], list(r.experts.values()))
            token = _pick(mixed, r, self._rngs[key])
            self._produced[key] += 1
            out[key] = (token, "stop" if token in r.stop_ids else "length" if self._produced[key] >= r.max_new_tokens else None)
        for key in self._leaving:
            out[key] = (out[key][0], "cancelled")
        self._leaving.clear()
        self._advance(out)
        return out

    def _rows_by_request(self) -> dict[int, list[int]]:
        """Each request's rows, in the order of its `experts` (the order of the mixture weights)."""
        where: dict[int, dict[str, int]] = {}
        for i, (key, name) in enumerate(self.rows):
            where.setdefault(key, {})[name] = i
        return {key: [names[n] for n in self.requests[key].experts] for key, names in where.items()}

    def _prefill(self) -> torch.Tensor:
        """The joining requests' prompts in one forward pass; their cache joins the batch's."""
        from transformers import DynamicCache

        rows = sorted(((k, name) for k in self._joining for name in self.requests[k].experts), key=lambda row: row[1])
        self._joining = []
        width = max(len(self.requests[k].prompt_ids) for k, _ in rows)
        device = self.bank.device
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (k, _) in enumerate(rows):
            prompt = self.requests[k].prompt_ids
            ids[i, width - len(prompt):] = torch.as_tensor(prompt)
            mask[i, width - len(prompt):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        with self.bank.use([name for _, name in rows]):
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                past_key_values=cache, use_cache=True, **self._last_only).logits[:, -1]
        self._append(rows, cache, mask, positions[:, -1:])
        return torch.log_softmax(logits.float(), dim=-1).cpu()

    def _append(self, rows: list[tuple[int, str]], cache, mask: torch.Tensor, positions: torch.Tensor) -> None:
        if not self.rows:
            self.rows, self._cache, self._mask, self._positions = rows, cache, mask, positions
            return
        width = max(self._mask.shape[1], mask.shape[1])
        pad_old, pad_new = width - self._mask.shape[1], width - mask.shape[1]
        for old, new in zip(self._cache.layers, cache.layers):
            if type(old).__name__ != "DynamicLayer" or type(new).__name__ != "DynamicLayer":
                raise TypeError(f"requests cannot join a batch whose KV cache is a {type(old).__name__}")
            old.keys = torch.cat([_pad_left(old.keys, pad_old), _pad_left(new.keys, pad_new)])
            old.values = torch.cat([_pad_left(old.values, pad_old), _pad_left(new.values, pad_new)])
        self._mask = torch.cat([torch.nn.functional.pad(self._mask, (pad_old, 0)),
                                torch.nn.functional.pad(mask, (pad_new, 0))])
        self._positions = torch.cat([self._positions, positions])
        self.rows = self.rows + rows

    def _advance(self, out: dict[int, Step]) -> None:
        """Drop the finished requests' rows, regroup by adapter, feed each row its request's token."""
        for key, (_, finish) in out.items():
            if finish is not None:
                del self.requests[key], self._rngs[key], self._produced[key]
        order = sorted((i for i, (key, _) in enumerate(self.rows) if out[key][1] is None), key=lambda i: self.rows[i][1])
        if not order:
            self.rows, self._cache, self._mask, self._positions, self._next = [], None, None, None, None
            return
        device = self.bank.device
        if order != list(range(len(self.rows))):
            index = torch.tensor(order, device=device)
            self._cache.batch_select_indices(index)
            self._mask, self._positions = self._mask[index], self._positions[index]
            self.rows = [self.rows[i] for i in order]
        first = int(self._mask.any(0).nonzero()[0, 0])  # columns left of this are padding in every row
        if first > 0:
            self._mask = self._mask[:, first:]
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
        self._next = torch.tensor([[out[key][0]] for key, _ in self.rows], dtype=torch.long, device=device)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(self.rows), 1))], dim=1)
        self._positions = self._positions + 1


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    """Zeros in front of the sequence axis (-2) of a (batch, heads, seq, dim) cache tensor."""
    return torch.nn.functional.pad(t, (0, 0, n, 0)) if n else t


def decode_steps(model, bank: AdapterBank, requests: list[GenerationRequest], pad_id: int = 0,
                 ) -> Iterator[list[Step | None]]:
    """Decode every request together; yields, after each step, each request's (token, finish reason),
    or None for a request that finished earlier. The caller may stop iterating at any time."""
    batch = DecodeBatch(model, bank, pad_id)
    keys = [batch.join(r) for r in requests]
    while batch.requests:
        out = batch.step()
        yield [out.get(k) for k in keys]


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
