"""`imoe eval encoder`: the MoE encoder side by side with the dense encoder it came from.

Held-out query→chunk retrieval: the queries are query-like views (prefix, sentence, key terms) of the
store's held-out chunks (the router's test split, which no encoder trained on); each query's relevant
item is its source chunk, searched by cosine among ALL the store's chunks. Reported per encoder:
P@K, R@K, MRR@10, MAP, `encode_ms_per_passage` (all chunks, same batch size and threads), and for a
MoE encoder the share of tokens each expert got while encoding the chunks (plus a bar plot).
With labels (a label column of the chunks or of the corpus file), also the discovery NMI of each
encoder: the store's discovery (same code, same `discovery` settings) run on that encoder's
embeddings of all chunks, its categories scored against the labels as `imoe eval discovery` does.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from imoe_ray.config import Config
from imoe_ray.store import Store


def heldout_view_queries(store: Store, cfg: Config, tokenizer, max_queries: int | None) -> tuple[list[str], list[set[str]], list[str]]:
    """(queries, relevant chunk ids, view kinds) from the store's held-out chunks."""
    from imoe_ray.experts.stage import heldout_texts
    from imoe_ray.routing.views import chunk_views

    texts, chunk_ids = heldout_texts(store, cfg)
    if not texts:
        raise ValueError("the store has no held-out chunks (router.test_fraction is 0?)")
    rng = np.random.default_rng(cfg.router.seed)
    views = chunk_views(texts, np.arange(len(texts)), tokenizer, rng, cfg.router.prefix_tokens, cfg.router.key_terms)
    queries, relevant, kinds = views.texts, [{chunk_ids[int(i)]} for i in views.labels], views.kinds
    if max_queries and len(queries) > max_queries:
        pick = np.sort(rng.choice(len(queries), max_queries, replace=False))
        queries, relevant, kinds = [queries[i] for i in pick], [relevant[i] for i in pick], [kinds[i] for i in pick]
    return queries, relevant, kinds


def evaluate_one(encoder, chunk_texts: list[str], chunk_ids: list[str], queries: list[str],
                 relevant: list[set[str]], batch_size: int = 64,
                 on_passages: Callable[[np.ndarray], dict] | None = None) -> dict:
    """Ranking metrics, encode cost and (MoE) utilisation of one loaded `Encoder`; `on_passages`
    (e.g. discovery NMI) gets the chunks' embeddings and its dict is merged into the result."""
    from imoe_ray.encoders.moe import moe_layers, reset_utilisation, utilisation
    from imoe_ray.retrieval.evaluate import ranking_metrics

    is_moe = bool(moe_layers(encoder.model))
    if is_moe:
        reset_utilisation(encoder.model)
    encoder.encode(chunk_texts[:batch_size], batch_size)  # warm-up: first-call allocations are not encode cost
    if is_moe:
        reset_utilisation(encoder.model)
    started = time.perf_counter()
    passages = encoder.encode(chunk_texts, batch_size)
    ms = 1000 * (time.perf_counter() - started) / max(1, len(chunk_texts))
    out: dict = {}
    if is_moe:
        out["utilisation"] = utilisation(encoder.model)
        out["min_expert_share"] = min(min(layer["share"]) for layer in out["utilisation"])
    q = encoder.encode(queries, batch_size)
    top = np.argsort(-(q @ passages.T), axis=1)[:, :10]
    ranked = [[chunk_ids[j] for j in row] for row in top]
    extra = on_passages(passages) if on_passages else {}
    return ranking_metrics(ranked, relevant) | {"encode_ms_per_passage": round(ms, 3)} | out | extra


def chunk_labels(store: Store, cfg: Config, label_column: str, labels_path: str | None = None) -> dict[str, str]:
    """Document id → label: from the corpus file `labels_path` (as `imoe eval discovery` reads it), or
    from the store's chunks when they kept `label_column` (ingest passes extra columns through)."""
    from imoe_ray.corpus.readers import CorpusError
    from imoe_ray.evaluation.discovery import read_labels

    if labels_path:
        return read_labels(labels_path, label_column, cfg)
    table = store.read_table("corpus", "chunks")
    if label_column not in table.column_names:
        raise CorpusError(f"the store's chunks have no column {label_column!r} (columns: {', '.join(table.column_names)}): "
                          f"pass the corpus file it was built from with --labels")
    return {str(i): str(v) for i, v in zip(table.column("id").to_pylist(), table.column(label_column).to_pylist())
            if v is not None}


def discovery_scores(embeddings: np.ndarray, chunks, cfg: Config, labels: dict[str, str], source: str) -> dict:
    """The store's discovery (`discovery.discover`, `cfg.discovery`) on these embeddings of `chunks`
    (a table with id, n_tokens and the text column, row for row), scored against `labels`."""
    from imoe_ray.discovery.discover import discover
    from imoe_ray.discovery.stage import complexity_scores
    from imoe_ray.evaluation.discovery import label_scores

    texts = chunks.column(cfg.corpus.text_column).to_pylist()
    model, memberships = discover(embeddings, texts, cfg.discovery)
    top, _ = model.assign(memberships, complexity_scores(chunks, cfg.corpus.chunk_tokens))
    return label_scores([str(i) for i in chunks.column("id").to_pylist()], top, labels, source)


def compare_encoders(store: Store, cfg: Config, moe: str, baseline: str | None = None,
                     max_queries: int | None = 600, report=print, label_column: str | None = None,
                     labels_path: str | None = None) -> dict:
    """The dense baseline (default: embedding.encoder) and `moe` on the same held-out queries; with
    `label_column`, also each one's discovery NMI against those labels."""
    from imoe_ray.embedding.encoder import Encoder

    column = cfg.corpus.text_column
    table = store.read_table("corpus", "chunks", columns=["chunk_id", "id", "n_tokens", column])
    chunk_texts, chunk_ids = table.column(column).to_pylist(), table.column("chunk_id").to_pylist()
    result: dict = {"chunks": len(chunk_ids), "encoders": {}}
    on_passages: Callable[[np.ndarray], dict] | None = None
    if label_column:
        labels = chunk_labels(store, cfg, label_column, labels_path)
        source = labels_path or f"{label_column} of the store's chunks"
        result["labels"] = {"column": label_column, "source": labels_path or "store chunks"}

        def on_passages(passages: np.ndarray) -> dict:
            found = discovery_scores(passages, table, cfg, labels, source)
            return {"nmi": found["nmi"], "discovery": found}
    for name, path in (("dense", baseline or cfg.embedding.encoder), ("moe", moe)):
        enc = Encoder(path, max_tokens=cfg.embedding.max_tokens, device="cpu", num_threads=cfg.embedding.num_threads)
        if "queries" not in result:
            queries, relevant, kinds = heldout_view_queries(store, cfg, enc.tokenizer, max_queries)
            result["queries"] = len(queries)
            result["views"] = {k: kinds.count(k) for k in sorted(set(kinds))}
        report(f"[eval encoder] {name}: {path} on {len(queries)} queries over {len(chunk_ids)} chunks"
               + (" + discovery" if on_passages else ""))
        result["encoders"][name] = {"encoder": path} | evaluate_one(enc, chunk_texts, chunk_ids, queries, relevant,
                                                                    on_passages=on_passages)
    dense, sparse = result["encoders"]["dense"], result["encoders"]["moe"]
    result["mrr@10_gain_points"] = round(100 * (sparse["mrr@10"] - dense["mrr@10"]), 2)
    result["encode_cost_ratio"] = round(sparse["encode_ms_per_passage"] / max(dense["encode_ms_per_passage"], 1e-9), 3)
    result["min_expert_share"] = sparse.get("min_expert_share")
    if label_column:
        result["nmi"] = {"dense": dense["nmi"], "moe": sparse["nmi"], "change": round(sparse["nmi"] - dense["nmi"], 4)}
    return result


def plot_utilisation(utilisation: list[dict], path: str | Path) -> None:
    """One bar chart per MoE layer: the share of tokens each expert got (5% line = the target floor)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(utilisation), figsize=(3.2 * len(utilisation), 3.2), squeeze=False, sharey=True)
    for ax, layer in zip(axes[0], utilisation):
        share = layer["share"]
        ax.bar(range(len(share)), share, color="tab:blue")
        ax.axhline(1 / len(share), color="grey", linestyle="--", linewidth=1, label="uniform")
        ax.axhline(0.05, color="tab:red", linestyle=":", linewidth=1, label="5% floor")
        ax.set_title(f"layer {layer['layer']}")
        ax.set_xlabel("expert")
        ax.set_xticks(range(len(share)))
    axes[0][0].set_ylabel("share of tokens")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
