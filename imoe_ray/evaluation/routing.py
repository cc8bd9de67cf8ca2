"""How well the served router routes: accuracy by query length, the confusion matrix and the
calibration of its probabilities, on held-out texts it never trained on.

    held-out text ──► its first L encoder tokens (L = 8, 16, 24, 32, 64, whole) ──► Router.route
                  ──► top category == the text's category?   (accuracy per L)
        experts the request is served by, and whether its category's expert is among them (per L: the
        cost and the coverage of the t_C policy, `router.threshold_policy`)
    at the longest L: confusion[gold, predicted]; reliability: accuracy per bin of the top
    probability, and the expected calibration error ECE = Σ_b (n_b / n) · |acc_b − conf_b|

Texts whose category is "none" (discovery put them in no category) are left out: there is no right
answer for them. With a file, its category column must hold the store's category names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imoe_ray.config import Config
from imoe_ray.corpus.readers import CorpusError
from imoe_ray.evaluation.heldout import file_heldout, store_heldout
from imoe_ray.store import Store

LENGTHS = (8, 16, 24, 32, 64, None)  # encoder tokens; None: the whole text
BINS = 10


def evaluate_routing(store: Store, cfg: Config, heldout: str | None = None, text_column: str | None = None,
                     category_column: str | None = None, lengths: tuple[int | None, ...] = LENGTHS,
                     max_texts: int | None = None, report=print, split: str = "test") -> dict:
    from imoe_ray.routing.stage import load_router, make_encoder
    from imoe_ray.routing.views import token_prefixes

    if heldout:
        if not category_column:
            raise CorpusError("--heldout needs --category-column: the category (a name the store's router knows) of each text")
        texts, categories = file_heldout(heldout, text_column or cfg.corpus.text_column, category_column)
        assert categories is not None  # category_column is given
    else:
        texts, categories = store_heldout(store, cfg, split)
    router = load_router(store, cfg)
    known = set(router.names)
    unknown = sorted({c for c in categories if c != "none" and c not in known})
    if unknown:
        raise CorpusError(f"categories the router does not know: {', '.join(unknown[:5])}; it knows {', '.join(router.names)}")
    keep = [i for i, c in enumerate(categories) if c != "none" and texts[i].strip()][:max_texts]
    if not keep:
        raise CorpusError("no held-out text with a category to evaluate")
    texts, gold = [texts[i] for i in keep], [categories[i] for i in keep]
    report(f"[eval] routing {len(texts)} held-out texts at {len(lengths)} lengths")
    tokenizer = make_encoder(cfg).tokenizer  # the router's own encoder's: lengths are in its tokens
    by_length: dict[str, dict] = {}
    last: tuple[str, list[str], list[float], list[bool]] | None = None
    for length in lengths:
        queries = texts if length is None else token_prefixes(texts, tokenizer, length)
        routes = [router.route(q) for q in queries]
        predicted = [r.names[0] if r.names else "none" for r in routes]
        top_p = [r.probabilities[0] if r.probabilities else 0.0 for r in routes]
        correct = [p == g for p, g in zip(predicted, gold)]
        key = "whole" if length is None else str(length)
        served = [router.served_by.get(g, g) in r.experts for g, r in zip(gold, routes)]
        by_length[key] = {"accuracy": round(float(np.mean(correct)), 4), "n": len(correct),
                          "mean_experts": round(float(np.mean([len(r.experts) for r in routes])), 3),
                          "gold_served": round(float(np.mean(served)), 4),
                          "mean_t_c": round(float(np.mean([r.t_c if r.t_c is not None else np.nan for r in routes])), 4)
                          if any(r.t_c is not None for r in routes) else None,
                          "mean_exit_layer": round(float(np.mean([r.exit_layer for r in routes])), 3),
                          "p50_latency_ms": round(float(np.median([r.latency_ms for r in routes])), 3)}
        last = (key, predicted, top_p, correct)
    assert last is not None  # lengths is not empty
    key, predicted, top_p, correct = last
    names = list(router.names)
    index = {n: i for i, n in enumerate(names)}
    confusion = np.zeros((len(names), len(names) + 1), dtype=int)  # the last column: routed to no category
    for g, p in zip(gold, predicted):
        confusion[index[g], index.get(p, len(names))] += 1
    return {"texts": len(texts), "source": heldout or f"store {split} split", "categories": names,
            "threshold_policy": router.settings.get("threshold_policy", "fixed"),
            "accuracy": {k: v["accuracy"] for k, v in by_length.items()}, "by_length": by_length,
            "confusion": {"length": key, "rows": names, "columns": names + ["none"], "counts": confusion.tolist()},
            "calibration": reliability(np.array(top_p), np.array(correct, dtype=float))}


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = BINS) -> dict:
    """Accuracy and mean confidence per equal-width bin of the top probability, and the ECE."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        if not mask.any():
            continue
        acc, conf = float(correct[mask].mean()), float(confidence[mask].mean())
        ece += mask.mean() * abs(acc - conf)
        rows.append({"low": round(float(edges[b]), 2), "high": round(float(edges[b + 1]), 2), "n": int(mask.sum()),
                     "accuracy": round(acc, 4), "confidence": round(conf, 4)})
    return {"bins": rows, "ece": round(float(ece), 4)}


def plot_routing(result: dict, path: str | Path) -> None:
    """Accuracy by query length, the confusion matrix and the reliability diagram, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(17, 5.2), gridspec_kw={"width_ratios": [1, 1.4, 1]})
    keys = list(result["accuracy"])
    a.plot(range(len(keys)), [result["accuracy"][k] for k in keys], marker="o")
    a.set_xticks(range(len(keys)), keys)
    a.set_ylim(0, 1.02)
    a.set_xlabel("query length (encoder tokens)")
    a.set_ylabel("top-1 accuracy")
    a.set_title(f"Routing accuracy by query length ({result['texts']} texts)")
    a.grid(alpha=0.3)
    conf = result["confusion"]
    counts = np.array(conf["counts"], dtype=float)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    b.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    b.set_xticks(range(len(conf["columns"])), conf["columns"], rotation=60, ha="right", fontsize=7)
    b.set_yticks(range(len(conf["rows"])), conf["rows"], fontsize=7)
    for (i, j), n in np.ndenumerate(counts):
        if n:
            b.text(j, i, int(n), ha="center", va="center", fontsize=7, color="white" if shares[i, j] > 0.5 else "black")
    b.set_xlabel("routed to")
    b.set_ylabel("category")
    b.set_title("Confusion (whole texts)" if conf["length"] == "whole" else f"Confusion ({conf['length']} tokens)")
    cal = result["calibration"]
    c.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    c.plot([r["confidence"] for r in cal["bins"]], [r["accuracy"] for r in cal["bins"]], marker="o")
    c.set_xlim(0, 1)
    c.set_ylim(0, 1.02)
    c.set_xlabel("top probability")
    c.set_ylabel("accuracy")
    c.set_title(f"Calibration (ECE {cal['ece']:.3f})")
    c.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
