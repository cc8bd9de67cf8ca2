"""Training data for the router: chunks labelled by discovery, plus short query-like views of them.

Requests are short and chunks are long, so the router also learns from what a query looks like:
a chunk's first tokens, one of its sentences, its key phrases, and queries synthesised per
category by clustering that category's chunks and phrasing each sub-cluster's distinctive terms
(the MoE-Classifier recipe, with the clusters' own text in place of a hosted LLM).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from sklearn.cluster import KMeans
from sklearn.feature_extraction.text import TfidfVectorizer

from imoe_ray.discovery.keywords import class_tfidf_keywords
from imoe_ray.store.layout import split_of  # noqa: F401  (the router's split: routing.train and benchmarks read it here)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_TEMPLATES = ("{a} {b}", "how to {a} {b}", "{a} {b} {c}", "what does {a} do with {b}", "{a} {b} example",
              "using {a} for {b}", "{c} {a}")


@dataclass
class Views:
    texts: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)

    def add(self, text: str, label: int, kind: str) -> None:
        if text.strip():
            self.texts.append(text)
            self.labels.append(int(label))
            self.kinds.append(kind)

    def extend(self, other: "Views") -> "Views":
        self.texts += other.texts
        self.labels += other.labels
        self.kinds += other.kinds
        return self


def token_prefixes(texts: list[str], tokenizer, n_tokens: int | list[int]) -> list[str]:
    """The exact substring covering each text's first `n_tokens` encoder tokens."""
    counts = [n_tokens] * len(texts) if isinstance(n_tokens, int) else n_tokens
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
    out = []
    for text, offsets, n in zip(texts, enc["offset_mapping"], counts):
        out.append(text[:offsets[min(n, len(offsets)) - 1][1]] if offsets else text)
    return out


def sentences(text: str, min_words: int = 4, max_words: int = 40) -> list[str]:
    parts = [s.strip() for s in _SENTENCE_END.split(text)]
    return [" ".join(s.split()[:max_words]) for s in parts if len(s.split()) >= min_words]


def chunk_views(texts: list[str], labels: np.ndarray, tokenizer, rng: np.random.Generator,
                prefix_tokens: tuple[int, int], key_terms: tuple[int, int]) -> Views:
    """Per chunk: one prefix of random length, one random sentence, one bag of its key terms."""
    views = Views()
    lengths = rng.integers(prefix_tokens[0], prefix_tokens[1] + 1, size=len(texts)).tolist()
    for text, label, prefix in zip(texts, labels, token_prefixes(texts, tokenizer, lengths)):
        views.add(prefix, label, "prefix")
        found = sentences(text)
        if found:
            views.add(found[rng.integers(len(found))], label, "sentence")
    tfidf = TfidfVectorizer(stop_words="english", sublinear_tf=True, token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z0-9_]+\b")
    try:
        weights = tfidf.fit_transform(texts)
    except ValueError:  # nothing but stop words
        return views
    vocab = tfidf.get_feature_names_out()
    for row, label in zip(weights, labels):
        k = int(rng.integers(key_terms[0], key_terms[1] + 1))
        top = row.indices[np.argsort(-row.data)[:k]]
        if len(top):
            views.add(" ".join(vocab[rng.permutation(top)]), label, "key-terms")
    return views


def synthetic_queries(texts: list[str], embeddings: np.ndarray, labels: np.ndarray, n_classes: int,
                      rng: np.random.Generator, chunks_per_cluster: int, per_cluster: int, seed: int) -> Views:
    """Cluster each category's chunks (k-means on embeddings) and phrase each sub-cluster's
    distinctive terms as short queries."""
    views = Views()
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)
        k = int(np.clip(len(idx) // chunks_per_cluster, 1, 12))
        if len(idx) < 2:
            continue
        sub = KMeans(n_clusters=min(k, len(idx)), n_init=3, random_state=seed).fit_predict(embeddings[idx])
        keywords = class_tfidf_keywords([texts[i] for i in idx], sub, int(sub.max()) + 1, n_keywords=8)
        for words in keywords:
            words = [w for w in words if " " not in w] or words
            if len(words) < 3:
                continue
            for template in rng.choice(_TEMPLATES, size=per_cluster, replace=False):
                a, b, cc = rng.choice(words, size=3, replace=False)
                views.add(str(template).format(a=a, b=b, c=cc), c, "synthetic")
    return views


def training_views(texts: list[str], embeddings: np.ndarray, labels: np.ndarray, n_classes: int, tokenizer,
                   rng: np.random.Generator, cfg) -> Views:
    """Everything the router learns from besides the chunks themselves: each chunk's views and the
    synthetic queries per category, with the `router` settings `cfg`."""
    views = chunk_views(texts, labels, tokenizer, rng, tuple(cfg.prefix_tokens), tuple(cfg.key_terms))
    return views.extend(synthetic_queries(texts, embeddings, labels, n_classes, rng, cfg.synthetic_chunks_per_cluster,
                                          cfg.synthetic_per_cluster, cfg.seed))
