"""Router benchmark on a store's held-out test split: the cascade, DACT alone, the full encoder with a
linear head, and a keyword router of the kind that matches manifest keywords, side by side.

    imoe build --corpus corpus.jsonl --store store --until router
    python benchmarks/bench_router.py --store store [--latency-queries 300]

For each router and each held-out set (whole chunks, and their first 24 encoder tokens) it prints
top-1 accuracy against the discovered categories, the mean number of encoder layers run, and the
p50/p99 latency of one query at a time, in process, on this machine; then the latency ratios; then,
for the cascade and the full encoder, accuracy by query length (`--lengths`: the first N encoder tokens
of every held-out chunk), which shows how short a query can be for a given accuracy.
"""

from __future__ import annotations

import argparse
import json
import re
import time

import numpy as np
import torch


def held_out(store, cfg, router):
    """The test split's chunks and 24-token prefixes, with their discovered categories."""
    from imoe_ray.routing.stage import load_corpus
    from imoe_ray.routing.views import split_of, token_prefixes

    corpus = load_corpus(store, cfg, router._encoder, report=print)
    rows = np.array([i for i, key in enumerate(corpus.ids)
                     if split_of(key, cfg.router.calib_fraction, cfg.router.test_fraction) == "test"])
    if len(rows) == 0:
        raise SystemExit("the store's router has no test split (router.test_fraction is 0)")
    texts = [corpus.texts[i] for i in rows]
    prefixes = token_prefixes(texts, router._encoder.tokenizer, cfg.router.eval_prefix_tokens)
    labels = corpus.labels[rows]
    return {"chunks": (texts, labels), f"prefix{cfg.router.eval_prefix_tokens}": (prefixes, labels)}


def accuracy_by_length(systems: dict, texts: list[str], labels: np.ndarray, tokenizer, lengths: list[int]) -> dict:
    """Top-1 accuracy of each system on the first n tokens of every text, for each n of `lengths`."""
    from imoe_ray.routing.views import token_prefixes

    out = {}
    for n in lengths:
        prefixes = token_prefixes(texts, tokenizer, n)
        out[n] = {name: round(float(np.mean(timed(fn, prefixes)[0] == labels)), 4) for name, fn in systems.items()}
    return out


class KeywordRouter:
    """Manifest-keyword matching (what the HiveLLM-style routers ship): most keyword hits wins."""

    def __init__(self, keywords: list[list[str]]):
        self.patterns = [[re.compile(rf"\b{re.escape(k.lower())}\b") for k in words] for words in keywords]

    def __call__(self, text: str) -> tuple[int, int]:
        lowered = text.lower()
        hits = [sum(1 for p in pats if p.search(lowered)) for pats in self.patterns]
        best = int(np.argmax(hits))
        return (best if hits[best] > 0 else -1), 0


def timed(fn, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predictions, layers and milliseconds, one query at a time."""
    preds, layers, ms = [], [], []
    for t in texts:
        start = time.perf_counter()
        p, n = fn(t)
        ms.append((time.perf_counter() - start) * 1000)
        preds.append(p)
        layers.append(n)
    return np.array(preds), np.array(layers), np.array(ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="store")
    parser.add_argument("--latency-queries", type=int, default=300, help="held-out queries timed per set")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--lengths", default="8,16,24,32,48,64",
                        help="query lengths in encoder tokens for the accuracy-by-length table ('' skips it)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from imoe_ray.cli import resolve_config
    from imoe_ray.discovery.stage import load_model
    from imoe_ray.routing.stage import load_reference, load_router
    from imoe_ray.store import Store

    cfg = resolve_config(args.store, None, None)
    store = Store(cfg.store, cache_dir=cfg.cache_dir)
    router = load_router(store, cfg)
    reference = load_reference(store)
    keywords = KeywordRouter([c.keywords for c in load_model(store).categories])
    encoder = router._encoder
    n_layers = router.head.n_layers

    def cascade(t):
        r = router.route(t)
        return int(np.argmax([r.all_probabilities[n] for n in router.names])), r.exit_layer

    def dact(t):
        d, _ = router.dact([t])
        return int(d.probabilities[0].argmax()), int(d.exit_layer[0])

    def full_encoder(t):
        _, states = encoder.encode_with_layers([t])
        text = router.text_features.transform([t]) if router.head.text_dims else None
        return int(reference.predict(states, text)[0]), n_layers

    systems = {"cascade (fast path + DACT)": cascade, "DACT alone": dact,
               "full encoder + linear head": full_encoder, "keyword router": keywords}
    for fn in systems.values():  # warm up
        fn("warm up the caches")
    results = {}
    sets = held_out(store, cfg, router)
    for set_name, (texts, labels) in sets.items():
        rng = np.random.default_rng(0)
        pick = rng.permutation(len(texts))[: args.latency_queries]
        sample, sample_labels = [texts[i] for i in pick], labels[pick]
        for name, fn in systems.items():
            preds, layers, ms = timed(fn, sample)
            results[(set_name, name)] = {
                "rows": len(sample), "accuracy": round(float(np.mean(preds == sample_labels)), 4),
                "mean_layers": round(float(layers.mean()), 2),
                "p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}

    print(f"\nrouter benchmark: store {store.uri}, {len(router.names)} categories, encoder of {n_layers} layers, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'held-out set':<12} {'router':<28} {'rows':>5} {'accuracy':>9} {'layers':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for (set_name, name), r in results.items():
        print(f"{set_name:<12} {name:<28} {r['rows']:>5} {r['accuracy']:>9.3f} {r['mean_layers']:>7.2f} "
              f"{r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f}")
    for set_name in dict.fromkeys(k[0] for k in results):
        c, f = results[(set_name, "cascade (fast path + DACT)")], results[(set_name, "full encoder + linear head")]
        d = results[(set_name, "DACT alone")]
        print(f"{set_name}: cascade p50 is {f['p50_ms'] / max(c['p50_ms'], 1e-9):.1f}x faster than the full encoder; "
              f"DACT uses {d['mean_layers'] / n_layers:.0%} of the layers at {100 * (d['accuracy'] - f['accuracy']):+.1f} "
              f"points of accuracy")
    lengths = [int(n) for n in args.lengths.split(",") if n.strip()]
    by_length = {}
    if lengths:
        texts, labels = sets["chunks"]
        compared = {k: systems[k] for k in ("cascade (fast path + DACT)", "full encoder + linear head")}
        by_length = accuracy_by_length(compared, texts, labels, encoder.tokenizer, lengths)
        print(f"\naccuracy by query length (first N encoder tokens of the {len(texts)} held-out chunks; whole chunks above)")
        print(f"{'tokens':>6} " + " ".join(f"{name:>28}" for name in compared))
        for n, row in by_length.items():
            print(f"{n:>6} " + " ".join(f"{row[name]:>28.3f}" for name in compared))
    print(json.dumps({f"{k[0]}|{k[1]}": v for k, v in results.items()} | {"accuracy_by_length": by_length}))


if __name__ == "__main__":
    main()
