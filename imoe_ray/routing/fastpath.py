"""The router's fast path: hashed word n-grams (and discovery's text features) and a linear model, no transformer.

The n-gram features are computed by this module alone (a regex tokenizer and MurmurHash3), so
training and serving cannot drift apart, and one query costs a few dozen microseconds: tokenise,
hash, add up the weight rows of the hashed features. When it is given discovery's tf-idf → SVD
featurizer (half of the representation the categories were clustered on), the model reads those
too: that lets it answer far more queries at the slow path's accuracy than the n-grams alone
(`python benchmarks/bench_router.py --store STORE` measures the share the fast path answers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.utils import murmurhash3_32

from imoe_ray.discovery.features import TextFeatures

_TOKEN = re.compile(r"[a-z0-9_]+(?:[.\-][a-z0-9_]+)*")


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def hashed_features(text: str, n_features: int, max_chars: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, values) of one text's l2-normalised, sublinear-tf unigram+bigram hash features."""
    words = tokens(text[:max_chars])
    grams = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
    if not grams:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    idx = np.fromiter((murmurhash3_32(g, positive=True) % n_features for g in grams), np.int64, len(grams))
    unique, counts = np.unique(idx, return_counts=True)
    values = 1.0 + np.log(counts.astype(np.float32))
    return unique, values / np.linalg.norm(values)


def feature_matrix(texts: list[str], n_features: int, max_chars: int) -> sparse.csr_matrix:
    rows = [hashed_features(t, n_features, max_chars) for t in texts]
    indptr = np.cumsum([0] + [len(r[0]) for r in rows])
    indices = np.concatenate([r[0] for r in rows]) if rows else np.zeros(0, np.int64)
    data = np.concatenate([r[1] for r in rows]) if rows else np.zeros(0, np.float32)
    return sparse.csr_matrix((data, indices, indptr), shape=(len(texts), n_features))


@dataclass
class FastPath:
    weights: np.ndarray        # (n_features, n_classes)
    bias: np.ndarray           # (n_classes,)
    seen: np.ndarray           # (n_features,) bool: hashed unigrams met in training
    n_features: int
    max_chars: int
    temperature: float = 1.0   # set by calibration
    text_weights: np.ndarray | None = None   # (text dims, n_classes) when it reads the text features
    text_features: TextFeatures | None = None

    @classmethod
    def fit(cls, texts: list[str], labels: np.ndarray, n_classes: int, n_features: int, max_chars: int,
            c: float, seed: int, text_features: TextFeatures | None = None) -> "FastPath":
        x = feature_matrix(texts, n_features, max_chars)
        if text_features is not None:
            x = sparse.hstack([x, sparse.csr_matrix(text_features.transform([t[:max_chars] for t in texts]))]).tocsr()
        model = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x, labels)
        weights = np.zeros((x.shape[1], n_classes), np.float32)
        bias = np.zeros(n_classes, np.float32)
        if len(model.classes_) == 1:
            bias[model.classes_[0]] = 10.0
        else:
            coef = model.coef_ if model.coef_.shape[0] == len(model.classes_) else np.vstack([-model.coef_, model.coef_])
            inter = model.intercept_ if len(model.intercept_) == len(model.classes_) else np.r_[-model.intercept_, model.intercept_]
            weights[:, model.classes_] = coef.T
            bias[model.classes_] = inter
            bias[np.setdiff1d(np.arange(n_classes), model.classes_)] = -30.0
        seen = np.zeros(n_features, bool)
        for t in texts:
            seen[[murmurhash3_32(w, positive=True) % n_features for w in tokens(t[:max_chars])]] = True
        text_weights = weights[n_features:] if text_features is not None else None
        return cls(weights[:n_features], bias, seen, n_features, max_chars, 1.0, text_weights, text_features)

    def logits(self, text: str) -> np.ndarray:
        idx, val = hashed_features(text, self.n_features, self.max_chars)
        out = val @ self.weights[idx] + self.bias
        if self.text_weights is not None and self.text_features is not None:
            out += self.text_features.transform_one(text[:self.max_chars]) @ self.text_weights
        return out

    def probabilities(self, text: str) -> np.ndarray:
        return _softmax(self.logits(text) / self.temperature)

    def logits_batch(self, texts: list[str]) -> np.ndarray:
        out = np.asarray(feature_matrix(texts, self.n_features, self.max_chars) @ self.weights) + self.bias
        if self.text_weights is not None and self.text_features is not None:
            out += self.text_features.transform([t[:self.max_chars] for t in texts]) @ self.text_weights
        return out

    def known_fraction(self, text: str) -> float:
        """Share of the text's words that the training corpus contained (1.0 for no words)."""
        words = tokens(text[:self.max_chars])
        if not words:
            return 1.0
        return float(np.mean(self.seen[[murmurhash3_32(w, positive=True) % self.n_features for w in words]]))

    def arrays(self) -> dict[str, np.ndarray]:
        text = {} if self.text_weights is None else {"fast.text_weights": self.text_weights}
        return {"fast.weights": self.weights, "fast.bias": self.bias, "fast.seen": self.seen.astype(np.uint8)} | text

    def settings(self) -> dict:
        return {"n_features": self.n_features, "max_chars": self.max_chars, "temperature": self.temperature,
                "reads_text_features": self.text_weights is not None}

    @classmethod
    def from_parts(cls, settings: dict, arrays: dict[str, np.ndarray],
                   text_features: TextFeatures | None = None) -> "FastPath":
        text_weights = arrays.get("fast.text_weights")
        if text_weights is not None and text_features is None:
            raise ValueError("this fast path reads text features, but none were loaded")
        return cls(arrays["fast.weights"], arrays["fast.bias"], arrays["fast.seen"].astype(bool),
                   settings["n_features"], settings["max_chars"], settings.get("temperature", 1.0),
                   text_weights, text_features if text_weights is not None else None)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
