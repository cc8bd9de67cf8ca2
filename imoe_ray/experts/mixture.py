"""The base model with every expert's adapter loaded, and the c-BTM mixture of experts.

`ExpertLM` is what evaluation and serving call: one base model, adapters switched by name
(`"base"` disables them), per-token log-probabilities of a text, and the next-token distribution
of a weighted mixture of experts,

    log p(x_t | x_<t) = logsumexp_j( log w_j + log p_j(x_t | x_<t) ),

with w the router's probabilities of the top-k experts, renormalised (Gururangan et al., c-BTM).
For a known target token only its own log-probability is needed, so perplexity of the mixture
costs one forward pass per expert, not a full-vocabulary mix.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BASE = "base"


def mix_logprobs(logprobs: list[torch.Tensor] | list[np.ndarray], weights: list[float]):
    """Mix aligned log-probabilities (any shape, same for all) with the given weights."""
    w = np.asarray(weights, dtype=np.float64)
    if len(logprobs) != len(w) or not len(w) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"need one non-negative weight per expert, with a positive sum; got {weights}")
    w = w / w.sum()
    if isinstance(logprobs[0], torch.Tensor):
        stacked = torch.stack(logprobs) + torch.log(torch.as_tensor(w, dtype=logprobs[0].dtype)).view(-1, *[1] * logprobs[0].dim())
        return torch.logsumexp(stacked, dim=0)
    stacked = np.stack(logprobs).astype(np.float64) + np.log(w).reshape(-1, *[1] * np.ndim(logprobs[0]))
    peak = stacked.max(axis=0)
    return peak + np.log(np.exp(stacked - peak).sum(axis=0))


def top_k_weights(probabilities: dict[str, float], expert_of: dict[str, str], k: int) -> dict[str, float]:
    """The router's k most probable categories, mapped to their experts (folded categories add up),
    renormalised to sum to one."""
    ranked = sorted(probabilities.items(), key=lambda kv: -kv[1])[:k]
    weights: dict[str, float] = {}
    for category, p in ranked:
        expert = expert_of.get(category, category)
        weights[expert] = weights.get(expert, 0.0) + max(p, 1e-6)
    total = sum(weights.values())
    return {e: w / total for e, w in weights.items()}


def expert_prior(probabilities: dict[str, float], expert_of: dict[str, str]) -> dict[str, float]:
    """The router's category probabilities summed per serving expert."""
    prior: dict[str, float] = {}
    for category, p in probabilities.items():
        expert = expert_of.get(category, category)
        prior[expert] = prior.get(expert, 0.0) + p
    return prior


def posterior_weights(prior: dict[str, float], context_logprob: dict[str, float], k: int,
                      floor: float = 1e-3) -> dict[str, float]:
    """Bayes' rule over the experts given the context the router saw (as in Branch-Train-Merge):
    w_j ∝ P_router(j) · p_j(context); the k largest, renormalised."""
    log_post = {e: math.log(max(prior.get(e, 0.0), floor)) + lp for e, lp in context_logprob.items()}
    top = sorted(log_post, key=log_post.__getitem__, reverse=True)[:k]
    peak = log_post[top[0]]
    w = {e: math.exp(log_post[e] - peak) for e in top}
    total = sum(w.values())
    return {e: v / total for e, v in w.items()}


@dataclass
class Window:
    text: int            # which text
    ids: list[int]       # the window's tokens
    score_from: int      # positions >= this are scored (each predicted from everything before it)


def windows(token_ids: list[list[int]], first: int, max_len: int) -> list[Window]:
    """Score tokens [first, n) of every text with windows of at most `max_len` tokens; a long text
    is scored in strides of half a window, each token once, always with at least half a window of context."""
    out = []
    stride = max(1, max_len // 2)
    for i, ids in enumerate(token_ids):
        pos = first
        while pos < len(ids):
            end = min(len(ids), pos + (max_len - first if pos == first else stride))
            start = max(0, end - max_len)
            out.append(Window(i, ids[start:end], pos - start))
            pos = end
    return out


class ExpertLM:
    """The store's base model with adapters attached by name (PEFT multi-adapter)."""

    def __init__(self, base_dir: str | Path, adapters: dict[str, str | Path], device: str | None = None,
                 threads: int | None = None):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        self.max_len = int(getattr(model.config, "max_position_embeddings", 0) or 1024)
        self.names = list(adapters)
        if adapters:
            first, *rest = self.names
            model = PeftModel.from_pretrained(model, str(adapters[first]), adapter_name=first)
            for name in rest:
                model.load_adapter(str(adapters[name]), adapter_name=name)
        self.model = model.to(self.device).eval()

    @classmethod
    def from_store(cls, store_dir: str | Path, names: list[str] | None = None, dense: bool = True, **kw) -> "ExpertLM":
        root = Path(store_dir)
        index = json.loads((root / "experts" / "index.json").read_text())
        # whole-model experts (`imoe experts add-model`) are not adapters of this base: not in the mixture
        names = names if names is not None else [e["name"] for e in index["experts"] if e.get("kind") != "model"]
        adapters: dict[str, str | Path] = {n: root / "experts" / n for n in names}
        if dense and (root / "baselines" / "dense" / "adapter_config.json").exists():
            adapters["dense"] = root / "baselines" / "dense"
        return cls(root / "base", adapters, **kw)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids, each text after an EOS, the separator the models were trained with."""
        eos = self.tokenizer.eos_token_id
        return [[eos] + ids for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _context(self, name: str):
        if name == BASE:
            return self.model.disable_adapter() if self.names else nullcontext()
        if name not in self.names:
            raise KeyError(f"no adapter named {name!r} (loaded: {', '.join(self.names) or 'none'})")
        self.model.set_adapter(name)
        return nullcontext()

    @torch.inference_mode()
    def target_logprobs(self, name: str, wins: list[Window], batch_size: int = 16) -> list[np.ndarray]:
        """For each window, log p(token) of its scored tokens under model `name`."""
        out: list[np.ndarray] = [np.empty(0)] * len(wins)
        order = sorted(range(len(wins)), key=lambda i: -len(wins[i].ids))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        with self._context(name):
            for b in range(0, len(order), batch_size):
                batch = [wins[i] for i in order[b: b + batch_size]]
                width = max(len(w.ids) for w in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for r, w in enumerate(batch):
                    ids[r, : len(w.ids)] = torch.as_tensor(w.ids)
                    mask[r, : len(w.ids)] = 1
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits.float()
                logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(self.device))[..., 0]
                for r, w in enumerate(batch):
                    out[order[b + r]] = logp[r, w.score_from - 1: len(w.ids) - 1].cpu().numpy()
        return out

    @torch.inference_mode()
    def next_token_logprobs(self, input_ids: torch.Tensor, weights: dict[str, float]) -> torch.Tensor:
        """The mixture's next-token log-distribution after `input_ids` (1, T): the c-BTM ensemble."""
        parts = []
        for name in weights:
            with self._context(name):
                logits = self.model(input_ids=input_ids.to(self.device)).logits[:, -1].float()
            parts.append(torch.log_softmax(logits, dim=-1))
        return mix_logprobs(parts, list(weights.values()))

