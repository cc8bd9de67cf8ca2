"""Selective-context compression: drop the words the base LM finds least informative.

Each word's information is the self-information (surprisal, -log p) of its tokens under the store's
own base LM, each text read left to right after the EOS the models were trained with. Words are
dropped in order of their mean surprisal per token (the most predictable first: the most tokens
saved for the least information lost) until the prompt fits `1/ratio` of its tokens (or the
budget); words carrying the question's key terms are never dropped (Selective Context, Li et al.
2023; LLMLingua, Jiang et al. 2023, with words as the lexical unit).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from imoe_ray.compression.units import WORD, Compressed, count_tokens, key_terms, protected


class SelectiveCompressor:
    def __init__(self, base_dir: str | Path, threads: int | None = None, window: int = 512, batch_size: int = 16,
                 model=None, tokenizer=None, guard=None, scorer=None):
        """The base LM is `model` when given (a serving replica's own, forward passes under `guard`,
        e.g. the adapter bank's base-only selection), else `scorer` (a function with `surprisal`'s
        contract, e.g. a call to the replica that holds the base), else loaded from `base_dir`."""
        import json

        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(base_dir)
        self.scorer, self.guard = scorer, guard
        self.model = model if model is not None or scorer is not None else \
            AutoModelForCausalLM.from_pretrained(base_dir).eval()
        context = getattr(self.model.config, "max_position_embeddings", window) if self.model is not None else \
            json.loads((Path(base_dir) / "config.json").read_text()).get("max_position_embeddings", window)
        self.window = min(window, int(context))
        self.batch_size = batch_size
        self.count = count_tokens(self.tokenizer)

    def surprisal(self, texts: list[str]) -> list[tuple[list[tuple[int, int]], np.ndarray]]:
        """Per text: its token offsets and each token's surprisal (nats), in windows of the LM's context."""
        if self.scorer is not None:
            return [([tuple(o) for o in offsets], np.asarray(values, np.float32))
                    for offsets, values in self.scorer(texts)]
        return self._surprisal(texts)

    @torch.inference_mode()
    def _surprisal(self, texts: list[str]) -> list[tuple[list[tuple[int, int]], np.ndarray]]:
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        eos = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        pieces = []  # (text index, start token, ids with the EOS in front)
        for i, ids in enumerate(enc["input_ids"]):
            for start in range(0, len(ids), self.window - 1):
                pieces.append((i, start, [eos] + ids[start:start + self.window - 1]))
        values = [np.zeros(len(ids), np.float32) for ids in enc["input_ids"]]
        pieces.sort(key=lambda p: len(p[2]))
        for b in range(0, len(pieces), self.batch_size):
            batch = pieces[b:b + self.batch_size]
            width = max(len(p[2]) for p in batch)
            ids = torch.full((len(batch), width), eos, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, (_, _, row) in enumerate(batch):
                ids[r, :len(row)] = torch.tensor(row)
                mask[r, :len(row)] = 1
            device = next(self.model.parameters()).device
            with self.guard(["base"] * len(batch)) if self.guard is not None else nullcontext():
                logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            logp = torch.log_softmax(logits[:, :-1].float().cpu(), -1)
            nll = -logp.gather(-1, ids[:, 1:, None])[..., 0].numpy()
            for r, (i, start, row) in enumerate(batch):
                values[i][start:start + len(row) - 1] = nll[r, :len(row) - 1]
        return [(offsets, v) for offsets, v in zip(enc["offset_mapping"], values)]

    def reduce(self, question: str, passages: list[str], ratio: float = 2.0,
               budget_tokens: int | None = None, keys: set[str] | None = None) -> Compressed:
        """The question and passages with their least informative words dropped, to about
        total_tokens / ratio tokens (or fewer, with a budget), key terms (the question's unless
        given) and the tokenizer's special tokens kept."""
        texts = [question, *passages]
        keys = key_terms(question) if keys is None else keys
        specials = [t for t in self.tokenizer.all_special_tokens if t]
        units = []  # (text index, word index, tokens, mean surprisal, kept for sure)
        words_of: list[list[str]] = []
        for t, (text, (offsets, values)) in enumerate(zip(texts, self.surprisal(texts))):
            spans = [(m.start(), m.end()) for m in WORD.finditer(text)]
            words_of.append([text[a:b] for a, b in spans])
            info = np.zeros(len(spans)), np.zeros(len(spans), int)
            ends = np.array([b for _, b in spans])
            for (a, b), v in zip(offsets, values):
                w = min(int(np.searchsorted(ends, b - 1, side="right")), len(spans) - 1) if spans else -1
                if w >= 0:
                    info[0][w] += v
                    info[1][w] += 1
            for w, word in enumerate(words_of[-1]):
                n = max(int(info[1][w]), 1)
                keep = protected(word, keys) or any(tok in word for tok in specials)
                units.append((t, w, n, info[0][w] / n, keep))
        total = sum(u[2] for u in units)
        target = math.ceil(total / max(ratio, 1.0))
        if budget_tokens:
            target = min(target, budget_tokens)
        dropped: set[tuple[int, int]] = set()
        kept_tokens = total
        for t, w, n, _, keep in sorted(units, key=lambda u: u[3]):
            if kept_tokens <= target:
                break
            if not keep:
                dropped.add((t, w))
                kept_tokens -= n
        out = [" ".join(word for w, word in enumerate(words) if (t, w) not in dropped) for t, words in enumerate(words_of)]
        return Compressed(out[0], out[1:], self.count(texts), self.count(out), sorted(keys))
