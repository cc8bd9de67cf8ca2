"""Held-out perplexity of the base model, the dense baseline, the routed top-1 expert and the
routed top-k mixture (c-BTM), overall and per category.

Routing sees only the first `route_tokens` LM tokens of each held-out text; perplexity is measured
on the rest (conditioned on everything before it). The held-out text is the router's test split
of the store's own chunks (no model trained on it) unless a file is given.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from imoe_ray.config import Config
from imoe_ray.corpus.readers import CorpusError
from imoe_ray.evaluation.heldout import file_heldout, store_heldout
from imoe_ray.experts.mixture import (BASE, ExpertLM, Window, expert_prior, mix_logprobs, posterior_weights,
                                      top_k_weights, windows)
from imoe_ray.store import Store
from imoe_ray.store.mirror import StoreMirror
from imoe_ray.store.store import StoreError

MODELS = ("base", "dense", "top1", "served", "mixture_router", "mixture")
LABELS = {"base": "base model", "dense": "dense baseline", "top1": "routed top-1 expert",
          "served": "experts above t_C (as served)",
          "mixture_router": "top-k mixture (router weights)", "mixture": "top-k mixture (router x context)"}


def evaluate_lm(store: Store, cfg: Config, heldout: str | None = None, text_column: str | None = None,
                category_column: str | None = None, route_tokens: int = 32, top_k: int | None = None,
                max_texts: int | None = None, report=print) -> dict:
    from imoe_ray.routing.stage import load_router

    if not store.exists("experts", "index.json"):
        raise StoreError(f"no experts in {store.uri}: run `imoe build --store {store.uri} --until experts` first")
    top_k = top_k or cfg.experts.top_k
    if heldout:
        texts, categories = file_heldout(heldout, text_column or cfg.corpus.text_column, category_column)
    else:
        texts, categories = store_heldout(store, cfg)
    if max_texts:
        texts, categories = texts[:max_texts], (categories[:max_texts] if categories else None)
    index = store.read_json("experts", "index.json")
    whole = {e["name"] for e in index["experts"] if e.get("kind") == "model"}  # another vocabulary: not mixed here
    expert_of = {n: n for e in index["experts"] for n in [e["name"]] if n not in whole} | index.get("aliases", {})
    lm = ExpertLM.from_store(StoreMirror(store).root, threads=None)
    has_dense = "dense" in lm.names

    encoded = lm.encode(texts)
    first = 1 + route_tokens  # the EOS separator, then the routing tokens
    keep = [i for i, ids in enumerate(encoded) if len(ids) > first]
    if not keep:
        raise CorpusError(f"no held-out text is longer than {route_tokens} tokens: nothing to measure")
    report(f"[eval] {len(keep)} held-out texts ({len(texts) - len(keep)} shorter than {route_tokens + 1} tokens "
           f"skipped); routing on their first {route_tokens} tokens")
    encoded = [encoded[i] for i in keep]
    router = load_router(store, cfg)
    router.profiles = [p for p in router.profiles if p.name not in whole]
    routes = [router.route(lm.tokenizer.decode(ids[1:first])) for ids in encoded]
    if categories is None:
        categories = [r.all_probabilities and max(r.all_probabilities, key=r.all_probabilities.__getitem__) or "none"
                      for r in (router.route(texts[i]) for i in keep)]
    else:
        categories = [categories[i] for i in keep]
    router_mixes = [top_k_weights(r.all_probabilities, expert_of, top_k) if r.all_probabilities else {BASE: 1.0}
                    for r in routes]
    top1 = [max(m, key=m.__getitem__) for m in router_mixes]
    served = [served_weights(r.experts, r.all_probabilities, expert_of, top_k, bool(r.fallback)) for r in routes]
    mixes = _posterior_mixes(lm, encoded, first, routes, expert_of, top_k, report)

    wins = windows(encoded, first, lm.max_len)
    needed = defaultdict(list)  # model → window indices
    for w_i, w in enumerate(wins):
        for name in (set(mixes[w.text]) | set(router_mixes[w.text]) | set(served[w.text]) | {BASE}
                     | ({"dense"} if has_dense else set())):
            needed[name].append(w_i)
    scores: dict[str, dict[int, np.ndarray]] = {}
    for n_done, (name, idx) in enumerate(sorted(needed.items())):
        report(f"[eval] {name}: {len(idx)} windows ({n_done + 1}/{len(needed)})")
        scores[name] = dict(zip(idx, lm.target_logprobs(name, [wins[i] for i in idx])))

    per_text: list[dict[str, list[np.ndarray]]] = [defaultdict(list) for _ in encoded]
    for w_i, w in enumerate(wins):
        mix = mixes[w.text]
        per_text[w.text]["base"].append(scores[BASE][w_i])
        if has_dense:
            per_text[w.text]["dense"].append(scores["dense"][w_i])
        per_text[w.text]["top1"].append(scores[top1[w.text]][w_i])
        per_text[w.text]["mixture"].append(mix_logprobs([scores[e][w_i] for e in mix], list(mix.values())))
        s_mix = served[w.text]
        per_text[w.text]["served"].append(mix_logprobs([scores[e][w_i] for e in s_mix], list(s_mix.values())))
        r_mix = router_mixes[w.text]
        per_text[w.text]["mixture_router"].append(mix_logprobs([scores[e][w_i] for e in r_mix], list(r_mix.values())))
    out = _summary(per_text, categories, routes, top1, mixes, served, route_tokens, top_k, len(texts), lm.names)
    out["routing"]["category_expert_served"] = round(float(np.mean(
        [expert_of.get(c, c) in m for c, m in zip(categories, served)])), 4)
    out["threshold_policy"] = router.settings.get("threshold_policy", "fixed")
    return out


def served_weights(experts: list[str], probabilities: dict[str, float], expert_of: dict[str, str], top_k: int,
                   fallback: bool) -> dict[str, float]:
    """The mixture a served request decodes with (`serving.pipeline.Planner`): the experts the router's
    t_C policy chose (a fallback to every expert: the most probable first), at most `top_k`, weighted
    by the router's probabilities."""
    prior = expert_prior(probabilities, expert_of)
    ranked = sorted(experts, key=lambda e: -prior.get(e, 0.0)) if fallback else list(experts)
    chosen = ranked[:top_k] or [BASE]
    weights = {e: max(prior.get(e, 0.0), 1e-6) for e in chosen}
    total = sum(weights.values())
    return {e: w / total for e, w in weights.items()}


def _posterior_mixes(lm: ExpertLM, encoded: list[list[int]], first: int, routes, expert_of: dict[str, str],
                     top_k: int, report) -> list[dict[str, float]]:
    """Mixture weights from the router's probabilities times each expert's likelihood of the same
    routing tokens (Bayes' rule, as Branch-Train-Merge ensembles weight their experts)."""
    candidates = sorted(set(expert_of.values()))
    context = [Window(i, ids[:first], 1) for i, ids in enumerate(encoded)]
    report(f"[eval] scoring the routing tokens under {len(candidates)} experts")
    logprob = {e: [float(lp.sum()) for lp in lm.target_logprobs(e, context)] for e in candidates}
    return [posterior_weights(expert_prior(r.all_probabilities, expert_of) if r.all_probabilities else {},
                              {e: logprob[e][i] for e in candidates}, top_k) for i, r in enumerate(routes)]


def _ppl(logprobs: list[np.ndarray]) -> float:
    flat = np.concatenate(logprobs) if logprobs else np.empty(0)
    return round(float(math.exp(-flat.mean())), 3) if flat.size else float("nan")


def _summary(per_text: list[dict], categories: list[str], routes, top1, mixes, served, route_tokens: int,
             top_k: int, n_texts: int, loaded: list[str]) -> dict:
    models = [m for m in MODELS if per_text[0].get(m)]
    overall = {m: _ppl([lp for t in per_text for lp in t[m]]) for m in models}
    per_category: dict[str, dict[str, float]] = {}
    for cat in sorted(set(categories)):
        rows = [t for t, c in zip(per_text, categories) if c == cat]
        per_category[cat] = {"texts": len(rows), "tokens": int(sum(lp.size for t in rows for lp in t["base"]))}
        per_category[cat] |= {m: _ppl([lp for t in rows for lp in t[m]]) for m in models}
    out = {
        "texts": len(per_text), "texts_given": n_texts, "route_tokens": route_tokens, "top_k": top_k,
        "tokens_scored": int(sum(lp.size for t in per_text for lp in t["base"])),
        "perplexity": overall, "per_category": per_category,
        "routing": {"routed_to_category_expert": round(float(np.mean([e == c or c in m for e, c, m in zip(top1, categories, mixes)])), 4),
                    "experts_per_text": round(float(np.mean([len(m) for m in mixes])), 3),
                    "served_experts_per_text": round(float(np.mean([len(m) for m in served])), 3),
                    "to_base": int(sum(e == BASE for e in top1))},
        "experts_loaded": [n for n in loaded if n != "dense"],
    }
    if "dense" in overall:
        out["ratio_to_dense"] = {m: round(overall[m] / overall["dense"], 4) for m in overall if m != "dense"}
    return out


def plot_lm(result: dict, path: str | Path) -> None:
    """Grouped bars: perplexity of each model, overall and per category."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in MODELS if m in result["perplexity"]]
    groups = ["overall"] + list(result["per_category"])
    values = [[result["perplexity"][m] for m in models]] + [[result["per_category"][g][m] for m in models] for g in groups[1:]]
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(groups) + 2), 5))
    x = np.arange(len(groups))
    for j, m in enumerate(models):
        ax.bar(x + (j - (len(models) - 1) / 2) * width, [v[j] for v in values], width, label=LABELS[m])
    ax.set_xticks(x, [f"{g}\n({result['texts'] if g == 'overall' else result['per_category'][g]['texts']})" for g in groups],
                  rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("held-out perplexity (lower is better)")
    ratio = result.get("ratio_to_dense", {}).get("mixture")
    ax.set_title(f"Held-out perplexity; top-{result['top_k']} mixture / dense baseline = {ratio}" if ratio else "Held-out perplexity")
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=len(models), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
