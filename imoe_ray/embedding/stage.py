"""The embed stage: every chunk of `corpus/chunks` → `embeddings/part-*.parquet` (chunk_id, embedding).

Parts are written one at a time, each atomically, into `embeddings.partial/` as batches stream out
of the actor pool; a run killed midway keeps its finished parts and the next run embeds only the
chunks they lack. The finished folder replaces `embeddings/` in one rename, so the previous complete
embeddings stay usable until then.
"""

from __future__ import annotations

from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import ray

from imoe_ray.config import Config
from imoe_ray.embedding.ray_embed import embed_dataset
from imoe_ray.store import Store
from imoe_ray.store.store import StoreError

FINAL_DIR = "embeddings"
STAGING_DIR = "embeddings.partial"


def _read_parts(store: Store, folder: str, columns: list[str] | None = None) -> pa.Table | None:
    parts = [p for p in store.listdir(folder) if p.endswith(".parquet")]
    if not parts:
        return None
    return pa.concat_tables([store.read_table(folder, p, columns=columns) for p in parts])


def _done_chunk_ids(store: Store) -> pa.Array:
    done = _read_parts(store, STAGING_DIR, columns=["chunk_id"])
    return done.column("chunk_id").combine_chunks() if done is not None else pa.array([], pa.string())


def _blocks(table: pa.Table, max_rows: int, min_blocks: int = 8) -> list[pa.Table]:
    """Blocks of at most `max_rows`, and at least `min_blocks` of them, so every actor gets work."""
    rows = max(1, min(max_rows, -(-table.num_rows // min_blocks)))
    return [table.slice(i, rows) for i in range(0, table.num_rows, rows)] or [table]


def run(store: Store, cfg: Config, resume: bool, report: Callable[[str], None] = print) -> dict:
    """Embed what is not embedded yet; returns metrics for the stage manifest."""
    store.clean_temps(STAGING_DIR)
    if not resume:
        store.remove(STAGING_DIR)
    text_column = cfg.corpus.text_column
    chunks = store.read_table("corpus", "chunks", columns=["chunk_id", text_column])
    done = _done_chunk_ids(store)
    todo = chunks.filter(pc.invert(pc.is_in(chunks.column("chunk_id"), value_set=done))) if len(done) else chunks
    next_part = len(store.listdir(STAGING_DIR))
    if len(done):
        report(f"[embed] {len(done)} chunks already embedded by an interrupted run; {todo.num_rows} to go")
    if todo.num_rows:
        # Several blocks so that every actor of the pool gets work.
        ds = ray.data.from_arrow(_blocks(todo, max(cfg.embedding.batch_size * 4, 1)))
        out = embed_dataset(ds, cfg.embedding, text_column)
        written = 0
        for batch in out.iter_batches(batch_size=cfg.embedding.part_rows, batch_format="pyarrow"):
            store.write_table(batch, STAGING_DIR, f"part-{next_part:05d}.parquet")
            next_part += 1
            written += batch.num_rows
            report(f"[embed] {len(done) + written}/{chunks.num_rows} chunks embedded")
    store.commit(store.path(STAGING_DIR), FINAL_DIR)
    return {"chunks": chunks.num_rows, "embedded_now": todo.num_rows, "reused": len(done), "parts": next_part}


def read_embeddings(store: Store) -> pa.Table:
    """All embeddings (chunk_id, embedding), one row per chunk."""
    table = _read_parts(store, FINAL_DIR)
    if table is None:
        raise StoreError(f"no embeddings in {store.path(FINAL_DIR)}: run `imoe build --until embed` first")
    return table
