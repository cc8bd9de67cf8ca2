"""Category discovery: the classifier's unsupervised stage.

1. Represent each chunk by its sentence embedding joined with tf-idf→SVD features (features.py).
2. UMAP to a few dimensions, then HDBSCAN; n_C is whatever HDBSCAN finds (a user may cap it, never
   set it). Leaf and excess-of-mass selection are both tried, and the one whose clusters have the
   higher silhouette in the representation space is kept.
3. Points HDBSCAN left as noise are given the cluster a linear classifier in UMAP space picks.
4. A multinomial logistic regression on the representation is trained on those labels: its
   probabilities are the soft memberships, for the training chunks and for any new text alike
   (so no UMAP model has to be kept), and categories it leaves nearly empty are dropped.
5. A chunk belongs to every category whose membership is above t_C; none above → every expert.

How well the categories agree with known labels is measured by `imoe eval discovery` (NMI, ARI).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
from sklearn.cluster import AgglomerativeClustering
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import silhouette_score
from sklearn.preprocessing import normalize

from imoe_ray.config import DiscoveryConfig
from imoe_ray.discovery.features import TextFeatures, combine
from imoe_ray.discovery.keywords import category_names, class_tfidf_keywords

Report = Callable[[str], None]


@dataclass
class Category:
    id: int
    name: str
    size: int
    keywords: list[str]
    centroid: list[float]  # mean embedding of its chunks, L2-normalised (encoder space)


@dataclass
class Discovery:
    """The frozen classifier: categories, t_C, and the membership model for new text."""

    categories: list[Category]
    threshold: float
    complexity_k: float = 0.0
    coef: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))     # (n_C, D)
    intercept: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))      # (n_C,)
    text_features: TextFeatures | None = None
    params: dict = field(default_factory=dict)

    @property
    def n_categories(self) -> int:
        return len(self.categories)

    def memberships(self, embeddings: np.ndarray, texts: list[str] | None = None) -> np.ndarray:
        """(n, n_C) soft memberships in [0, 1] of new chunks; `texts` are needed when text features are used."""
        if self.n_categories == 1:
            return np.ones((len(embeddings), 1), np.float32)
        if self.text_features is not None and texts is None:
            raise ValueError("this discovery model uses text features: pass the texts with the embeddings")
        text = self.text_features.transform(texts) if self.text_features is not None and texts is not None else None
        logits = combine(embeddings, text) @ self.coef.T + self.intercept
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)

    def thresholds(self, complexity: np.ndarray | None, n: int) -> np.ndarray:
        """t_C per sample: t_base·(1 − log(1 + k·c_S)/log(1 + k)), so complex samples reach more experts."""
        base = np.full(n, self.threshold, dtype=np.float64)
        if complexity is None or self.complexity_k <= 0:
            return base
        k = self.complexity_k
        return base * (1.0 - np.log1p(k * np.clip(complexity, 0.0, 1.0)) / math.log1p(k))

    def assign(self, memberships: np.ndarray, complexity: np.ndarray | None = None) -> tuple[np.ndarray, list[list[int]]]:
        """Top category (-1 when none clears t_C) and every category above t_C, strongest first."""
        t = self.thresholds(complexity, len(memberships))
        categories = []
        for row, bar in zip(memberships, t):
            above = np.flatnonzero(row > bar)
            categories.append([int(c) for c in above[np.argsort(-row[above])]])
        top = np.array([c[0] if c else -1 for c in categories], dtype=np.int64)
        return top, categories

    def to_json(self) -> dict:
        """Everything but the arrays (see `arrays`)."""
        return {"categories": [asdict(c) for c in self.categories], "threshold": self.threshold,
                "complexity_k": self.complexity_k, "params": self.params,
                "vocabulary": self.text_features.vocabulary if self.text_features else None}

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"coef": self.coef.astype(np.float32), "intercept": self.intercept.astype(np.float32)}
        if self.text_features is not None:
            out |= {"idf": self.text_features.idf, "svd_components": self.text_features.components}
        return out

    @classmethod
    def from_parts(cls, meta: dict, arrays: dict[str, np.ndarray]) -> "Discovery":
        text = None
        if meta.get("vocabulary") is not None:
            text = TextFeatures(meta["vocabulary"], arrays["idf"], arrays["svd_components"])
        return cls([Category(**c) for c in meta["categories"]], meta["threshold"], meta.get("complexity_k", 0.0),
                   arrays["coef"], arrays["intercept"], text, meta.get("params", {}))


def _reduce(features: np.ndarray, cfg: DiscoveryConfig) -> np.ndarray:
    import umap  # imported here: numba compilation is slow and only discovery needs it

    n = len(features)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reducer = umap.UMAP(n_components=min(cfg.reduce_dims, n - 2), n_neighbors=min(cfg.n_neighbors, n - 1),
                            min_dist=0.0, metric="cosine", random_state=cfg.seed)
        return reducer.fit_transform(features)


def _density_clusters(features: np.ndarray, reduced: np.ndarray, min_size: int,
                      seed: int) -> tuple[np.ndarray, dict] | None:
    """HDBSCAN with leaf and with excess-of-mass selection; noise filled in; the labeling whose
    silhouette in the representation space is higher wins (leaf splits finer, eom coarser, and
    which one matches a corpus's real structure differs from corpus to corpus)."""
    import hdbscan

    best = None
    for method in ("leaf", "eom"):
        raw = hdbscan.HDBSCAN(min_cluster_size=min_size, cluster_selection_method=method).fit_predict(reduced)
        if raw.max() < 1:
            continue
        labels = _relabel(_fill_noise(reduced, raw))
        score = silhouette_score(features, labels, metric="cosine", sample_size=min(len(labels), 4000),
                                 random_state=seed)
        info = {"selection": method, "clusters": int(raw.max() + 1), "noise_fraction": round(float(np.mean(raw < 0)), 4),
                "silhouette": round(float(score), 4)}
        if best is None or score > best[1]["silhouette"]:
            best = (labels, info)
    return best


def _fill_noise(reduced: np.ndarray, labels: np.ndarray) -> np.ndarray:
    clustered = labels >= 0
    if clustered.all():
        return labels
    classifier = LogisticRegression(max_iter=500).fit(reduced[clustered], labels[clustered])
    return classifier.predict(reduced)


def _relabel(labels: np.ndarray) -> np.ndarray:
    _, dense = np.unique(labels, return_inverse=True)
    return dense


def _fit_memberships(features: np.ndarray, labels: np.ndarray, seed: int) -> LogisticRegression:
    return LogisticRegression(C=4.0, max_iter=1000, random_state=seed).fit(features, labels)


def _cap(features: np.ndarray, labels: np.ndarray, cap: int) -> np.ndarray:
    """Merge the most similar categories (average-linkage on their centroids) down to `cap`."""
    centroids = normalize(np.stack([features[labels == c].mean(axis=0) for c in range(labels.max() + 1)]))
    groups = AgglomerativeClustering(n_clusters=cap, metric="cosine", linkage="average").fit_predict(centroids)
    return groups[labels]


def _single_category(embeddings: np.ndarray, texts: list[str], cfg: DiscoveryConfig, why: str,
                     report: Report) -> tuple[Discovery, np.ndarray]:
    report(f"discovery: one category for everything ({why})")
    keywords = class_tfidf_keywords(texts, np.zeros(len(texts), int), 1, cfg.n_keywords)
    centroid = normalize(embeddings.mean(axis=0, keepdims=True))[0].tolist() if len(embeddings) else []
    cat = Category(0, category_names(keywords)[0], len(texts), keywords[0], centroid)
    model = Discovery([cat], cfg.threshold, cfg.complexity_k, params={"reason": why, "min_cluster_size": None})
    return model, np.ones((len(texts), 1), np.float32)


def discover(embeddings: np.ndarray, texts: list[str], cfg: DiscoveryConfig,
             progress: Report | None = None) -> tuple[Discovery, np.ndarray]:
    """Discover categories; returns the frozen model and the (n, n_C) memberships of the given chunks."""
    report = progress or (lambda _msg: None)
    n = len(embeddings)
    if n != len(texts):
        raise ValueError(f"{n} embeddings but {len(texts)} texts")
    min_size = max(cfg.min_cluster_size, int(cfg.min_cluster_fraction * n))
    if n < 2 * min_size or n < 10:
        return _single_category(embeddings, texts, cfg, f"{n} chunks are too few for two categories of {min_size}", report)

    text = TextFeatures.fit(texts, cfg.svd_dims, cfg.seed) if cfg.text_features else None
    features = combine(embeddings, text.transform(texts) if text else None)
    report(f"discovery: {n} chunks, {features.shape[1]}-d representation, UMAP to {cfg.reduce_dims}-d")
    reduced = _reduce(features, cfg)
    clusters = _density_clusters(features, reduced, min_size, cfg.seed)
    if clusters is None:
        return _single_category(embeddings, texts, cfg, "no density structure found", report)
    labels, found = clusters
    report(f"discovery: HDBSCAN ({found['selection']} selection) found {found['clusters']} dense clusters "
           f"(min size {min_size}), {found['noise_fraction']:.0%} of chunks between them, reassigned")
    if cfg.max_categories and labels.max() + 1 > cfg.max_categories:
        labels = _relabel(_cap(features, labels, cfg.max_categories))
        report(f"discovery: merged down to the cap of {cfg.max_categories} categories")
    for _ in range(3):  # drop categories the membership model leaves nearly empty, then refit
        model = _fit_memberships(features, labels, cfg.seed)
        predicted = model.predict(features)
        counts = np.bincount(predicted, minlength=labels.max() + 1)
        if counts.min() >= min_size // 2 or labels.max() < 2:
            break
        keep = counts >= min_size // 2
        labels = _relabel(np.where(keep[labels], labels, predicted))
        labels = _relabel(_fill_noise(features, np.where(keep[labels], labels, -1)) if not keep.all() else labels)

    memberships = model.predict_proba(features).astype(np.float32)
    final = memberships.argmax(axis=1)
    n_c = memberships.shape[1]
    keywords = class_tfidf_keywords(texts, final, n_c, cfg.n_keywords)
    names = category_names(keywords)
    categories = [Category(c, names[c], int(np.sum(final == c)), keywords[c],
                           normalize(embeddings[final == c].mean(axis=0, keepdims=True))[0].astype(float).round(6).tolist()
                           if np.any(final == c) else [0.0] * embeddings.shape[1])
                  for c in range(n_c)]
    params = {"min_cluster_size": min_size, "hdbscan": found, "representation_dims": int(features.shape[1]), "config": cfg.model_dump(mode="json")}
    discovery = Discovery(categories, cfg.threshold, cfg.complexity_k, model.coef_.astype(np.float32),
                          model.intercept_.astype(np.float32), text, params)
    report(f"discovery: {n_c} categories")
    return discovery, memberships
