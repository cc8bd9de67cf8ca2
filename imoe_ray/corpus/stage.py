"""The ingest stage: the corpus → `corpus/chunks` (Parquet, one row per chunk, input columns kept)."""

from __future__ import annotations

from typing import Callable

import hashlib
import os
from pathlib import Path

import pyarrow as pa
import ray

from imoe_ray.cluster import init_ray
from imoe_ray.config import Config
from imoe_ray.corpus.readers import CorpusError, read_corpus_table
from imoe_ray.store import Store

CHUNKS = ("corpus", "chunks")


def corpus_fingerprint(cfg: Config) -> str:
    """Changes whenever the corpus files (names, sizes, modification times) or the reading settings change."""
    path = cfg.corpus.path
    if not path:
        raise CorpusError("no corpus given: pass --corpus PATH (or run `imoe sample-corpus OUT` to make one)")
    h = hashlib.sha256(f"{path}|{cfg.corpus.split}".encode())
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p] if p.exists() else []
    for f in files:
        st = os.stat(f)
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _blocks(table: pa.Table, n: int) -> list[pa.Table]:
    rows = max(1, -(-table.num_rows // n))
    return [table.slice(i, rows) for i in range(0, table.num_rows, rows)]


def run(store: Store, cfg: Config, resume: bool, report: Callable[[str], None] = print) -> dict:
    """Read and validate the corpus in the driver (so errors are immediate), chunk it on Ray Data."""
    c = cfg.corpus
    table = read_corpus_table(c.path, text_column=c.text_column, id_column=c.id_column, split=c.split)
    from imoe_ray.corpus.chunking import Chunker  # transformers: only once the corpus is known to be good

    init_ray(cfg.ray)
    ds = ray.data.from_arrow(_blocks(table, 8))
    chunked = ds.map_batches(
        Chunker,
        fn_constructor_kwargs=dict(encoder=cfg.embedding.encoder, text_column=c.text_column,
                                   chunk_tokens=min(c.chunk_tokens, cfg.embedding.max_tokens),
                                   overlap=c.chunk_overlap, min_chunk_tokens=c.min_chunk_tokens),
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=1),
    )
    store.clean_temps(*CHUNKS[:1])
    temp = store.temp_path(*CHUNKS)
    chunked.write_parquet(temp, filesystem=store.fs)
    store.commit(temp, *CHUNKS)
    chunks = store.read_table(*CHUNKS, columns=["chunk_id"]).num_rows
    return {"documents": table.num_rows, "chunks": chunks, "columns": table.column_names}
