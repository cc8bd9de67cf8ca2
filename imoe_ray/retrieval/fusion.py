"""Fusing the two rankings of hybrid search (vector and full-text) into one.

`score` (the default): each list's scores divided by that list's best score (cosine and BM25 then
both read "how close to this query's best hit"), summed with weights w and 1 - w. A passage
missing from a list that was cut at `depth` scores at most that list's last score, so it gets it;
missing from a shorter list (a full-text list that ran out of matches), it gets 0. `rrf`: reciprocal-rank fusion,
1 / (k + rank) per list, also weighted.

Equal weights let the weaker list pull the stronger one's good hits down, below the better list
alone (`imoe eval retrieval` compares the modes on a store). So the weight is calibrated
per store, at shard time, on query-like views of the router's *calibration* chunks (never the
test chunks that `imoe eval retrieval` reads): the weight with the best MRR@10 on a grid, saved in
`kb/fusion.json` with what it was tuned on. A configured `retrieval.vector_weight` overrides it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

FUSION_FILE = "fusion.json"
GRID = tuple(round(float(w), 2) for w in np.linspace(0.0, 1.0, 11))


@dataclass(frozen=True)
class Fusion:
    method: Literal["score", "rrf"] = "score"
    vector_weight: float = 0.5
    rrf_k: int = 60
    calibration: dict = field(default_factory=dict, compare=False)  # how the weight was chosen

    def to_json(self) -> dict:
        return asdict(self)


def fuse(by_vector: Sequence, by_text: Sequence, fusion: Fusion, depth: int | None = None) -> list:
    """One ranking of the passages of both lists (each passage once, with the fused score); `depth`:
    where each list was cut."""
    if fusion.method == "rrf":
        parts = [_rrf_scores(by_vector, fusion.rrf_k), _rrf_scores(by_text, fusion.rrf_k)]
    else:
        parts = [_max_normalised(by_vector), _max_normalised(by_text)]
    weights = (fusion.vector_weight, 1.0 - fusion.vector_weight)
    floors = [min(part.values()) if fusion.method == "score" and depth and len(part) >= depth else 0.0
              for part in parts]
    first: dict[str, Any] = {}  # the passages: dataclasses with chunk_id and score
    for p in [*by_vector, *by_text]:
        first.setdefault(p.chunk_id, p)
    fused = {cid: sum(w * part.get(cid, floor) for w, part, floor in zip(weights, parts, floors)) for cid in first}
    return [replace(first[cid], score=fused[cid]) for cid in sorted(fused, key=fused.__getitem__, reverse=True)]


def _max_normalised(passages: Sequence) -> dict[str, float]:
    if not passages:
        return {}
    top = max(p.score for p in passages)
    return {p.chunk_id: (p.score / top if top > 0 else 0.0) for p in passages}


def _rrf_scores(passages: Sequence, k: int) -> dict[str, float]:
    return {p.chunk_id: 1.0 / (k + rank) for rank, p in enumerate(passages, 1)}


def mrr_at_10(ranked: list[list[str]], relevant: list[set[str]]) -> float:
    total = 0.0
    for r, rel in zip(ranked, relevant):
        first = next((i for i, c in enumerate(r[:10], 1) if c in rel), None)
        total += 1.0 / first if first else 0.0
    return total / max(len(ranked), 1)


def calibrate(candidates: list[tuple[list, list]], relevant: list[set[str]], method: Literal["score", "rrf"] = "score",
              rrf_k: int = 60, source: str = "", depth: int | None = None) -> Fusion:
    """The grid weight with the best MRR@10 over (vector list, text list) pairs, cut at `depth`, of
    queries whose relevant chunk ids are known; ties go to the weight nearest 0.5 (the least extreme)."""
    scores = {}
    for w in GRID:
        fusion = Fusion(method, w, rrf_k)
        scores[w] = mrr_at_10([[p.chunk_id for p in fuse(v, t, fusion, depth)] for v, t in candidates], relevant)
    best = max(GRID, key=lambda w: (round(scores[w], 6), -abs(w - 0.5)))
    calibration = {"queries": len(candidates), "source": source, "mrr@10": {str(w): round(s, 4) for w, s in scores.items()},
                   "vector_only_mrr@10": round(scores[1.0], 4), "text_only_mrr@10": round(scores[0.0], 4)}
    return Fusion(method, best, rrf_k, calibration)


def configured(fusion: Fusion, rc) -> Fusion:
    """A knowledge base's fusion as the retrieval config asks: its method and RRF k, and its weight
    unless `vector_weight` sets one (a calibrated weight is kept only for the method it was tuned for)."""
    if fusion.method != rc.fusion:
        fusion = Fusion(rc.fusion, 0.5, rc.rrf_k, {"source": "default: calibrated for another method"})
    if rc.vector_weight is not None:
        fusion = replace(fusion, vector_weight=rc.vector_weight, calibration={"source": "retrieval.vector_weight"})
    return replace(fusion, rrf_k=rc.rrf_k)


def save_fusion(kb_dir: str | Path, fusion: Fusion) -> None:
    from imoe_ray.store import Store

    Store(kb_dir).write_bytes(json.dumps(fusion.to_json(), indent=1).encode(), FUSION_FILE)


def load_fusion(kb_dir: str | Path) -> Fusion | None:
    """The calibrated fusion of a knowledge base (a folder or a URI), or None (older stores, or a damaged file)."""
    from imoe_ray.store import Store, StoreError

    try:
        data = json.loads(Store(kb_dir, create=False).read_bytes(FUSION_FILE))
        return Fusion(data["method"], float(data["vector_weight"]), int(data.get("rrf_k", 60)),
                      data.get("calibration", {}))
    except (OSError, StoreError, ValueError, KeyError, TypeError):
        return None
