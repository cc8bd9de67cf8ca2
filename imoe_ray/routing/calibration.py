"""Calibration on held-out data: temperatures for probabilities, and the cascade's threshold."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T minimising held-out NLL of softmax(logits / T) (Guo et al., 2017)."""
    if len(labels) == 0:
        return 1.0

    def nll(t: float) -> float:
        z = logits / t
        z = z - z.max(axis=1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-log_p[np.arange(len(labels)), labels].mean())

    return float(minimize_scalar(nll, bounds=(0.05, 20.0), method="bounded").x)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    correct = predicted == labels
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(ece)


def cascade_threshold(fast_confidence: np.ndarray, fast_correct: np.ndarray, slow_correct: np.ndarray,
                      min_precision: float, groups: np.ndarray | None = None) -> float | None:
    """The lowest confidence at which the fast path may answer: among the held-out samples it would
    keep, it must be right at least as often as the slow path (within every group, when `groups`
    labels the samples: held-out chunks, prefixes and sentences each, so that a gain on one kind of
    request cannot pay for a loss on another) and at least `min_precision` of the time. None when no
    threshold qualifies (every query then takes the slow path)."""
    order = np.argsort(-fast_confidence)
    groups = np.zeros(len(order), np.int64) if groups is None else np.asarray(groups)[order]
    kept = np.arange(1, len(order) + 1)
    ok = np.cumsum(fast_correct[order]) >= min_precision * kept
    for g in np.unique(groups):
        mine = groups == g
        ok &= np.cumsum(fast_correct[order] & mine) >= np.cumsum(slow_correct[order] & mine)
    if not ok.any():
        return None
    # The largest prefix that qualifies; ties in confidence must not split it.
    last = int(np.flatnonzero(ok)[-1])
    threshold = float(fast_confidence[order[last]])
    while last + 1 < len(order) and fast_confidence[order[last + 1]] == threshold:
        last += 1
        if not ok[last]:
            return float(np.nextafter(threshold, 2.0))
    return threshold
