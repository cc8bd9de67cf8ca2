"""The `summarizer` build stage: synthetic fusion cases from the experts' shards (training rows only),
then one PEFT LoRA adapter on the base LM trained on them with the experts' Ray Train loop, stored
as `STORE/fusion/summarizer/` with a manifest. Skipped when `fusion.summarizer` is false, and when
the stored summarizer was trained with the same settings, base model and data."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from imoe_ray.config import Config, ExpertsConfig
from imoe_ray.store import Store

from imoe_ray.store.layout import EXPERT_MANIFEST as MANIFEST, RUNS

Report = Callable[[str], None]


def expert_texts(store: Store, cfg: Config, heldout: bool) -> dict[str, list[str]]:
    """Each expert's shard texts, its training rows (or the held-out rows: the router's test split);
    a folded category's shard goes to the expert that serves it."""
    from imoe_ray.experts.stage import INDEX, is_heldout
    from imoe_ray.sharding.stage import SHARDS

    index = store.read_json(*INDEX)
    experts = [e["name"] for e in index["experts"]]
    served_by = {n: n for n in experts} | {a: b for a, b in index.get("aliases", {}).items() if b in experts}
    out: dict[str, list[str]] = {}
    for category, expert in served_by.items():
        if not store.exists(SHARDS, category):
            continue
        table = store.read_table(SHARDS, category, columns=["id", cfg.corpus.text_column])
        out.setdefault(expert, []).extend(
            t for i, t in zip(table.column("id").to_pylist(), table.column(cfg.corpus.text_column).to_pylist())
            if t and is_heldout(str(i), cfg) == heldout)
    return out


def adapter_settings(cfg: Config) -> ExpertsConfig:
    """The summarizer's adapter as the train loop builds it: plain LoRA (what serving's bank loads)."""
    f = cfg.fusion
    return ExpertsConfig(adapter="lora", r=f.r, alpha=f.alpha, dropout=f.dropout, target_modules=f.target_modules,
                         output_layer=False)


def run(store: Store, cfg: Config, resume: bool, report: Report = print) -> dict:
    import ray
    from transformers import AutoTokenizer

    from imoe_ray.experts import parallel
    from imoe_ray.experts.data import count_tokens
    from imoe_ray.experts.stage import BASE, _is_current, _job_key, _seq_len, base_source
    from imoe_ray.fusion.summarizer import FUSION_DIR, SUMMARIZER, fits, synthesize_cases, training_rows

    f = cfg.fusion
    target = (FUSION_DIR, SUMMARIZER)
    if not f.summarizer:
        if store.exists(*target):
            store.remove(*target)
        report("[summarizer] fusion.summarizer is false: no summarizer trained (serving fuses with the mixture)")
        return {"trained": False}
    base_dir = store.local_dir(BASE)
    base_fp = store.read_json("manifests", "base.json")["metrics"]["fingerprint"]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    texts = expert_texts(store, cfg, heldout=False)
    max_len = min(_seq_len(cfg, base_dir), f.max_tokens)
    made = synthesize_cases(texts, f.examples, f.seed, words=f.max_words, question_words=f.question_words,
                            draft_words=f.draft_words)
    cases = fits(tokenizer, made, max_len)
    if not cases:
        raise ValueError(f"no synthetic summarizer case fits {max_len} tokens: lower fusion.draft_words")
    inputs, labels = training_rows(cases, tokenizer, max_len)
    adapter = adapter_settings(cfg)
    key = _job_key({"fusion": f.model_dump(mode="json"), "base": base_fp, "max_len": max_len},
                   [c.prompt + "\n" + c.reference for c in cases])
    if _is_current(store, target, key):
        report("[summarizer] up to date, skipped")
        return {"trained": True, "skipped": True, "cases": len(cases)} | store.read_json(*target, MANIFEST)["training"]
    if not resume:
        store.remove(RUNS, FUSION_DIR)
    cpus = parallel.worker_cpus(f.cpus_per_worker, 1, cfg.ray.resources)
    report(f"[summarizer] training a LoRA summarizer (r={f.r}) on {len(cases)} synthetic fusion cases "
           f"({len(made) - len(cases)} longer than {max_len} tokens dropped), {count_tokens(labels):,} answer tokens "
           f"x {f.epochs:g} epochs, 1 worker x {cpus} CPU")
    job = parallel.TrainJob(f"{SUMMARIZER}-{key}", label=SUMMARIZER, loop_config={
        "kind": "adapter", "base": base_source(store, cfg), "experts": adapter.model_dump(mode="json"),
        "blocks": ray.put((inputs, labels)), "epochs": f.epochs, "lr": f.lr, "batch_size": f.batch_size,
        "weight_decay": 0.0, "seed": f.seed, "threads": cpus, "strategy": "ddp", "zero_stage": 0, "reports": 10,
    }, workers=1, cpus_per_worker=cpus, gpus_per_worker=1.0 if parallel.cluster_gpus() >= 1 else 0.0,
        resources=cfg.ray.resources)
    started = time.perf_counter()

    def save(name: str, metrics: dict, checkpoint: str) -> dict:
        from imoe_ray.experts.train_loop import MODEL_DIR

        training = {k: metrics[k] for k in ("loss", "tokens", "steps", "tokens_per_s", "epochs") if k in metrics}
        training |= {"cases": len(cases), "wall_s": round(time.perf_counter() - started, 1)}
        manifest = {"name": SUMMARIZER, "kind": "summarizer",
                    "base_model": {"name": cfg.experts.base_model or "store:base", "fingerprint": base_fp},
                    "adapter": {"type": "lora", "target_modules": adapter.target_modules, "r": adapter.r,
                                "alpha": adapter.alpha, "dropout": adapter.dropout},
                    "prompt": {"function": "imoe_ray.fusion.summarizer.summarizer_prompt", "answer_after": "Answer:",
                               "separator": "EOS before the prompt, a space before the answer, EOS after it"},
                    "training": training, "training_key": key, "settings": f.model_dump(mode="json"),
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / SUMMARIZER
            shutil.copytree(Path(checkpoint) / MODEL_DIR, out)
            (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
            store.put_dir(out, *target)
        return training

    training = parallel.run_one(job, parallel.Storage(store, (RUNS, FUSION_DIR)), cfg.experts.max_failures, save)
    report(f"[summarizer] final training loss {training['loss']:.3f} on {len(cases)} cases "
           f"({training['tokens_per_s']:,.0f} answer tokens/s), stored in {FUSION_DIR}/{SUMMARIZER}")
    return {"trained": True, "cases": len(cases)} | training
