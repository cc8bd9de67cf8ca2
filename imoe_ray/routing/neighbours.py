"""The neighbour vote: a query's k most similar training rows (the chunks and their prefix views, in
the space discovery clusters in: the encoder's pooled last layer joined with the text features)
vote for their categories, each by its similarity.

    p_nn(c | q) ∝ ε + Σ_{j ∈ kNN(q), y_j = c} exp(cos(q, x_j) / T)

A linear head draws one border per category; the vote follows the corpus's own local structure, so
where a short query sits between categories its runners-up are the categories of the chunks it
resembles. The router fuses it with the cascade's answer (`Router.vote`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.preprocessing import normalize

EPSILON = 1e-3   # every category keeps a little mass: a vote of k rows is not a certainty


@dataclass
class NeighbourVote:
    features: np.ndarray   # (n, d) float32, unit rows
    labels: np.ndarray     # (n,) category of each row
    n_classes: int
    k: int
    temperature: float

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, n_classes: int, k: int, temperature: float,
            max_rows: int, seed: int) -> "NeighbourVote":
        """Keep at most `max_rows` rows (a uniform sample) as unit vectors."""
        if len(features) > max_rows:
            keep = np.sort(np.random.default_rng(seed).choice(len(features), max_rows, replace=False))
            features, labels = features[keep], labels[keep]
        return cls(normalize(features).astype(np.float32), np.asarray(labels, np.int64), n_classes, k, temperature)

    def probabilities(self, queries: np.ndarray) -> np.ndarray:
        """(m, K) vote shares of `queries` (m, d) in the same feature space."""
        sims = normalize(np.asarray(queries, np.float32)) @ self.features.T
        k = min(self.k, sims.shape[1])
        nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        rows = np.arange(len(sims))[:, None]
        weights = np.exp((sims[rows, nearest] - 1.0) / self.temperature)   # shifted by the largest possible cos
        votes = np.full((len(sims), self.n_classes), EPSILON * weights.sum(1, keepdims=True) / self.n_classes)
        np.add.at(votes, (np.broadcast_to(rows, nearest.shape), self.labels[nearest]), weights)
        return votes / votes.sum(1, keepdims=True)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"neighbours.features": self.features.astype(np.float16), "neighbours.labels": self.labels}

    def settings(self) -> dict:
        return {"k": self.k, "temperature": self.temperature, "n_classes": self.n_classes}

    @classmethod
    def from_parts(cls, settings: dict, arrays: dict[str, np.ndarray]) -> "NeighbourVote":
        return cls(arrays["neighbours.features"].astype(np.float32), arrays["neighbours.labels"].astype(np.int64),
                   settings["n_classes"], settings["k"], settings["temperature"])

