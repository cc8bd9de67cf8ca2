"""The `base` and `experts` build stages.

`base`: the configured HF causal LM copied into `STORE/base`, or (the embedded default) a tokenizer
trained on the corpus and a small Llama pre-trained on every training chunk with Ray Train.
`experts`: one PEFT adapter per category, trained only on its shard, every expert its own Ray Train
job, run in parallel (Ray Tune over trainers); plus the dense baseline, one adapter of the same
kind trained on all shards for the experts' total token count. Held-out rows (the router's test
split, by input id) train nothing, so `imoe eval lm` can measure on them.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import ray

from imoe_ray.config import Config
from imoe_ray.experts import parallel
from imoe_ray.experts.adapters import describe
from imoe_ray.experts.base_model import fingerprint, llama_config, train_tokenizer
from imoe_ray.experts.data import count_tokens, token_blocks
from imoe_ray.experts.export import model_card
from imoe_ray.experts.train_loop import MODEL_DIR
from imoe_ray.store import Store
from imoe_ray.store.layout import BASE, DENSE, EXPERT_MANIFEST as MANIFEST, EXPERTS, EXPERTS_INDEX as INDEX, RUNS
from imoe_ray.store.layout import ExpertManifest, split_of

Report = Callable[[str], None]
BASE_SERVED = "base"  # what a category too small for an expert is served by when nothing is near


def is_heldout(row_id: str, cfg: Config) -> bool:
    return split_of(str(row_id), cfg.router.calib_fraction, cfg.router.test_fraction) == "test"



def _training_texts(table, cfg: Config) -> list[str]:
    ids = table.column("id").to_pylist()
    texts = table.column(cfg.corpus.text_column).to_pylist()
    return [t for i, t in zip(ids, texts) if not is_heldout(i, cfg) and t]


def split_chunks(store: Store, cfg: Config, split: str) -> list[tuple[str, str]]:
    """(text, chunk id) of the store's non-empty chunks in one of the router's splits (train, calib, test)."""
    table = store.read_table("corpus", "chunks", columns=["id", "chunk_id", cfg.corpus.text_column])
    return [(t, c) for i, c, t in zip(table.column("id").to_pylist(), table.column("chunk_id").to_pylist(),
                                      table.column(cfg.corpus.text_column).to_pylist())
            if t and split_of(str(i), cfg.router.calib_fraction, cfg.router.test_fraction) == split]


def heldout_texts(store: Store, cfg: Config) -> tuple[list[str], list[str]]:
    """The held-out chunks (texts, chunk ids): the router's test split, which no model trained on."""
    rows = split_chunks(store, cfg, "test")
    return [r[0] for r in rows], [r[1] for r in rows]


# ---- base -------------------------------------------------------------------------------------

def run_base(store: Store, cfg: Config, resume: bool, report: Report = print) -> dict:
    if cfg.experts.base_model:
        return _copy_base(store, cfg.experts.base_model, report)
    p = cfg.pretrain
    texts = _training_texts(store.read_table("corpus", "chunks", columns=["id", cfg.corpus.text_column]), cfg)
    if not texts:
        raise ValueError("no training text to pre-train a base model on (every row is held out?)")
    if not resume:
        store.remove(RUNS, BASE)
    tokenizer = _base_tokenizer(store, texts, p.vocab_size, report)
    inputs, labels = token_blocks(texts, tokenizer, p.seq_len)
    cpus = parallel.worker_cpus(p.cpus_per_worker, p.workers, cfg.ray.resources)
    model_config = llama_config(p, tokenizer)
    report(f"[base] pre-training a {p.layers}-layer Llama (hidden {p.hidden_size}, vocab {len(tokenizer)}) on "
           f"{count_tokens(labels):,} tokens x {p.epochs:g} epochs with {p.workers} worker(s) x {cpus} CPU")
    job = parallel.TrainJob(BASE, {
        "kind": "pretrain", "model_config": model_config, "blocks": ray.put((inputs, labels)),
        "epochs": p.epochs, "lr": p.lr, "batch_size": p.batch_size, "weight_decay": 0.1, "seed": p.seed,
        "threads": cpus, "strategy": "ddp", "zero_stage": 0, "reports": 20,
    }, workers=p.workers, cpus_per_worker=cpus, gpus_per_worker=1.0 if parallel.cluster_gpus() >= p.workers else 0.0,
        resources=cfg.ray.resources)
    started = time.perf_counter()

    def save(name: str, metrics: dict, checkpoint: str) -> dict:
        with tempfile.TemporaryDirectory() as d:
            target = Path(d) / BASE
            shutil.copytree(Path(checkpoint) / MODEL_DIR, target)
            tokenizer.save_pretrained(target)
            store.put_dir(target, BASE)
            return metrics | {"fingerprint": fingerprint(target)}

    metrics = parallel.run_one(job, parallel.Storage(store, (RUNS,)), cfg.experts.max_failures, save)
    n_params = sum(math.prod(v) for v in _param_shapes(model_config))
    report(f"[base] final training loss {metrics['loss']:.3f} ({metrics['tokens_per_s']:,.0f} tokens/s)")
    return {"source": "pretrained", "parameters": n_params, "vocab_size": len(tokenizer), "loss": metrics["loss"],
            "tokens": int(metrics["tokens"]), "tokens_per_s": metrics["tokens_per_s"], "fingerprint": metrics["fingerprint"],
            "wall_s": round(time.perf_counter() - started, 1)}


def _base_tokenizer(store: Store, texts: list[str], vocab_size: int, report: Report):
    """Train the tokenizer once per pre-training run (kept beside the run, so a resumed run reuses it)."""
    from transformers import AutoTokenizer

    if store.exists(RUNS, BASE, "tokenizer", "tokenizer.json"):
        return AutoTokenizer.from_pretrained(store.local_dir(RUNS, BASE, "tokenizer"))
    report(f"[base] training a {vocab_size}-token byte-level BPE tokenizer on {len(texts)} chunks")
    tokenizer = train_tokenizer(texts, vocab_size)
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        store.put_dir(d, RUNS, BASE, "tokenizer")
    return tokenizer


def _param_shapes(model_config: dict) -> list[tuple[int, ...]]:
    h, v, i, n = (model_config[k] for k in ("hidden_size", "vocab_size", "intermediate_size", "num_hidden_layers"))
    per_layer = [(h, h)] * 4 + [(h, i)] * 3 + [(h,)] * 2
    return [(v, h), (h,)] + per_layer * n


def _copy_base(store: Store, source: str, report: Report) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report(f"[base] using {source}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ValueError(f"experts.base_model={source!r} is not a loadable causal LM: {e}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)
        store.put_dir(d, BASE)
        fp = fingerprint(d)
    return {"source": source, "parameters": sum(p.numel() for p in model.parameters()), "fingerprint": fp}


# ---- experts ----------------------------------------------------------------------------------

def plan_experts(texts: dict[str, list[str]], centroids: dict[str, np.ndarray], min_chunks: int,
                 report: Report) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Which experts to train on which text; categories below `min_chunks` are folded into their
    nearest neighbour (by centroid), or served by the base when no category is big enough."""
    big = [n for n, t in texts.items() if len(t) >= min_chunks]
    plan = {n: list(texts[n]) for n in big}
    aliases: dict[str, str] = {}
    for name in (n for n in texts if n not in plan):
        if not big:
            aliases[name] = BASE_SERVED
            report(f"[experts] warning: category {name!r} has {len(texts[name])} training chunks (< {min_chunks}) "
                   f"and no category is big enough to take it: the base model serves it")
            continue
        near = max(big, key=lambda b: float(centroids[name] @ centroids[b]))
        plan[near].extend(texts[name])
        aliases[name] = near
        report(f"[experts] warning: category {name!r} has {len(texts[name])} training chunks (< {min_chunks}): "
               f"folded into its nearest neighbour {near!r}")
    return plan, aliases


def _texts_hash(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for t in texts:
        digest.update(hashlib.sha256(t.encode()).digest())
    return digest.hexdigest()[:16]


def run_experts(store: Store, cfg: Config, resume: bool, report: Report = print) -> dict:
    from transformers import AutoTokenizer

    from imoe_ray.discovery.stage import load_model
    from imoe_ray.sharding.stage import INDEX as SHARD_INDEX, SHARDS

    e = cfg.experts
    base_dir = store.local_dir(BASE)
    base_fp = store.read_json("manifests", "base.json")["metrics"]["fingerprint"]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    categories = {c.name: c for c in load_model(store).categories}
    shard_names = [c["name"] for c in store.read_json(*SHARD_INDEX)["categories"]]
    texts = {n: _training_texts(store.read_table(SHARDS, n, columns=["id", cfg.corpus.text_column]), cfg)
             for n in shard_names}
    centroids = {n: np.asarray(categories[n].centroid, np.float32) for n in shard_names}
    plan, aliases = plan_experts(texts, centroids, e.min_chunks, report)
    if not resume:
        for name in store.listdir(RUNS, EXPERTS):
            store.remove(RUNS, EXPERTS, name)

    seq_len = _seq_len(cfg, base_dir)
    blocks = {n: token_blocks(t, tokenizer, seq_len) for n, t in plan.items()}
    expert_tokens = {n: count_tokens(b[1]) for n, b in blocks.items()}
    settings = {"experts": e.model_dump(mode="json"), "base": base_fp, "seq_len": seq_len}
    jobs, targets = [], {}
    for name, (inputs, labels) in blocks.items():
        key = _job_key(settings, plan[name])
        targets[name] = (EXPERTS, name)
        if _is_current(store, targets[name], key):
            report(f"[experts] {name}: up to date, skipped")
            continue
        jobs.append(_job(name, key, inputs, labels, e.epochs, cfg, store, len(plan)))
    if e.dense_baseline and plan:
        union = _training_texts(store.read_table("corpus", "chunks", columns=["id", cfg.corpus.text_column]), cfg)
        inputs, labels = token_blocks(union, tokenizer, seq_len)
        epochs = e.epochs * sum(expert_tokens.values()) / max(1, count_tokens(labels))
        key = _job_key(settings | {"dense_epochs": epochs}, union)
        targets["dense"] = DENSE
        if _is_current(store, DENSE, key):
            report("[experts] dense baseline: up to date, skipped")
        else:
            jobs.append(_job("dense", key, inputs, labels, epochs, cfg, store, len(plan)))
    # Experts installed from `.expert` packages (`imoe experts install`) are not the build's: keep them.
    previous = store.read_json(*INDEX) if store.exists(*INDEX) else {"experts": []}
    installed = [e for e in previous.get("experts", []) if "package" in e and e["name"] not in plan]
    for stale in set(store.listdir(EXPERTS)) - set(plan) - {"index.json"} - {e["name"] for e in installed}:
        store.remove(EXPERTS, stale)

    info = {n: {"categories": [n] + [a for a, b in aliases.items() if b == n], "rows": len(plan[n]),
                "tokens": expert_tokens[n]} for n in plan}
    if jobs:
        # Longest first (the dense baseline, then the biggest shards): the last wave ends together.
        jobs.sort(key=lambda j: -j.loop_config["epochs"] * j.loop_config["tokens"])
        concurrent = e.max_concurrent or max(1, int(parallel.cluster_cpus()) // (e.workers_per_expert * e.cpus_per_worker))
        report(f"[experts] training {len(jobs)} job(s) ({', '.join(j.name for j in jobs)}), "
               f"{min(concurrent, len(jobs))} at a time; progress per expert in the table below")
        started = time.perf_counter()
        saver = _Saver(store, cfg, categories, info, base_fp, targets)
        parallel.run_parallel(jobs, parallel.Storage(store, (RUNS, EXPERTS)), concurrent, e.max_failures, saver)
        wall = round(time.perf_counter() - started, 1)
    else:
        wall = 0.0
    index = {"experts": [{"name": n, **info[n]} for n in plan] + installed, "aliases": aliases, "base_fingerprint": base_fp,
             "dense_baseline": "/".join(DENSE) if "dense" in targets else None}
    store.write_json(index, *INDEX)
    _save_routing_keywords(store, categories, info)
    trained = {n: store.read_json(*targets[n], MANIFEST)["training"] for n in targets}
    for name, t in trained.items():
        report(f"[experts] {name:<32} rows {info.get(name, {}).get('rows', '-')!s:>6}  tokens {t['tokens']:>9,}  "
               f"loss {t['loss']:.3f}")
    return {"experts": len(plan), "aliases": aliases, "wall_s": wall,
            "expert_tokens": sum(expert_tokens.values()), "training": trained}


def _save_routing_keywords(store: Store, categories: dict, info: dict) -> None:
    """The trained experts' routing keywords (their categories' discovery keywords) where the router
    reads keyword priors: `router/experts.json` profiles of known categories (the router stage saved
    its profiles without keywords). Profiles of installed packages (no category) are kept."""
    from imoe_ray.routing.stage import EXTRA_EXPERTS

    previous = store.read_json(*EXTRA_EXPERTS) if store.exists(*EXTRA_EXPERTS) else []
    kept = [p for p in previous if p.get("category") is None]
    served = {c for n in info for c in info[n]["categories"]}
    trained = [{"name": c.name, "category": c.id, "keywords": list(c.keywords), "centroid": list(c.centroid)}
               for c in sorted(categories.values(), key=lambda c: c.id) if c.name in served]
    store.write_json(trained + kept, *EXTRA_EXPERTS)


def _seq_len(cfg: Config, base_dir: Path) -> int:
    config = json.loads((base_dir / "config.json").read_text())
    return min(cfg.pretrain.seq_len, int(config.get("max_position_embeddings") or cfg.pretrain.seq_len))


def _job_key(settings: dict, texts: list[str]) -> str:
    payload = json.dumps(settings, sort_keys=True) + _texts_hash(texts)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _is_current(store: Store, target: tuple[str, ...], key: str) -> bool:
    return store.exists(*target, MANIFEST) and store.read_json(*target, MANIFEST).get("training_key") == key


def base_source(store: Store, cfg: Config) -> dict[str, str | None]:
    """How a Train worker on any node finds the base model: the store's URI (it fetches `base/` into
    its own cache), never a path on the driver's disk."""
    return {"store": store.uri, "cache_dir": cfg.cache_dir}


def _job(name: str, key: str, inputs: np.ndarray, labels: np.ndarray, epochs: float, cfg: Config,
         store: Store, n_experts: int) -> parallel.TrainJob:
    e = cfg.experts
    gpus = e.gpus_per_worker
    if gpus is None:
        total = parallel.cluster_gpus()
        gpus = min(1.0, total / max(1, min(n_experts, e.max_concurrent or n_experts))) if total else 0.0
    return parallel.TrainJob(f"{name}-{key}", label=name, loop_config={
        "kind": "adapter", "base": base_source(store, cfg), "experts": e.model_dump(mode="json"),
        "blocks": ray.put((inputs, labels)), "epochs": epochs, "lr": e.lr, "batch_size": e.batch_size,
        "weight_decay": 0.0, "seed": e.seed, "threads": e.cpus_per_worker, "strategy": e.strategy,
        "zero_stage": e.zero_stage, "reports": 10, "min_report_s": e.checkpoint_s, "training_key": key, "expert": name,
        "tokens": count_tokens(labels),
    }, workers=e.workers_per_expert, cpus_per_worker=e.cpus_per_worker, gpus_per_worker=gpus,
        resources=cfg.ray.resources)


class _Saver:
    """Runs inside each finished trial: stores the adapter with its manifest (temp, then rename)."""

    def __init__(self, store: Store, cfg: Config, categories: dict, info: dict, base_fp: str, targets: dict):
        self.store_uri, self.cfg, self.info, self.base_fp, self.targets = store.uri, cfg, info, base_fp, targets
        self.categories = {n: {"id": c.id, "keywords": c.keywords, "centroid": c.centroid} for n, c in categories.items()}

    def __call__(self, job_name: str, metrics: dict, checkpoint: str) -> dict:
        name = job_name.rsplit("-", 1)[0]
        key = job_name.rsplit("-", 1)[1]
        store = Store(self.store_uri)
        manifest = self._manifest(name, key, metrics)
        with tempfile.TemporaryDirectory() as d:
            target = Path(d) / name
            shutil.copytree(Path(checkpoint) / MODEL_DIR, target)
            (target / MANIFEST).write_text(json.dumps(manifest, indent=2))
            (target / "README.md").write_text(model_card(manifest))  # PEFT's empty template otherwise
            store.put_dir(target, *self.targets[name])
        return {"loss": metrics["loss"], "tokens": metrics["tokens"]}

    def _manifest(self, name: str, key: str, metrics: dict) -> dict:
        e = self.cfg.experts
        training = {k: metrics[k] for k in ("loss", "tokens", "steps", "tokens_per_s", "resumed_from_step") if k in metrics}
        training |= {"wall_s": metrics.get("wall_s"), "epochs": metrics.get("epochs")}
        out = {"name": name, "kind": "dense-baseline" if name == "dense" else "expert",
               "base_model": {"name": e.base_model or "store:base", "fingerprint": self.base_fp},
               "adapter": describe(e), "training": training, "training_key": key,
               "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if name in self.categories:
            c = self.categories[name]
            out |= {"category": {"id": c["id"], "name": name}, "categories": self.info[name]["categories"],
                    "routing": {"keywords": c["keywords"], "priority": 0},
                    "centroid": c["centroid"], "rows": self.info[name]["rows"]}
        return ExpertManifest.model_validate(out).to_json()
