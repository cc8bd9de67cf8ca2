"""Does the summarizer ground two drafts in one answer that obeys both? Measured on held-out synthetic
cases (made like the training cases, from the router's test split of every shard, which trained nothing).

Answers compared, for the same cases:
- `constrained`: plan and copy (`imoe_ray.fusion.constrained`): the drafts' directives and content read
  from the drafts alone, the summarizer adapter decoding under the copy constraint, greedy;
- `summarizer`: the summarizer adapter, greedy, on the summarizer prompt, unconstrained;
- `base`: the base model on the same prompt, without the adapter;
- `task_draft`, `constraint_draft`: one draft alone; `best_draft`: per case, the better of the two;
- `concatenation`: both drafts one after the other, in prompt order.

Metrics (each the mean over the cases it applies to):
- `term_recall`: share of the required terms the answer contains (whole words, any case);
- `all_terms`: share of cases whose answer contains every required term;
- `length_ok`: share of length-bounded cases whose answer has at most that many words;
- `faithfulness`: unigram F1 between the answer and the reference answer (task content kept);
- `on_task`: share of cases with faithfulness >= `ON_TASK`;
- `obeys_both`: share of cases that meet every constraint and are on task;
- `reference_nll` (models only): mean negative log-likelihood per token of the reference answer.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from imoe_ray.config import Config
from imoe_ray.fusion.constrained import finish, make_steer, max_answer_tokens, plan_fusion
from imoe_ray.fusion.summarizer import (Case, generate, has_term, load_summarizer, reference_nll, context_length,
                                        fits, synthesize_cases)
from imoe_ray.store import Store
from imoe_ray.store.mirror import StoreMirror
from imoe_ray.store.store import StoreError

SYSTEMS = ("constrained", "summarizer", "base", "task_draft", "constraint_draft", "best_draft", "concatenation")
LABELS = {"constrained": "summarizer, plan + copy", "summarizer": "summarizer, free",
          "base": "base model, same prompt", "task_draft": "task draft alone",
          "constraint_draft": "constraint draft alone", "best_draft": "best single draft (per case)",
          "concatenation": "concatenated drafts"}
METRICS = ("term_recall", "all_terms", "length_ok", "faithfulness", "on_task", "obeys_both")
ON_TASK = 0.5
EVAL_KINDS = (0.6, 0.2, 0.2, 0.0)  # two drafts in every held-out case: a task and a constraint
EVAL_SEED_OFFSET = 1_000_003  # held-out cases never share a random stream with training cases


def _words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z0-9_]+", text.lower())]


def unigram_f1(answer: str, reference: str) -> float:
    a, r = _words(answer), _words(reference)
    if not a or not r:
        return 0.0
    common = sum(min(a.count(w), r.count(w)) for w in set(a))
    if not common:
        return 0.0
    p, q = common / len(a), common / len(r)
    return 2 * p * q / (p + q)


def score(answer: str, case: Case) -> dict[str, float | None]:
    """One answer's scores on one case (None where a metric does not apply)."""
    found = [has_term(answer, t) for t in case.terms]
    length_ok = len(answer.split()) <= case.max_words if case.max_words is not None else None
    f1 = unigram_f1(answer, case.reference)
    out = {"term_recall": float(np.mean(found)) if found else None, "all_terms": float(all(found)) if found else None,
           "length_ok": float(length_ok) if length_ok is not None else None, "faithfulness": f1,
           "on_task": float(f1 >= ON_TASK)}
    out["obeys_both"] = float(all(found) and length_ok is not False and f1 >= ON_TASK)
    return out


def _combined(s: dict) -> float:
    return float(np.mean([v for v in s.values() if v is not None]))


def aggregate(per_case: list[dict]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for m in METRICS:
        values = [s[m] for s in per_case if s[m] is not None]
        out[m] = round(float(np.mean(values)), 4) if values else None
    return out


def eval_cases(store: Store, cfg: Config, tokenizer, n: int, max_len: int) -> list[Case]:
    f = cfg.fusion
    from imoe_ray.fusion.stage import expert_texts

    texts = expert_texts(store, cfg, heldout=True)
    if sum(bool(t) for t in texts.values()) < 2:
        raise StoreError("fewer than two experts have held-out chunks: no held-out fusion case can be made")
    # Candidates are cheap; many do not fit a small model's context, so make plenty.
    cases = synthesize_cases(texts, 200 * n, f.seed + EVAL_SEED_OFFSET, words=f.max_words,
                             question_words=f.question_words, draft_words=f.draft_words, kinds=EVAL_KINDS)
    return fits(tokenizer, cases, max_len)[:n]


def evaluate_summarizer(store: Store, cfg: Config, n_cases: int | None = None, max_new_tokens: int = 40,
                        examples: int = 3, report=print) -> dict:
    from imoe_ray.fusion.summarizer import FUSION_DIR, SUMMARIZER

    if not store.exists(FUSION_DIR, SUMMARIZER, "adapter_config.json"):
        raise StoreError(f"no summarizer in {store.uri}: run `imoe build --store {store.uri}` "
                         f"with fusion.summarizer: true (the `summarizer` stage)")
    model, tokenizer = load_summarizer(StoreMirror(store).root)
    max_len = min(context_length(model), cfg.fusion.max_tokens)  # the training cases' length limit
    cases = eval_cases(store, cfg, tokenizer, n_cases or cfg.fusion.eval_cases, max_len)
    if not cases:
        raise StoreError(f"no held-out fusion case fits the summarizer's {max_len}-token limit: lower "
                         f"fusion.draft_words, fusion.question_words or fusion.max_words")
    report(f"[eval] {len(cases)} held-out fusion cases; generating with the summarizer and the base model")
    prompts = [c.prompt for c in cases]
    answers = {"summarizer": generate(model, tokenizer, prompts, max_new_tokens)}
    nll = {"summarizer": reference_nll(model, tokenizer, cases)}
    plans = [plan_fusion(c.question, c.drafts, cfg.fusion.answer_words, cfg.fusion.salient_terms) for c in cases]
    steers = [make_steer(p, tokenizer, [tokenizer.eos_token_id], cfg.fusion.copy_bias, cfg.fusion.stop) for p in plans]
    steered = generate(model, tokenizer, prompts, max(max_answer_tokens(s) for s in steers), steers=steers)
    answers["constrained"] = [finish(a, p) for a, p in zip(steered, plans)]
    with model.disable_adapter():
        answers["base"] = generate(model, tokenizer, prompts, max_new_tokens)
        nll["base"] = reference_nll(model, tokenizer, cases)
    answers["task_draft"] = [c.drafts[c.task][1] for c in cases]
    answers["constraint_draft"] = [c.drafts[1 - c.task][1] for c in cases]
    answers["concatenation"] = [" ".join(t for _, t in c.drafts) for c in cases]
    per_case = {name: [score(a, c) for a, c in zip(answers[name], cases)] for name in answers}
    per_case["best_draft"] = [max(t, k, key=_combined) for t, k in zip(per_case["task_draft"], per_case["constraint_draft"])]
    result = {name: aggregate(per_case[name]) for name in SYSTEMS}
    for name in nll:  # the constrained answers are scored as text only: their likelihood is the summarizer's
        result[name]["reference_nll"] = round(float(np.mean(nll[name])), 4)
    summary = {
        "cases": len(cases),
        "with_terms": sum(bool(c.terms) for c in cases),
        "with_length_bound": sum(c.max_words is not None for c in cases),
        "on_task_threshold": ON_TASK,
        "systems": result,
        "examples": [{"prompt": c.prompt, "reference": c.reference, "constrained": answers["constrained"][i],
                      "summarizer": answers["summarizer"][i], "base": answers["base"][i]}
                     for i, c in enumerate(cases[:examples])],
    }
    manifest = store.read_json(FUSION_DIR, SUMMARIZER, "manifest.json")
    summary["training"] = manifest.get("training", {})
    return summary


def plot_summarizer(result: dict, path: str | Path) -> None:
    """Grouped bars: every metric of every system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = [s for s in SYSTEMS if s in result["systems"]]
    width = 0.8 / len(systems)
    x = np.arange(len(METRICS))
    fig, ax = plt.subplots(figsize=(10, 4.8))
    for j, s in enumerate(systems):
        values = [result["systems"][s][m] or 0.0 for m in METRICS]
        ax.bar(x + (j - (len(systems) - 1) / 2) * width, values, width, label=LABELS[s])
    ax.set_xticks(x, [m.replace("_", " ") for m in METRICS])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share (higher is better)")
    ax.set_title(f"Summarizer on {result['cases']} held-out fusion cases: obeys both = "
                 f"{result['systems']['constrained']['obeys_both']:.2f} plan + copy, "
                 f"{result['systems']['summarizer']['obeys_both']:.2f} free (best baseline "
                 f"{max(result['systems'][s]['obeys_both'] for s in systems if s not in ('constrained', 'summarizer')):.2f})")
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
