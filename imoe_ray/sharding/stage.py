"""The shard stage: classify every chunk, write `shards/<category>/` (Parquet) and `kb/` (LanceDB).

A chunk goes to every category above t_C; a chunk in none goes to every category (flagged
`fallback`), so no text is lost to the experts. The classifier is the trained router (its cascade,
run on the per-layer states the embed stage kept, so no chunk is encoded twice); a store without
a router falls back to the discovery model's memberships.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from imoe_ray.config import Config
from imoe_ray.discovery.stage import ASSIGNMENTS, load_chunks_with_embeddings, load_model
from imoe_ray.store import Store

from imoe_ray.store.layout import KB, SHARDS, SHARDS_INDEX as INDEX


def in_category(categories: pa.ChunkedArray | pa.Array, category: int) -> pa.Array:
    """Row-wise: does the chunk belong to `category`? Chunks in no category belong to all."""
    lists = categories.combine_chunks() if isinstance(categories, pa.ChunkedArray) else categories
    hit = np.zeros(len(lists), dtype=bool)
    flat = pc.equal(pc.list_flatten(lists), category).to_numpy(zero_copy_only=False)
    hit[pc.list_parent_indices(lists).to_numpy()[flat]] = True
    hit |= pc.equal(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
    return pa.array(hit)


def _router_categories(store: Store, cfg: Config) -> tuple[pa.Array, pa.Array] | None:
    """(top_category, categories) of every chunk by the trained router, or None without a router."""
    from imoe_ray.routing.stage import MODEL, load_corpus, load_router

    if not store.exists(*MODEL):
        return None
    router = load_router(store, cfg, with_encoder=False)
    corpus = load_corpus(store, cfg, encoder=None, report=lambda _m: None)
    probs = router.decide_states(corpus.texts, corpus.layer_states).probabilities
    chosen = [[int(c) for c in np.argsort(-row) if row[c] >= router.threshold] for row in probs]
    top = [c[0] if c else -1 for c in chosen]
    return pa.array(top, pa.int64()), pa.array(chosen, pa.list_(pa.int64()))


def shard_table(store: Store, cfg: Config) -> tuple[pa.Table, str]:
    """Every chunk with all its input columns, its categories, and its embedding; and the classifier used."""
    full = store.read_table("corpus", "chunks")
    chunks, embeddings = load_chunks_with_embeddings(store, cfg)
    assignments = store.read_table(*ASSIGNMENTS, columns=["chunk_id", "top_category", "categories"])
    if assignments.column("chunk_id").to_pylist() != chunks.column("chunk_id").to_pylist():
        raise RuntimeError("assignments.parquet does not match corpus/chunks: re-run `imoe build --until discover`")
    routed = _router_categories(store, cfg)
    top, categories = routed or (assignments.column("top_category"), assignments.column("categories"))
    order = pc.index_in(chunks.column("chunk_id"), value_set=full.column("chunk_id"))
    full = full.take(order)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1), pa.float32()), embeddings.shape[1])
    table = (full.append_column("top_category", top)
                 .append_column("categories", categories)
                 .append_column("embedding", vectors))
    return table, "router" if routed else "discovery"


def _write_kb(store: Store, cfg: Config, names: dict[int, str], table: pa.Table,
              report: Callable[[str], None]) -> dict:
    """The per-category LanceDB tables, and the hybrid-search fusion calibrated on them."""
    import lancedb  # imported late: its runtime must not be loaded before Ray forks workers

    import tempfile

    text = cfg.corpus.text_column
    # Built beside the store's KB and renamed into place on a local disk; built locally and uploaded
    # (then committed by the stage's manifest) on an object store.
    scratch = None if store.is_local else tempfile.TemporaryDirectory(prefix="imoe-kb-")
    temp = scratch.name if scratch else store.temp_path(KB)
    db = lancedb.connect(temp)
    for cid, name in names.items():
        rows = table.filter(in_category(table.column("categories"), cid))
        kb = db.create_table(name, data=rows.select(["chunk_id", "id", text, "embedding"]))
        kb.create_fts_index(text, use_tantivy=False, replace=True)  # native BM25 index: hybrid search
    fusion = _calibrate_fusion(store, cfg, temp, report) if cfg.retrieval.calibration_queries else None
    if scratch:
        store.put_dir(temp, KB)
        scratch.cleanup()
    else:
        store.commit(temp, KB)
    return {"fusion_vector_weight": fusion.vector_weight if fusion else None}


def _calibrate_fusion(store: Store, cfg: Config, kb_dir: str, report: Callable[[str], None]):
    from imoe_ray.embedding.encoder import Encoder
    from imoe_ray.retrieval.evaluate import calibrate_fusion
    from imoe_ray.retrieval.fusion import save_fusion
    from imoe_ray.retrieval.knowledge_base import KnowledgeBase

    encoder = Encoder(cfg.embedding.encoder, max_tokens=cfg.embedding.max_tokens, device="cpu")
    kb = KnowledgeBase(kb_dir, lambda texts: encoder.encode(texts, batch_size=64), cfg.corpus.text_column)
    fusion = calibrate_fusion(store, cfg, kb, encoder.tokenizer, report)
    save_fusion(kb_dir, fusion)
    return fusion


def run(store: Store, cfg: Config, resume: bool, report: Callable[[str], None] = print) -> dict:
    model = load_model(store)
    names = {c.id: c.name for c in model.categories}
    table, classifier = shard_table(store, cfg)
    ds = ray.data.from_arrow(table)
    store.clean_temps(SHARDS)
    sizes = {}
    for cid, name in names.items():
        temp = store.temp_path(SHARDS, name)
        part = ds.map_batches(lambda batch, c=cid: batch.filter(in_category(batch.column("categories"), c)),
                              batch_format="pyarrow")
        part.write_parquet(temp, filesystem=store.fs)
        store.commit(temp, SHARDS, name)
        sizes[name] = store.read_table(SHARDS, name, columns=["chunk_id"]).num_rows
    for stale in set(store.listdir(SHARDS)) - set(names.values()) - {"index.json"}:
        store.remove(SHARDS, stale)
    kb_metrics = {}
    if cfg.sharding.write_lancedb:
        kb_metrics = _write_kb(store, cfg, names, table, report)
    fallback = int(pc.sum(pc.equal(pc.list_value_length(table.column("categories")), 0)).as_py() or 0)
    index = {"categories": [{"id": cid, "name": name, "rows": sizes[name]} for cid, name in names.items()],
             "fallback_rows": fallback, "classifier": classifier}
    store.write_json(index, *INDEX)
    return {"shard_rows": sizes, "fallback_rows": fallback, "classifier": classifier, **kb_metrics}

