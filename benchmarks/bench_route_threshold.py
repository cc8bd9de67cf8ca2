"""Request-time t_C: the adaptive policy against the fixed threshold, tuned on one split, measured on another.

    imoe build --corpus corpus.jsonl --store store --until router
    python benchmarks/bench_route_threshold.py --store store [--tune-length 24] [--budget 1.5]

Every held-out text of the router's calibration split (validation: the router never trained on it)
and of its test split (the result) is routed once per prefix length, as `imoe eval route` does; the
policies are then applied to the same probabilities (`imoe_ray.routing.threshold.select`, the code
the router runs), so every policy sees identical routes. On the calibration split, at --tune-length
tokens, a grid search picks the adaptive setting that serves the gold category most often within
--budget experts per request (on a tie, the one using more of the budget: see `tune`), and, as a
second baseline, the fixed t_C that does the same. The test split then prints the store's fixed t_C, the tuned fixed t_C and the tuned
adaptive policy side by side, with the ratio adaptive / fixed of experts per request.

    python benchmarks/bench_route_threshold.py --store store --folds 7

--folds K: the same measurement, cross-validated. K routers are trained on the store's own data,
each with a rotated split (`split_of(..., offset=f/K)`, test share 1/K), so every chunk is in one
fold's test split; each fold tunes its adaptive setting on its own calib split and is measured on
its test split at --tune-length tokens; the folds' results are pooled (every chunk counted once).
A test split of ~80 texts moves by 1.3 points per text; the pooled figure rests on all of them.
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import dataclass

import numpy as np


@dataclass
class Row:
    scores: np.ndarray          # the router's probabilities, in its names' order
    content_words: int
    fallback_experts: list[str] | None   # the route fell back: its experts, whatever the policy
    gold: str


def routed_rows(router, texts: list[str], gold: list[str], tokenizer, length: int | None) -> list[Row]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    from imoe_ray.routing.fastpath import tokens
    from imoe_ray.routing.views import token_prefixes

    names = [p.name for p in router.profiles]
    queries = texts if length is None else token_prefixes(texts, tokenizer, length)
    rows = []
    for q, g in zip(queries, gold):
        r = router.route(q)
        rows.append(Row(np.array([r.all_probabilities.get(n, 0.0) for n in names]),
                        sum(w not in ENGLISH_STOP_WORDS for w in tokens(q)), r.experts if r.fallback else None, g))
    return rows


def score(router, rows: list[Row], adaptive) -> tuple[float, float]:
    """(mean experts per request, share of requests whose gold category's expert serves it)."""
    from imoe_ray.routing.threshold import select

    names = [p.name for p in router.profiles]
    serving = lambda cats: list(dict.fromkeys(router.served_by.get(c, c) for c in cats))  # noqa: E731
    counts, served = [], []
    for row in rows:
        experts = row.fallback_experts
        if experts is None:
            chosen = select(row.scores, router.threshold, adaptive, row.content_words).categories
            experts = serving([names[i] for i in chosen]) if chosen else serving(names)
        counts.append(len(experts))
        served.append(router.served_by.get(row.gold, row.gold) in experts)
    return float(np.mean(counts)), float(np.mean(served))


def adaptive_grid(base):
    from imoe_ray.routing.threshold import AdaptiveThreshold

    for lo, hi, weights, cap, margin in itertools.product(
            (0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.1, 0.15), (0.1, 0.15, 0.2, 0.3, 0.45, 0.6, 0.9),
            ((1, 1, 1), (0, 1, 0), (0, 1, 1), (0, 2, 1), (1, 2, 1), (0, 1, 2), (1, 3, 1)), (2, 3, None), (0.1, 0.2)):
        if lo <= hi:
            yield AdaptiveThreshold(lo, hi, base.complexity_words, margin, tuple(float(w) for w in weights), cap)


def tune(router, rows: list[Row], candidates, budget: float, on_tie: str = "budget"):
    """The candidate serving the gold category most often within `budget` experts per request, and its
    (served, experts). On a tie in served, `on_tie` "budget" takes the one using more of the budget (a
    validation split of ~100 texts saturates early: a tie there is rarely one on new text), "fewest"
    the one with fewer experts."""
    best, best_key = None, None
    for cand in candidates:
        experts, served = score(router, rows, cand)
        if experts <= budget:
            key = (round(served, 6), experts if on_tie == "budget" else -experts)
            if best_key is None or key > best_key:
                best, best_key = cand, key
    return best, None if best_key is None else (best_key[0], abs(best_key[1]))


def cross_validate(store, cfg, folds: int, length: int, budget: float) -> dict:
    """Pooled (experts, served) over `folds` routers, each tuned on its calib split, measured on its test split."""
    from imoe_ray.discovery.stage import load_model
    from imoe_ray.routing.router import ExpertProfile, adaptive_threshold
    from imoe_ray.routing.stage import load_corpus, load_router, make_encoder
    from imoe_ray.routing.train import train_router
    from imoe_ray.store.layout import split_of

    discovery = load_model(store)
    names = [c.name for c in discovery.categories]
    encoder = make_encoder(cfg)
    corpus = load_corpus(store, cfg, encoder, lambda m: None)
    served = load_router(store, cfg)   # its experts' routing keywords and which expert serves each category
    keywords = {p.category: p.keywords for p in served.profiles if p.category is not None}
    rc = cfg.router.model_copy(update={"test_fraction": 1.0 / folds})
    profiles = [ExpertProfile(c.name, c.id, keywords.get(c.id, []), c.centroid) for c in discovery.categories]
    pooled: dict[str, list[tuple[float, float, int]]] = {"fixed": [], "adaptive (default)": [],
                                                         "adaptive (tuned, fewest on a tie)": [], "adaptive (tuned)": []}
    for f in range(folds):
        split = np.array([split_of(i, rc.calib_fraction, rc.test_fraction, offset=f / folds) for i in corpus.ids])
        router, _, _ = train_router(corpus, names, profiles, discovery.threshold, rc, encoder, lambda m: None,
                                    discovery.text_features, split=split)
        router.served_by = served.served_by
        rows = {}
        for part in ("calib", "test"):
            keep = [i for i in np.flatnonzero(split == part) if corpus.texts[i].strip()]
            rows[part] = routed_rows(router, [corpus.texts[i] for i in keep], [names[corpus.labels[i]] for i in keep],
                                     encoder.tokenizer, length)
        default = adaptive_threshold(dict(router.settings, threshold_policy="adaptive"))
        tuned, _ = tune(router, rows["calib"], adaptive_grid(default), budget)
        frugal, _ = tune(router, rows["calib"], adaptive_grid(default), budget, on_tie="fewest")
        n = len(rows["test"])
        for name, policy in (("fixed", None), ("adaptive (default)", default),
                             ("adaptive (tuned, fewest on a tie)", frugal), ("adaptive (tuned)", tuned)):
            if not name.startswith("adaptive (tuned") or policy is not None:
                pooled[name].append((*score(router, rows["test"], policy), n))
        e, s_ = pooled["adaptive (tuned)"][-1][:2] if tuned is not None else (float("nan"), float("nan"))
        print(f"[bench] fold {f + 1}/{folds}: {n} test texts; tuned adaptive {e:.2f} experts, served {s_:.3f}", flush=True)
    out = {}
    for name, parts in pooled.items():
        n = sum(p[2] for p in parts)
        out[name] = {"experts": round(sum(p[0] * p[2] for p in parts) / max(1, n), 3),
                     "served": round(sum(p[1] * p[2] for p in parts) / max(1, n), 4), "texts": n}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="store")
    parser.add_argument("--lengths", default="8,16,24,32,whole", help="prefix lengths in encoder tokens")
    parser.add_argument("--tune-length", type=int, default=24, help="prefix length the grid search tunes on")
    parser.add_argument("--budget", type=float, default=1.5, help="most experts per request on the validation split")
    parser.add_argument("--output", default=None, help="also write the result as JSON here")
    parser.add_argument("--folds", type=int, default=None, help="cross-validate over this many folds instead")
    args = parser.parse_args()

    from imoe_ray.cli import resolve_config
    from imoe_ray.evaluation.heldout import store_heldout
    from imoe_ray.routing.router import adaptive_threshold
    from imoe_ray.routing.stage import load_router, make_encoder
    from imoe_ray.routing.threshold import AdaptiveThreshold
    from imoe_ray.store import Store

    cfg = resolve_config(args.store, None, None)
    store = Store(cfg.store, cache_dir=cfg.cache_dir)
    if args.folds is not None:
        if args.folds < 2:
            parser.error("--folds must be at least 2")
        result = cross_validate(store, cfg, args.folds, args.tune_length, args.budget)
        print(f"\ncross-validated over {args.folds} folds, {args.tune_length} tokens, budget {args.budget}: "
              "experts per request / gold category served")
        for name, r in result.items():
            print(f"  {name:>34}: {r['experts']:.2f} / {r['served']:.3f}  ({r['texts']} texts)")
        if args.output:
            with open(args.output, "w") as f:
                json.dump({"store": cfg.store, "folds": args.folds, "budget": args.budget,
                           "tokens": args.tune_length, "pooled": result}, f, indent=2)
        return
    router = load_router(store, cfg)
    tokenizer = make_encoder(cfg).tokenizer
    lengths = [None if x == "whole" else int(x) for x in args.lengths.split(",")]
    if args.tune_length not in lengths:
        lengths.append(args.tune_length)
    rows = {}
    for split in ("calib", "test"):
        texts, cats = store_heldout(store, cfg, split)
        keep = [i for i, c in enumerate(cats) if c != "none" and texts[i].strip()]
        texts, gold = [texts[i] for i in keep], [cats[i] for i in keep]
        print(f"[bench] {split}: routing {len(texts)} texts at {len(lengths)} lengths")
        rows[split] = {n: routed_rows(router, texts, gold, tokenizer, n) for n in lengths}

    settings_default = adaptive_threshold(dict(router.settings, threshold_policy="adaptive"))
    validation = rows["calib"][args.tune_length]
    tuned, key = tune(router, validation, adaptive_grid(settings_default), args.budget)
    fixed_candidates = {round(t, 3): AdaptiveThreshold(t, t, 1, 0.0, (1.0, 1.0, 1.0), None)
                        for t in np.arange(0.02, 0.61, 0.01)}
    fixed_policy, best_fixed_key = tune(router, validation, fixed_candidates.values(), args.budget)
    best_fixed = None if fixed_policy is None else round(fixed_policy.t_simple, 3)
    print(f"[bench] validation ({len(validation)} calib texts, {args.tune_length} tokens, budget {args.budget}):")
    print(f"  adaptive (config default now): {score(router, validation, settings_default)}")
    print(f"  adaptive tuned: {tuned} → served {key[0]:.3f}, experts {key[1]:.3f}" if tuned else "  adaptive: none fits")
    print(f"  fixed tuned: t_C {best_fixed} → served {best_fixed_key[0]:.3f}, experts {best_fixed_key[1]:.3f}"
          if best_fixed is not None else "  fixed: none fits")

    policies = {"fixed": None, "adaptive (default)": settings_default}
    if best_fixed is not None:
        policies[f"fixed {best_fixed}"] = AdaptiveThreshold(best_fixed, best_fixed, 1, 0.0, (1.0, 1.0, 1.0), None)
    if tuned is not None:
        policies["adaptive (tuned)"] = tuned
    result = {"store": cfg.store, "store_t_c": router.threshold, "tune_length": args.tune_length,
              "budget": args.budget, "tuned": tuned.__dict__ if tuned else None, "fixed_tuned": best_fixed,
              "test": {}}
    print(f"\ntest split ({len(rows['test'][lengths[0]])} texts): experts per request / gold category served")
    print(f"{'tokens':>7} | " + " | ".join(f"{p:>24}" for p in policies) + " | adaptive/fixed experts")
    for n in lengths:
        figures = {p: score(router, rows["test"][n], a) for p, a in policies.items()}
        result["test"]["whole" if n is None else str(n)] = {p: {"experts": round(e, 3), "served": round(s, 4)}
                                                            for p, (e, s) in figures.items()}
        ratio = figures["adaptive (tuned)"][0] / figures["fixed"][0] if tuned is not None else float("nan")
        print(f"{'whole' if n is None else n:>7} | " + " | ".join(f"{e:>11.2f} / {s:>10.3f}" for e, s in figures.values())
              + f" | {ratio:.2f}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
