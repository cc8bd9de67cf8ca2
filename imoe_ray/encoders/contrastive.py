"""Training pairs mined without labels, and the contrastive losses over a batch of pair embeddings.

Pairs: a chunk and a query-like view of it (a prefix, a sentence, key terms: the router's views,
which is what a retrieval query looks like), and a chunk and the next chunk of its document. Each
pair carries a group (its document id): in-batch items of the same document are not used as negatives;
and a topic (its chunk's discovered category, -1 unknown): batches drawn from one topic make the
in-batch negatives hard at no extra cost (topic-aware sampling, as in TAS-B).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Pairs:
    anchors: list[str] = field(default_factory=list)
    positives: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    topics: list[int] = field(default_factory=list)

    def add(self, anchor: str, positive: str, group: str, kind: str, topic: int = -1) -> None:
        if anchor and positive:
            self.anchors.append(anchor)
            self.positives.append(positive)
            self.groups.append(group)
            self.kinds.append(kind)
            self.topics.append(int(topic))

    def __len__(self) -> int:
        return len(self.anchors)


def neighbour_pairs(ids: list[str], chunk_index: list[int], texts: list[str], pairs: Pairs,
                    topics: list[int] | None = None) -> Pairs:
    """(chunk i, chunk i+1) of every document, in chunk order (topic: chunk i's)."""
    by_doc: dict[str, list[tuple[int, str, int]]] = {}
    for n, (i, c, t) in enumerate(zip(ids, chunk_index, texts)):
        by_doc.setdefault(str(i), []).append((int(c), t, -1 if topics is None else topics[n]))
    for doc, chunks in by_doc.items():
        chunks.sort(key=lambda chunk: chunk[0])
        for (_, a, topic), (_, b, _) in zip(chunks, chunks[1:]):
            pairs.add(a, b, doc, "neighbours", topic)
    return pairs


def view_pairs(ids: list[str], texts: list[str], tokenizer, rng: np.random.Generator,
               prefix_tokens: tuple[int, int], key_terms: tuple[int, int], pairs: Pairs,
               topics: list[int] | None = None) -> Pairs:
    """(query-like view, its chunk) for every view `routing.views.chunk_views` makes."""
    from imoe_ray.routing.views import chunk_views

    views = chunk_views(texts, np.arange(len(texts)), tokenizer, rng, prefix_tokens, key_terms)
    for text, label, kind in zip(views.texts, views.labels, views.kinds):
        row = int(label)
        pairs.add(text, texts[row], str(ids[row]), kind, -1 if topics is None else topics[row])
    return pairs


def batch_mode(configured: str, topics: list[int]) -> str:
    """The batches training draws: the configured kind, or random when fewer than two topics are known."""
    return configured if len(set(topics) - {-1}) > 1 else "random"


def batch_order(topics: list[int], batch: int, steps: int, mode: str, rng: np.random.Generator) -> list[np.ndarray]:
    """`steps` batches of pair indices, epoch after epoch. "topic": each batch comes from one topic while
    that topic has a full batch left, the remainders mixed into batches of their own; "random": any
    pairs; "mixed": topic and random batches taking turns (hard negatives without losing the easy ones)."""
    if mode == "mixed":
        by_topic = batch_order(topics, batch, (steps + 1) // 2, "topic", rng)
        anywhere = batch_order(topics, batch, steps // 2, "random", rng)
        return [b for pair in zip(by_topic, anywhere + [None]) for b in pair if b is not None]
    keys = np.asarray(topics) if mode == "topic" and len(topics) else np.zeros(len(topics), np.int64)
    batch = max(1, min(batch, len(keys)))
    out: list[np.ndarray] = []
    while len(out) < steps:
        epoch, rest = [], []
        for key in np.unique(keys):
            idx = rng.permutation(np.flatnonzero(keys == key))
            full = len(idx) // batch * batch
            epoch += [idx[i:i + batch] for i in range(0, full, batch)]
            rest.append(idx[full:])
        mixed = rng.permutation(np.concatenate(rest))
        epoch += [mixed[i:i + batch] for i in range(0, len(mixed), batch)]
        out += [epoch[i] for i in rng.permutation(len(epoch))]
    return out[:steps]


def _same_group(groups: torch.Tensor) -> torch.Tensor:
    """(b, b) True where two different pairs share a group: neither positive nor a fair negative."""
    same = groups.unsqueeze(0) == groups.unsqueeze(1)
    return same & ~torch.eye(len(groups), dtype=torch.bool, device=groups.device)


def info_nce(a: torch.Tensor, b: torch.Tensor, groups: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """Multiple-negatives ranking loss: each anchor against every positive of the batch (normalised inputs)."""
    logits = (a @ b.t()) / temperature
    logits = logits.masked_fill(_same_group(groups), float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(a), device=a.device))


def triplet(a: torch.Tensor, b: torch.Tensor, groups: torch.Tensor, margin: float = 0.3) -> torch.Tensor:
    """max(0, margin - cos(a, p) + cos(a, n)) with n the hardest in-batch negative."""
    sims = a @ b.t()
    excluded = _same_group(groups) | torch.eye(len(a), dtype=torch.bool, device=a.device)
    hardest = sims.masked_fill(excluded, float("-inf")).max(dim=1).values
    hardest = torch.where(torch.isinf(hardest), torch.full_like(hardest, -1.0), hardest)
    return F.relu(margin - sims.diagonal() + hardest).mean()


def contrastive(a: torch.Tensor, b: torch.Tensor, groups: torch.Tensor, margin: float = 0.3) -> torch.Tensor:
    """Pull positives to cosine 1, push in-batch negatives below cosine `margin` (squared hinge)."""
    sims = a @ b.t()
    negatives = ~(_same_group(groups) | torch.eye(len(a), dtype=torch.bool, device=a.device))
    positive = (1 - sims.diagonal()).pow(2).mean()
    negative = F.relu(sims[negatives] - margin).pow(2).mean() if negatives.any() else sims.sum() * 0
    return positive + negative


LOSSES = {"infonce": info_nce, "triplet": triplet, "contrastive": contrastive}


def pair_loss(name: str, a: torch.Tensor, b: torch.Tensor, groups: torch.Tensor, temperature: float,
              margin: float) -> torch.Tensor:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; one of {', '.join(LOSSES)}")
    return info_nce(a, b, groups, temperature) if name == "infonce" else LOSSES[name](a, b, groups, margin)
