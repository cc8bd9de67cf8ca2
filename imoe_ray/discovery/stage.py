"""The discover stage: embeddings → categories (`discovery/model.json`) and `assignments.parquet`."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pyarrow as pa

from imoe_ray.config import Config
from imoe_ray.discovery.discover import Discovery, discover
from imoe_ray.embedding.ray_embed import embeddings_matrix
from imoe_ray.embedding.stage import read_embeddings
from imoe_ray.store import Store
from imoe_ray.store.tensors import arrays_from_bytes as load_arrays
from imoe_ray.store.tensors import arrays_to_bytes as save_arrays
from imoe_ray.store.store import StoreError

from imoe_ray.store.layout import ASSIGNMENTS, DISCOVERY_MODEL as MODEL

WEIGHTS = ("discovery", "weights.safetensors")


def load_chunks_with_embeddings(store: Store, cfg: Config) -> tuple[pa.Table, np.ndarray]:
    """The chunks (in a fixed order) and their embeddings, row for row."""
    text = cfg.corpus.text_column
    chunks = store.read_table("corpus", "chunks", columns=["chunk_id", "id", "chunk_index", "n_tokens", text])
    emb = read_embeddings(store)
    position = {cid: i for i, cid in enumerate(emb.column("chunk_id").to_pylist())}
    missing = [cid for cid in chunks.column("chunk_id").to_pylist() if cid not in position]
    if missing:
        raise StoreError(f"{len(missing)} chunks have no embedding (e.g. {missing[0]!r}): re-run `imoe build --until embed`")
    order = np.array([position[cid] for cid in chunks.column("chunk_id").to_pylist()], dtype=np.int64)
    return chunks, embeddings_matrix(emb)[order]


def complexity_scores(chunks: pa.Table, max_tokens: int) -> np.ndarray:
    """c_S in [0, 1]: a chunk's share of the longest possible chunk (longer, denser text counts as more complex)."""
    n = chunks.column("n_tokens").to_numpy(zero_copy_only=False).astype(np.float64)
    return np.clip(n / max(1, max_tokens), 0.0, 1.0)


def assignments_table(chunks: pa.Table, model: Discovery, memberships: np.ndarray, complexity: np.ndarray) -> pa.Table:
    top, categories = model.assign(memberships, complexity)
    return pa.table({
        "id": chunks.column("id"),
        "chunk_id": chunks.column("chunk_id"),
        "chunk_index": chunks.column("chunk_index"),
        "top_category": pa.array(top.astype(np.int64)),
        "categories": pa.array([[int(c) for c in row] for row in categories], pa.list_(pa.int64())),
        "memberships": pa.array([row.tolist() for row in memberships.astype(np.float32)], pa.list_(pa.float32())),
    })


def run(store: Store, cfg: Config, resume: bool, report: Callable[[str], None] = print) -> dict:
    chunks, embeddings = load_chunks_with_embeddings(store, cfg)
    texts = chunks.column(cfg.corpus.text_column).to_pylist()
    model, memberships = discover(embeddings, texts, cfg.discovery, progress=report)
    table = assignments_table(chunks, model, memberships, complexity_scores(chunks, cfg.corpus.chunk_tokens))
    save_model(store, model)
    store.write_table(table, *ASSIGNMENTS)
    top = table.column("top_category").to_numpy()
    return {
        "n_categories": len(model.categories),
        "noise_fraction": float(np.mean(top < 0)),
        "sizes": {c.name: int(np.sum(top == c.id)) for c in model.categories},
    }


def save_model(store: Store, model: Discovery) -> None:
    """The arrays first, the JSON last: a model.json on disk always has its weights beside it."""
    store.write_bytes(save_arrays(model.arrays()), *WEIGHTS)
    store.write_json(model.to_json(), *MODEL)


def load_model(store: Store) -> Discovery:
    if not store.exists(*MODEL) or not store.exists(*WEIGHTS):
        raise StoreError(f"no discovery in {store.uri}: run `imoe build --until discover` first")
    return Discovery.from_parts(store.read_json(*MODEL), load_arrays(store.read_bytes(*WEIGHTS)))
