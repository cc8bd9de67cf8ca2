"""`imoe eval retrieval`: P@K, R@K, MRR@10 and MAP of vector, full-text and hybrid search over the
store's knowledge bases, on held-out query-like views (a prefix, a sentence, key terms: the router's
views) whose relevant item is their source chunk; and what prompt compression keeps.

Compression is judged on the prompt a request would get: the query and its top-`pool` hybrid
passages. Each compressor (selective, filler baseline) shortens that prompt; the compressed passages
are re-indexed (a temporary LanceDB table, one pool per query) and searched again, hybrid, with the
compressed query. `r@5_retained` is the compressed R@5 over the uncompressed R@5 of the same
procedure on the same pools (so the pool itself is not what is measured).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import pyarrow as pa

from imoe_ray.config import Config
from imoe_ray.retrieval.fusion import configured
from imoe_ray.retrieval.knowledge_base import KnowledgeBase, KnowledgeBaseError
from imoe_ray.store import Store

KS = (1, 5, 10)
MODES: tuple[Literal["vector", "text", "hybrid"], ...] = ("vector", "text", "hybrid")


def ranking_metrics(ranked: list[list[str]], relevant: list[set[str]]) -> dict[str, float]:
    """P@k, R@k (k = 1, 5, 10), MRR@10 and MAP (over the top 10) of ranked id lists."""
    out: dict[str, float] = {}
    n = max(len(ranked), 1)
    for k in KS:
        out[f"p@{k}"] = sum(len(set(r[:k]) & rel) / k for r, rel in zip(ranked, relevant)) / n
        out[f"r@{k}"] = sum(len(set(r[:k]) & rel) / max(len(rel), 1) for r, rel in zip(ranked, relevant)) / n
    mrr = ap = 0.0
    for r, rel in zip(ranked, relevant):
        hits = 0
        first = next((i for i, c in enumerate(r[:10], 1) if c in rel), None)
        mrr += 1.0 / first if first else 0.0
        precision_sum = 0.0
        for i, c in enumerate(r[:10], 1):
            if c in rel:
                hits += 1
                precision_sum += hits / i
        ap += precision_sum / max(min(len(rel), 10), 1)
    out["mrr@10"], out["map"] = mrr / n, ap / n
    return {k: round(v, 4) for k, v in out.items()}


def kb_chunks(kb: KnowledgeBase) -> dict[str, set[str]]:
    """Input row id → the chunk ids the knowledge base holds for it."""
    out: dict[str, set[str]] = {}
    for name in kb.names():
        t = kb.table(name).to_arrow().select(["chunk_id", "id"])
        for cid, rid in zip(t.column("chunk_id").to_pylist(), t.column("id").to_pylist()):
            out.setdefault(str(rid), set()).add(cid)
    return out


def heldout_queries(store: Store, cfg: Config, kb: KnowledgeBase, heldout: str | None, text_column: str | None,
                    max_queries: int | None, tokenizer) -> tuple[list[str], list[set[str]], list[str]]:
    """(queries, relevant chunk ids, kind of view). Default: the store's held-out chunks (the router's
    test rows), each chunk's views relevant to that chunk; with a file: its rows' views, relevant to the
    knowledge base's chunks of the same row id (rows the store does not hold are skipped)."""
    if heldout:
        from imoe_ray.corpus.readers import read_corpus_table

        column = text_column or cfg.corpus.text_column
        table = read_corpus_table(heldout, text_column=column, id_column=cfg.corpus.id_column)
        by_id = kb_chunks(kb)
        rows = [(t, by_id[str(i)]) for t, i in zip(table.column(column).to_pylist(), table.column("id").to_pylist())
                if str(i) in by_id]
        if not rows:
            raise KnowledgeBaseError(f"no row of {heldout} is in the store's knowledge base (matched by id): "
                                     f"nothing to retrieve; pass held-out rows of the corpus the store was built from")
    else:
        from imoe_ray.experts.stage import split_chunks

        rows = [(t, {c}) for t, c in split_chunks(store, cfg, "test")]
        if not rows:
            raise KnowledgeBaseError("the store has no held-out chunks (router.test_fraction is 0?): pass --heldout")
    return view_queries(rows, cfg, tokenizer, max_queries, cfg.router.seed)


def view_queries(rows: list[tuple[str, set[str]]], cfg: Config, tokenizer, max_queries: int | None,
                 seed: int) -> tuple[list[str], list[set[str]], list[str]]:
    """Query-like views (the router's: a prefix, a sentence, key terms) of (text, relevant ids) rows,
    at most `max_queries` of them, drawn at random."""
    from imoe_ray.routing.views import chunk_views

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(rows))
    texts, relevant = [rows[i][0] for i in order], [rows[i][1] for i in order]
    views = chunk_views(texts, np.arange(len(texts)), tokenizer, rng, cfg.router.prefix_tokens, cfg.router.key_terms)
    queries, rel, kinds = views.texts, [relevant[i] for i in views.labels], views.kinds
    if max_queries and len(queries) > max_queries:
        pick = np.sort(rng.choice(len(queries), max_queries, replace=False))
        queries, rel, kinds = [queries[i] for i in pick], [rel[i] for i in pick], [kinds[i] for i in pick]
    return queries, rel, kinds


def calibrate_fusion(store: Store, cfg: Config, kb: KnowledgeBase, tokenizer, report: Callable[[str], None] = print):
    """The hybrid-search weight of a knowledge base, chosen on views of the router's calibration
    chunks (the training chunks when there is no calibration split), never on the test chunks."""
    from imoe_ray.experts.stage import split_chunks
    from imoe_ray.retrieval.fusion import Fusion, calibrate

    rc = cfg.retrieval
    split = "calib" if cfg.router.calib_fraction > 0 else "train"
    rows = [(t, {c}) for t, c in split_chunks(store, cfg, split)]
    if not rows:
        return Fusion(rc.fusion, 0.5, rc.rrf_k, {"queries": 0, "source": f"no {split} chunks: not calibrated"})
    queries, relevant, _ = view_queries(rows, cfg, tokenizer, rc.calibration_queries, cfg.router.seed + 1)
    vectors = kb.embed(queries)
    depth = max(rc.candidates, 10)  # as `evaluate_retrieval` searches
    pairs = kb.candidates_many(queries, vectors, depth)
    fusion = calibrate(pairs, relevant, rc.fusion, rc.rrf_k, source=f"views of the {split} chunks", depth=depth)
    c = fusion.calibration
    report(f"hybrid fusion ({rc.fusion}) calibrated on {len(queries)} views of {split} chunks: vector weight "
           f"{fusion.vector_weight} (MRR@10 {c['mrr@10'][str(fusion.vector_weight)]} vs text {c['text_only_mrr@10']}, "
           f"vector {c['vector_only_mrr@10']})")
    return fusion


def reembedded(kb: KnowledgeBase, embed: Callable[[list[str]], np.ndarray], directory: Path) -> KnowledgeBase:
    """A copy of the knowledge base with every passage embedded again by another encoder."""
    import lancedb

    db = lancedb.connect(str(directory))
    for name in kb.names():
        t = kb.table(name).to_arrow()
        vectors = embed(t.column(kb.text_column).to_pylist())
        column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1])
        db.create_table(name, data=t.set_column(t.schema.get_field_index("embedding"), "embedding", column))
    return KnowledgeBase(directory, embed, kb.text_column)


def encode_ms_per_passage(kb: KnowledgeBase, embed: Callable[[list[str]], np.ndarray], n: int = 64) -> float:
    """The encoder's cost on the store's own passages (up to `n`, batches of 64, after a warm-up batch)."""
    texts: list[str] = []
    for name in kb.names():
        texts += kb.table(name).to_arrow().column(kb.text_column).to_pylist()[: n - len(texts)]
        if len(texts) >= n:
            break
    if not texts:
        return 0.0
    embed(texts[:8])
    started = time.perf_counter()
    embed(texts)
    return round(1000 * (time.perf_counter() - started) / len(texts), 3)


def evaluate_retrieval(store: Store, cfg: Config, heldout: str | None = None, text_column: str | None = None,
                       encoder: str | None = None, max_queries: int | None = 300, compression_queries: int = 100,
                       pool: int = 10, report: Callable[[str], None] = print) -> dict:
    from imoe_ray.compression.filler import FillerCompressor
    from imoe_ray.compression.selective import SelectiveCompressor
    from imoe_ray.embedding.encoder import Encoder

    rc = cfg.retrieval
    enc = Encoder(encoder or cfg.embedding.encoder, max_tokens=cfg.embedding.max_tokens, device="cpu")
    def embed(texts: list[str]) -> np.ndarray:
        return enc.encode(texts, batch_size=64)

    kb = KnowledgeBase(store.path("kb") if store.is_local else store.uri_of("kb"), embed, cfg.corpus.text_column)
    with tempfile.TemporaryDirectory(prefix="imoe-eval-kb-") as tmp:
        if encoder:
            report(f"re-embedding the knowledge base with {encoder}")
            kb = reembedded(kb, embed, Path(tmp) / "kb")
            if rc.vector_weight is None and rc.calibration_queries:  # another encoder: another weight
                kb.fusion = calibrate_fusion(store, cfg, kb, enc.tokenizer, report)
        kb.fusion = configured(kb.fusion, rc)
        queries, relevant, kinds = heldout_queries(store, cfg, kb, heldout, text_column, max_queries, enc.tokenizer)
        report(f"{len(queries)} held-out queries over {len(kb.names())} knowledge-base tables")
        vectors = embed(queries)
        result: dict = {"queries": len(queries), "views": {k: kinds.count(k) for k in sorted(set(kinds))},
                        "tables": len(kb.names()), "encoder": encoder or cfg.embedding.encoder,
                        "encode_ms_per_passage": encode_ms_per_passage(kb, embed), "fusion": kb.fusion.to_json()}
        hybrid_hits = []
        for mode in MODES:
            hits = [kb.search(q, k=max(10, pool), mode=mode, candidates=max(rc.candidates, 10), vector=v)
                    for q, v in zip(queries, vectors)]
            result[mode] = ranking_metrics([[p.chunk_id for p in h] for h in hits], relevant)
            if mode == "hybrid":
                hybrid_hits = hits
        n = min(compression_queries, len(queries))
        if n and store.exists("base", "config.json"):
            selective = SelectiveCompressor(store.local_dir("base"))
            filler = FillerCompressor(selective.count)
            prompts = [(queries[i], [p.text for p in hybrid_hits[i][:pool]], [p.chunk_id for p in hybrid_hits[i][:pool]])
                       for i in range(n)]
            report(f"compression: {n} prompts of a query and its top-{pool} passages")
            plain = _pool_recall(prompts, prompts, relevant[:n], embed, Path(tmp) / "pools-none", kb.fusion)
            for key, compressor in (("compression", selective), ("compression_baseline", filler)):
                out = [compressor.reduce(q, passages, rc.compression_ratio) for q, passages, _ in prompts]
                squeezed = [(c.question, c.passages, ids) for c, (_, _, ids) in zip(out, prompts)]
                r5 = _pool_recall(prompts, squeezed, relevant[:n], embed, Path(tmp) / f"pools-{key}", kb.fusion)
                original, kept = sum(c.original_tokens for c in out), sum(c.compressed_tokens for c in out)
                result[key] = {"method": "selective" if compressor is selective else "filler",
                               "ratio": round(original / max(kept, 1), 3), "r@5_retained": round(r5 / plain, 4) if plain else None,
                               "r@5": round(r5, 4), "r@5_uncompressed": round(plain, 4), "prompts": n,
                               "original_tokens": original, "compressed_tokens": kept}
        else:
            report("compression not measured: " + ("--compression-queries is 0" if not n else
                                                   "the store has no base model (`imoe build --until base`)"))
            for key in ("compression", "compression_baseline"):
                result[key] = {"ratio": None, "r@5_retained": None, "prompts": 0}
    return result


def _pool_recall(original: list, prompts: list, relevant: list[set[str]], embed, directory: Path, fusion) -> float:
    """R@5 of hybrid search, within each query's own pool of (possibly compressed) passages."""
    import lancedb

    rows: dict[str, list] = {"chunk_id": [], "id": [], "text": [], "pool": []}
    for i, (_, passages, ids) in enumerate(prompts):
        for text, cid in zip(passages, ids):
            rows["chunk_id"].append(cid)
            rows["id"].append(cid)
            rows["text"].append(text or " ")
            rows["pool"].append(i)
    if not rows["text"]:
        return 0.0
    vectors = embed(rows["text"])
    table = pa.table(rows).append_column(
        "embedding", pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1]))
    lancedb.connect(str(directory)).create_table("pools", data=table)
    kb = KnowledgeBase(directory, embed, "text", fusion=fusion)
    query_vectors = embed([q or " " for q, _, _ in prompts])
    ranked = [[p.chunk_id for p in kb.search(q, k=5, mode="hybrid", where=f"pool = {i}", vector=v)]
              for i, ((q, _, _), v) in enumerate(zip(prompts, query_vectors))]
    return ranking_metrics(ranked, relevant)["r@5"]


def plot_retrieval(result: dict, path: str | Path) -> None:
    """Retrieval quality per search mode (grouped bars per metric) and compression, ours against the
    filler-word baseline (ratio reached and R@5 of the source chunk kept)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("vector", "text", "hybrid") if m in result]
    metrics = list(result[modes[0]]) if modes else []
    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [2.4, 1]})
    width = 0.8 / max(1, len(modes))
    for i, mode in enumerate(modes):
        a.bar(np.arange(len(metrics)) + i * width, [result[mode][m] for m in metrics], width, label=mode)
    a.set_xticks(np.arange(len(metrics)) + width * (len(modes) - 1) / 2, metrics)
    a.set_ylim(0, 1.18)
    a.set_title(f"Retrieval of the source chunk ({result.get('queries', '?')} held-out query views)")
    a.legend(frameon=False, ncol=len(modes), loc="upper center")
    a.grid(axis="y", alpha=0.3)
    rows = [(k, result[k]) for k in ("compression", "compression_baseline") if result.get(k)]
    if rows:
        labels = ["selective (ours)" if k == "compression" else "filler words" for k, _ in rows]
        b.bar(np.arange(len(rows)) - 0.2, [r["ratio"] for _, r in rows], 0.4, label="ratio (tokens before / after)")
        twin = b.twinx()
        twin.bar(np.arange(len(rows)) + 0.2, [r["r@5_retained"] or 0 for _, r in rows], 0.4, color="tab:green",
                 label="R@5 kept")
        twin.set_ylim(0, 1.3)
        b.set_ylim(0, max(r["ratio"] for _, r in rows) * 1.3)
        b.set_xticks(np.arange(len(rows)), labels)
        b.set_title("Prompt compression")
        b.legend(loc="upper left", frameon=False, fontsize=8)
        twin.legend(loc="upper right", frameon=False, fontsize=8)
    else:
        b.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
