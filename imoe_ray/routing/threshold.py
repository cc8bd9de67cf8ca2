"""Request-time t_C: how many experts a request gets follows how complex the query is.

    complexity c = mean of   length   min(1, content words / complexity_words)
                             entropy  H(p) / log K            (how unsure the router is)
                             close    (#categories with p >= p_max - close_margin, minus 1) / (K - 1)

    t_C(c) = t_simple + c · (t_complex − t_simple)        (adaptive_range = [t_complex, t_simple])

The top category is kept whenever it clears the store's fixed t_C, so a simple query goes to one
expert (every other category must clear the high t_simple) and a complex one to several (they need
only the low t_complex). Policy "fixed" keeps the one t_C for every request.
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

    def complexity(self, content_words: int, probabilities: np.ndarray) -> float:
        p = np.clip(np.asarray(probabilities, dtype=np.float64), 0, None)
        k = len(p)
        if k < 2 or p.sum() <= 0:
            return 0.0
        q = p / p.sum()
        entropy = float(-(q[q > 0] * np.log(q[q > 0])).sum() / math.log(k))
        close = float(((p >= p.max() - self.close_margin).sum() - 1) / (k - 1))
        length = min(1.0, content_words / max(1, self.complexity_words))
        return round((length + entropy + close) / 3, 4)

    def threshold(self, complexity: float) -> float:
        return round(self.t_simple + complexity * (self.t_complex - self.t_simple), 4)
