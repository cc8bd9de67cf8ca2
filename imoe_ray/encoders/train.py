"""Train the MoE encoder as a Ray Train job (one worker, a plain PyTorch loop) and save it at
`STORE/encoders/moe` with its manifest (`imoe_moe.json`: settings, training metrics, utilisation).

Only the training rows of the corpus are used (not the router's held-out split), so held-out
retrieval judges text the encoder never saw.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, cast

import numpy as np
import torch

from imoe_ray.config import Config
from imoe_ray.store import Store
from imoe_ray.store.store import StoreError

ENCODERS, MOE = "encoders", "moe"
MODEL_DIR = "model"


def training_chunks(store: Store, cfg: Config) -> list[tuple[str, int, str, str]]:
    """(document id, chunk index, text, chunk id) of the store's non-empty training chunks (held-out split excluded);
    a `StoreError` (a user error: one line, exit 2) when there are fewer than 2 to pair."""
    from imoe_ray.experts.stage import is_heldout

    column = cfg.corpus.text_column
    names = ["id", "chunk_index", column, "chunk_id"]
    table = store.read_table("corpus", "chunks", columns=names)
    rows = [(str(i), c, t, k) for i, c, t, k in zip(*(table.column(n).to_pylist() for n in names))
            if t and not is_heldout(i, cfg)]
    if len(rows) < 2:
        raise StoreError(f"{store.path('corpus', 'chunks')} has {len(rows)} non-empty training chunk(s) of "
                         f"{table.num_rows} (the held-out split, router.test_fraction={cfg.router.test_fraction}, "
                         f"is excluded): the encoder needs at least 2 to mine pairs; build the store from a "
                         f"larger corpus")
    return rows


def chunk_topics(store: Store, chunk_ids: list[str]) -> list[int]:
    """Each chunk's discovered top category where the discover stage has run (-1 elsewhere)."""
    from imoe_ray.discovery.stage import ASSIGNMENTS

    if not store.exists(*ASSIGNMENTS):
        return [-1] * len(chunk_ids)
    table = store.read_table(*ASSIGNMENTS, columns=["chunk_id", "top_category"])
    known = dict(zip(table.column("chunk_id").to_pylist(), table.column("top_category").to_pylist()))
    return [int(known.get(c, -1)) for c in chunk_ids]


def mine_pairs(store: Store, cfg: Config, tokenizer):
    """The label-free pairs of the store's training chunks (labels are used only to form batches)."""
    from imoe_ray.encoders.contrastive import Pairs, neighbour_pairs, view_pairs

    ids, index, texts, chunk_ids = (list(x) for x in zip(*training_chunks(store, cfg)))
    topics = chunk_topics(store, chunk_ids)
    pairs = Pairs()
    if "views" in cfg.moe_encoder.pairs:
        rng = np.random.default_rng(cfg.moe_encoder.seed)
        view_pairs(ids, texts, tokenizer, rng, cfg.router.prefix_tokens, cfg.router.key_terms, pairs, topics)
    if "neighbours" in cfg.moe_encoder.pairs:
        neighbour_pairs(ids, index, texts, pairs, topics)
    return pairs, texts


def train_loop(config: dict) -> None:
    """The Ray Train worker: upcycle the dense encoder, train it on the pairs, report the saved model."""
    import ray.train
    import ray.train.torch
    from transformers import AutoModel, AutoTokenizer

    from imoe_ray.encoders.loop import embed, fit
    from imoe_ray.encoders.moe import reset_utilisation, save_moe, upcycle, utilisation

    m = config["moe"]
    torch.set_num_threads(config["threads"])
    torch.manual_seed(m["seed"])
    device = ray.train.torch.get_device()
    tokenizer = AutoTokenizer.from_pretrained(config["encoder_path"])
    model = upcycle(AutoModel.from_pretrained(config["encoder_path"]), m["n_experts"], m["top_k"], m["every"],
                    m["capacity_factor"], m["noise"], m["seed"]).to(device)

    def progress(metrics: dict) -> None:
        ray.train.report(metrics)
        print(f"[encoder] step {metrics['step']}/{metrics['steps']}: loss {metrics['loss']:.3f}, "
              f"balance loss {metrics['aux_loss']:.3f}", file=sys.stderr, flush=True)  # stdout: the CLI's JSON

    pairs = cast("tuple[list[str], list[str], list[str], list[int]]", config["pairs"])  # anchors, positives, groups, topics
    metrics = fit(model, tokenizer, *pairs, m, device, progress)
    train_share = utilisation(model)
    reset_utilisation(model)
    with torch.inference_mode():  # inference utilisation: how the chunks themselves are routed
        texts = config["sample_texts"]
        for i in range(0, len(texts), 32):
            embed(model, tokenizer, texts[i:i + 32], m["max_tokens"], device)
    with tempfile.TemporaryDirectory() as d:
        save_moe(model.cpu(), tokenizer, Path(d) / MODEL_DIR,
                 extra={"settings": m, "base_encoder": config["encoder_name"], "metrics": metrics,
                        "utilisation": utilisation(model), "train_utilisation": train_share})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def require_chunks(store: Store, cfg: Config | None = None) -> None:
    """The store has chunks (and, given `cfg`, at least 2 training chunks): checked before Ray starts."""
    if not store.exists("corpus", "chunks"):
        raise FileNotFoundError(f"{store.path('corpus', 'chunks')} does not exist: build the store first "
                                f"(imoe build --corpus FILE --store {store.uri} --until ingest)")
    if cfg is not None:
        training_chunks(store, cfg)


def train_encoder(store: Store, cfg: Config, report: Callable[[str], None] = print) -> dict:
    """Mine pairs, run the Ray Train job, commit `STORE/encoders/moe`; returns its manifest."""
    import json

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from transformers import AutoTokenizer

    from imoe_ray.embedding.encoder import resolve_encoder_path
    from imoe_ray.encoders.contrastive import batch_mode
    from imoe_ray.encoders.moe import MOE_FILE
    from imoe_ray.experts.parallel import Storage, cluster_gpus, worker_cpus

    require_chunks(store)
    m = cfg.moe_encoder
    path = resolve_encoder_path(cfg.embedding.encoder)
    pairs, texts = mine_pairs(store, cfg, AutoTokenizer.from_pretrained(path))
    report(f"[encoder] {len(pairs)} pairs ({', '.join(f'{k}: {pairs.kinds.count(k)}' for k in sorted(set(pairs.kinds)))}) "
           f"in {len(set(pairs.topics) - {-1})} discovered categories: {batch_mode(m.batches, pairs.topics)} batches")
    cpus = worker_cpus(m.cpus, 1, cfg.ray.resources)
    rng = np.random.default_rng(m.seed)
    sample = [texts[i] for i in rng.permutation(len(texts))[:m.utilisation_chunks]]
    use_gpu = cluster_gpus() >= 1
    settings = m.resolved(gpu=use_gpu, passage_tokens=cfg.embedding.max_tokens)
    report(f"[encoder] {'GPU' if use_gpu else 'CPU'} worker: {settings['steps']} steps x {settings['batch_size']} "
           f"pairs, {settings['max_tokens']} tokens")
    run_name = f"encoder-moe-{int(time.time())}"
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"moe": settings, "encoder_path": path, "encoder_name": cfg.embedding.encoder,
                           "pairs": (pairs.anchors, pairs.positives, pairs.groups, pairs.topics), "sample_texts": sample,
                           "threads": cpus},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus} | dict(cfg.ray.resources)),
        run_config=RunConfig(name=run_name, **Storage(store, ("runs",)).run_config_args()),
    )
    started = time.perf_counter()
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        manifest = json.loads((Path(d) / MODEL_DIR / MOE_FILE).read_text())
        manifest["pair_kinds"] = {k: pairs.kinds.count(k) for k in sorted(set(pairs.kinds))}
        manifest["metrics"]["wall_s"] = round(time.perf_counter() - started, 1)
        (Path(d) / MODEL_DIR / MOE_FILE).write_text(json.dumps(manifest, indent=2))
        store.put_dir(Path(d) / MODEL_DIR, ENCODERS, MOE)
    store.remove("runs", run_name)  # the run's checkpoint is a full copy of the model
    mt = manifest["metrics"]
    report(f"[encoder] loss {mt['first_loss']:.3f} → {mt['loss']:.3f}, balance loss {mt['aux_loss']:.3f}; "
           f"saved {store.path(ENCODERS, MOE)}")
    return manifest
