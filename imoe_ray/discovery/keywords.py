"""Class-based tf-idf (c-TF-IDF, as in BERTopic): the words that set one category apart, and a name from them."""

from __future__ import annotations

import re

import numpy as np
from sklearn.feature_extraction.text import CountVectorizer


def class_tfidf_keywords(texts: list[str], labels: np.ndarray, n_classes: int, n_keywords: int = 10) -> list[list[str]]:
    """Top `n_keywords` terms of each class 0..n_classes-1 (labels < 0 are ignored)."""
    docs = [" ".join(t for t, l in zip(texts, labels) if l == c) for c in range(n_classes)]
    if not any(d.strip() for d in docs):
        return [[] for _ in range(n_classes)]
    vectorizer = CountVectorizer(stop_words="english", ngram_range=(1, 2), min_df=1,
                                 token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z0-9_]+\b", max_features=50_000)
    try:
        counts = vectorizer.fit_transform(docs).toarray().astype(np.float64)
    except ValueError:  # only stop words
        return [[] for _ in range(n_classes)]
    tf = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    avg_words = counts.sum() / max(1, n_classes)
    idf = np.log(1.0 + avg_words / np.maximum(counts.sum(axis=0), 1.0))
    # Terms common in many categories ("default", "returns") say little about any one of them.
    spread = (tf > 1e-4).sum(axis=0)
    distinctive = np.log(1.0 + n_classes / np.maximum(spread, 1.0))
    scores = tf * idf * distinctive
    terms = vectorizer.get_feature_names_out()
    return [[str(terms[i]) for i in np.argsort(-row)[:n_keywords] if row[i] > 0] for row in scores]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def category_names(keywords: list[list[str]], words_per_name: int = 3) -> list[str]:
    """Readable, unique, filesystem-safe names ([a-z0-9-]) from each category's top keywords."""
    names, used = [], set()
    for i, words in enumerate(keywords):
        parts: list[str] = []
        for w in words:
            slug = _slug(w)
            if slug and not any(slug in p or p in slug for p in parts):
                parts.append(slug)
            if len(parts) == words_per_name:
                break
        base = "-".join(parts)[:48].strip("-") or f"category-{i}"
        name, k = base, 2
        while name in used:
            name, k = f"{base}-{k}", k + 1
        used.add(name)
        names.append(name)
    return names
