"""Batched decoding over the adapter bank: many requests, each with its own expert or mix of experts.

A request for one expert is one row of the batch; a request mixing k experts (the c-BTM token-level
ensemble) is k rows that share the prompt and every sampled token, and whose next-token
distributions are mixed with the router's weights before sampling. Rows of different experts go
through the same forward pass (the bank applies each row's adapter), prompts are left-padded, and a
request leaves the batch (and the KV cache) as soon as it is finished.

A replica with fewer resident adapters allowed than a batch uses (`serve.max_loaded_experts: 1`, the
strict one-expert-at-a-time mode) runs each step in several forward passes, each over the rows of at
most `capacity` adapters with only those resident (`ensure` loads them, evicting the others): a
mixture of three experts then decodes with one adapter resident at a time, as the
one-expert-at-a-time designs do, and gets the same tokens.

Decoding ends at a stop token (`stop_ids`: every EOS id of the model's generation config), at a stop
string (`stop`, checked on the decoded text after every token, so nothing past it is computed) or
at `max_new_tokens`.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

import torch

from imoe_ray.experts.mixture import mix_logprobs
from imoe_ray.serving.lora_bank import BASE, AdapterBank

if TYPE_CHECKING:
    from transformers import DynamicCache


# below MIN_TEMPERATURE, logprobs / temperature overflows to inf and the probabilities to NaN
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 2.0
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1   # what torch.Generator.manual_seed takes


class Steer(Protocol):
    """A per-request decoding constraint (e.g. `imoe_ray.fusion.constrained.CopySteer`): `adjust` maps
    each step's log-probabilities (after logit_bias), `advance` is told the token picked."""
    def adjust(self, logprobs: torch.Tensor) -> torch.Tensor: ...
    def advance(self, token: int) -> None: ...


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    experts: dict[str, float]                 # adapter name ("base": none) → mixture weight
    max_new_tokens: int = 64
    temperature: float = 0.0                  # 0: greedy
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()
    seed: int | None = None
    stop: tuple[str, ...] = ()                # stop strings: decoding ends once the text contains one
    logit_bias: dict[int, float] | None = None  # token id → added to its logit (OpenAI's -100..100)
    logprobs: int | None = None               # report each token's log-probability and this many alternatives
    steer: Steer | None = None                # a decoding constraint of this request alone (its own state)

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("the prompt is empty")
        if not self.experts or any(w < 0 for w in self.experts.values()) or sum(self.experts.values()) <= 0:
            raise ValueError(f"need at least one expert with a positive weight, got {self.experts}")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE):
            raise ValueError(f"temperature must be 0 or within [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], "
                             f"got {self.temperature}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be a signed 64-bit integer, got {self.seed}")


@dataclass
class Generated:
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None          # "stop" (a stop token), "stop_string" (its last token is kept) or "length"
    logprobs: list[dict] = field(default_factory=list)  # per token, when asked: {"token", "logprob", "top": [[id, lp]]}
    error: str | None = None                  # finish_reason "error": why this request alone failed


def _biased(logprobs: torch.Tensor, bias: dict[int, float] | None) -> torch.Tensor:
    """OpenAI's logit_bias on a log-softmax (adding to a logit and renormalising is the same thing)."""
    if not bias:
        return logprobs
    out = logprobs.clone()
    ids = torch.tensor([i for i in bias if 0 <= i < out.shape[-1]], dtype=torch.long)
    if len(ids):
        out[ids] += torch.tensor([float(bias[int(i)]) for i in ids], dtype=out.dtype)
    return torch.log_softmax(out, dim=-1)


def _pick(logprobs: torch.Tensor, request: GenerationRequest, rng: torch.Generator | None) -> int:
    if request.temperature <= 0:
        return int(logprobs.argmax())
    probs = torch.softmax(logprobs / request.temperature, dim=-1)
    if request.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < request.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=rng))


# (token, finish reason): "stop" (the token is the stop token, not text), "stop_string" (the token completed
# a stop string; it is text), "length", "cancelled" (`leave`) or "error" (this request's own decoding
# failed, `DecodeBatch.errors` says why; the others go on)
Step = tuple[int, "str | None"]
# what `decode_steps` yields for a request: its step and the log-probabilities it asked for (or None),
# or, when the finish reason is "error", the exception
Emitted = tuple[int, "str | None", "dict | Exception | None"]


class DecodeBatch:
    """A batch being decoded that requests join and leave between steps (continuous batching).

    Every step runs one forward pass over the rows already decoding (one new token each) and, when
    requests joined since the last step, one prefill pass over their prompts; the newcomers' KV cache
    is then left-padded to the batch's width and appended, so from the next step on they decode in
    the same forward passes. Rows are kept grouped by adapter (one slice each, see `lora_bank`), a
    request leaves (and its cache rows with it) as soon as it is finished, and cache columns no row
    attends to any more are dropped. Each row carries its own positions, so padding changes nothing
    in what a request computes."""

    def __init__(self, model, bank: AdapterBank, pad_id: int = 0, decode: Callable[[list[int]], str] | None = None,
                 capacity: int | None = None, ensure: Callable[[str], object] | None = None):
        self.model, self.bank, self.pad_id = model, bank, pad_id
        self.decode = decode                  # token ids → text, for stop strings
        self.capacity, self.ensure = capacity, ensure
        self._text: dict[int, list[int]] = {}  # tokens so far of the requests with stop strings
        self.token_logprobs: dict[int, dict] = {}  # the last step's, for requests that asked
        self.errors: dict[int, Exception] = {}     # the last step's, for requests whose own decoding failed
        self.requests: dict[int, GenerationRequest] = {}   # request key → request, decoding or joining
        self._joining: list[int] = []
        self._leaving: set[int] = set()
        self._rngs: dict[int, torch.Generator | None] = {}
        self._produced: dict[int, int] = {}
        self._next_key = 0
        self.rows: list[tuple[int, str]] = []             # (request key, adapter) per row of the cache
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None       # (rows, width)
        self._positions: torch.Tensor | None = None  # (rows, 1)
        self._next: torch.Tensor | None = None       # (rows, 1)
        # only the last position's logits: a prompt's other positions would cost a vocabulary-wide projection each
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    def join(self, request: GenerationRequest) -> int:
        """Add a request; it is prefilled with the next step. Returns its key in `step`'s results."""
        if request.stop and self.decode is None:
            raise ValueError("stop strings need a batch that can decode text (DecodeBatch(decode=...))")
        rng = torch.Generator().manual_seed(request.seed) if request.seed is not None else None
        key, self._next_key = self._next_key, self._next_key + 1  # nothing changes before this point
        self.requests[key] = request
        self._joining.append(key)
        self._rngs[key] = rng
        self._produced[key] = 0
        if request.stop:
            self._text[key] = []
        return key

    def leave(self, key: int) -> None:
        """Stop decoding a request (its client went away); it leaves with the next step."""
        if key in self._joining:
            self._joining.remove(key)
            del self.requests[key], self._rngs[key], self._produced[key]
            self._text.pop(key, None)
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
            logprobs.append(self._decode_pass())
        if self._joining:
            logprobs.append(self._prefill())
        if not logprobs:
            return {}
        logprobs = torch.cat(logprobs) if len(logprobs) > 1 else logprobs[0]
        out: dict[int, Step] = {}
        self.token_logprobs, self.errors = {}, {}
        for key, rows in self._rows_by_request().items():
            r = self.requests[key]
            try:
                mixed = logprobs[rows[0]] if len(rows) == 1 else mix_logprobs([logprobs[i] for i in rows], list(r.experts.values()))
                mixed = _biased(mixed, r.logit_bias)
                if r.steer is not None:
                    mixed = r.steer.adjust(mixed)
                token = _pick(mixed, r, self._rngs[key])
                if r.steer is not None:
                    r.steer.advance(token)
            except Exception as e:  # this request's own numbers: it fails alone, the others go on
                self.errors[key] = e
                out[key] = (self.pad_id, "error")
                continue
            if r.logprobs is not None:
                top = mixed.topk(r.logprobs) if r.logprobs else None
                self.token_logprobs[key] = {"token": token, "logprob": float(mixed[token]),
                                            "top": [] if top is None else [[int(i), float(v)] for v, i in zip(*top)]}
            self._produced[key] += 1
            finish = "stop" if token in r.stop_ids else None
            if finish is None and key in self._text:
                self._text[key].append(token)
                assert self.decode is not None  # `join` keeps the text only of requests it can decode
                if any(s in self.decode(self._text[key]) for s in r.stop):
                    finish = "stop_string"
            if finish is None and self._produced[key] >= r.max_new_tokens:
                finish = "length"
            out[key] = (token, finish)
        for key in self._leaving:
            out[key] = (out[key][0], "cancelled")
        self._leaving.clear()
        self._advance(out)
        return out

    def _passes(self, names: list[str]) -> list[tuple[int, int]]:
        """The forward passes over rows grouped by adapter: (first row, row after the last), each with
        at most `capacity` adapters (one pass when the capacity allows them all)."""
        passes: list[tuple[int, int]] = []
        adapters: set[str] = set()
        for i, name in enumerate(names):
            fresh = name != BASE and name not in adapters
            if passes and not (fresh and self.capacity is not None and len(adapters) >= self.capacity):
                passes[-1] = (passes[-1][0], i + 1)
            else:
                passes.append((i, i + 1))
                adapters = set()
            if name != BASE:
                adapters.add(name)
        return passes

    def _forward(self, names: list[str], **inputs) -> torch.Tensor:
        """The last position's logits of rows run with adapters `names`, in as few passes as the
        capacity allows; the rows' KV cache (`past_key_values`) is updated in place."""
        passes = self._passes(names)
        if len(passes) == 1:
            if self.ensure is not None and any(n != BASE and n not in self.bank.resident for n in names):
                for name in dict.fromkeys(names):
                    self.ensure(name)
            with self.bank.use(names):
                return self.model(**inputs, use_cache=True, **self._last_only).logits[:, -1]
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache, logits, parts = inputs.pop("past_key_values"), {}, {}
        # passes whose adapters are resident first: the last pass of a step is the first of the next,
        # so a mixture of k experts loads k - 1 of them per step, not k
        resident = lambda span: all(n == BASE or n in self.bank.resident for n in names[span[0]:span[1]])  # noqa: E731
        for start, stop in sorted(passes, key=lambda span: not resident(span)):
            part = DynamicCache()  # the pass's rows of the batch's cache, as views: nothing copied before the pass
            for layer in cache.layers if cache.get_seq_length() else ():
                view = DynamicLayer()
                view.lazy_initialization(layer.keys, layer.values)
                view.keys, view.values = layer.keys[start:stop], layer.values[start:stop]
                part.layers.append(view)
            if self.ensure is not None:
                for name in dict.fromkeys(names[start:stop]):
                    self.ensure(name)
            with self.bank.use(names[start:stop]):
                logits[start] = self.model(**{k: v[start:stop] for k, v in inputs.items()}, past_key_values=part,
                                           use_cache=True, **self._last_only).logits[:, -1]
            parts[start] = part
        in_order = [parts[start] for start, _ in passes]  # back in row order
        while len(cache.layers) < len(in_order[0].layers):  # a fresh cache (prefill) gets its layers
            cache.layers.append(type(in_order[0].layers[0])())
        for i, layer in enumerate(cache.layers):
            keys = torch.cat([p.layers[i].keys for p in in_order])
            values = torch.cat([p.layers[i].values for p in in_order])
            if not layer.is_initialized:
                layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
        return torch.cat([logits[start] for start, _ in passes])

    def _decode_pass(self) -> torch.Tensor:
        logits = self._forward([name for _, name in self.rows], input_ids=self._next, attention_mask=self._mask,
                               position_ids=self._positions, past_key_values=self._cache)
        return torch.log_softmax(logits.float(), dim=-1).cpu()

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
        logits = self._forward([name for _, name in rows], input_ids=ids, attention_mask=mask, position_ids=positions,
                               past_key_values=cache)
        self._append(rows, cache, mask, positions[:, -1:])
        return torch.log_softmax(logits.float(), dim=-1).cpu()

    def _append(self, rows: list[tuple[int, str]], cache, mask: torch.Tensor, positions: torch.Tensor) -> None:
        if not self.rows:
            self.rows, self._cache, self._mask, self._positions = rows, cache, mask, positions
            return
        assert self._cache is not None and self._mask is not None and self._positions is not None  # rows are decoding
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
                self._text.pop(key, None)
        order = sorted((i for i, (key, _) in enumerate(self.rows) if out[key][1] is None), key=lambda i: self.rows[i][1])
        if not order:
            self.rows, self._cache, self._mask, self._positions, self._next = [], None, None, None, None
            return
        assert self._cache is not None and self._mask is not None and self._positions is not None  # rows are decoding
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
                 batch: DecodeBatch | None = None) -> Iterator[list[Emitted | None]]:
    """Decode every request together; yields, after each step, each request's (token, finish reason,
    log-probabilities or None — or, when the finish reason is "error", the exception), or None for a
    request that finished earlier. The caller may stop iterating at any time."""
    batch = batch if batch is not None else DecodeBatch(model, bank, pad_id)
    keys = [batch.join(r) for r in requests]
    while batch.requests:
        out = batch.step()
        yield [(*out[k], batch.errors.get(k) if out[k][1] == "error" else batch.token_logprobs.get(k))
               if k in out else None for k in keys]


def collect(steps: Iterator[list[Emitted | None]], n: int, budget_s: float | None = None) -> tuple[list[Generated], bool]:
    """Advance decoding until it ends (or for about `budget_s`): the text tokens and finish reason
    each request produced meanwhile, and whether decoding ended."""
    out = [Generated() for _ in range(n)]
    deadline = None if budget_s is None else time.perf_counter() + budget_s
    for step in steps:
        for i, item in enumerate(step):
            if item is None:
                continue
            token, finish, logprobs = item
            if finish == "error":
                out[i].finish_reason, out[i].error = finish, str(logprobs)
                continue
            if finish != "stop":
                out[i].token_ids.append(token)
                if isinstance(logprobs, dict):  # not "error": the log-probabilities, or None
                    out[i].logprobs.append(logprobs)
            out[i].finish_reason = finish
        if deadline is not None and time.perf_counter() >= deadline:
            return out, False
    return out, True


def generate(model, bank: AdapterBank, requests: list[GenerationRequest], pad_id: int = 0) -> list[Generated]:
    """Decode every request to completion, in one batch."""
    return collect(decode_steps(model, bank, requests, pad_id), len(requests))[0]
