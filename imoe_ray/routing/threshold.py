"""Request-time t_C: how many experts a request gets follows how complex the query is.

    complexity c = weighted mean (complexity_weights) of
                             length   min(1, content words / complexity_words)
                             entropy  H(p) / log K            (how unsure the router is)
                             close    (#categories with p >= p_max - close_margin, minus 1) / (K - 1)

    t_C(c) = t_simple + c · (t_complex − t_simple)        (adaptive_range = [t_complex, t_simple])

The top category is kept whenever it clears the store's fixed t_C; the next ones join, most probable
first, while they reach t_C(c) and the request has fewer than `max_experts` categories. A sure
query (one peaked probability: low entropy, no close rival) keeps the high t_simple and goes to one
expert; an unsure one (flat probabilities) gets the low t_complex and its runners-up join, which is
where the gold category hides when the top one is wrong. Policy "fixed" keeps the one t_C for every
request (`select` with `adaptive=None`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AdaptiveThreshold:
    t_complex: float          # t_C of the most complex query (c = 1)
    t_simple: float           # t_C of the simplest (c = 0)
    complexity_words: int     # content words at which the length part saturates
    close_margin: float       # categories within this of the top count as close
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # of length, entropy, close in c
    max_experts: int | None = None  # most categories one request goes to (None: no cap)

    def complexity(self, content_words: int, probabilities: np.ndarray) -> float:
        p = np.clip(np.asarray(probabilities, dtype=np.float64), 0, None)
        k = len(p)
        if k < 2 or p.sum() <= 0:
            return 0.0
        q = p / p.sum()
        entropy = float(-(q[q > 0] * np.log(q[q > 0])).sum() / math.log(k))
        close = float(((p >= p.max() - self.close_margin).sum() - 1) / (k - 1))
        length = min(1.0, content_words / max(1, self.complexity_words))
        w = np.asarray(self.weights, dtype=np.float64)
        return round(float(np.dot(w, [length, entropy, close]) / w.sum()), 4)

    def threshold(self, complexity: float) -> float:
        return round(self.t_simple + complexity * (self.t_complex - self.t_simple), 4)


@dataclass(frozen=True)
class Selection:
    categories: list[int]          # chosen, most probable first; [] when the top one misses the store's t_C
    t_c: float                     # the threshold the categories after the top one had to clear
    complexity: float | None       # the query's complexity score (adaptive only)


def select(scores: np.ndarray, store_t_c: float, adaptive: AdaptiveThreshold | None = None,
           content_words: int = 0) -> Selection:
    """The categories a request goes to under the fixed (`adaptive` None) or the adaptive t_C."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    t_c, complexity, cap = store_t_c, None, None
    if adaptive is not None:
        complexity = adaptive.complexity(content_words, scores)
        t_c, cap = adaptive.threshold(complexity), adaptive.max_experts
    if not len(order) or scores[order[0]] < store_t_c:
        return Selection([], t_c, complexity)
    chosen = [int(order[0])]
    for i in order[1:]:
        if scores[i] < t_c or (cap is not None and len(chosen) >= cap):
            break
        chosen.append(int(i))
    return Selection(chosen, t_c, complexity)
