"""The ingest stage: the corpus → `corpus/chunks` (Parquet, one row per chunk, input columns kept).

The driver lists the corpus and peeks at its first rows (bad input fails in seconds, before Ray
starts); Ray Data reads it where it lies, chunks it on an actor pool as wide as the cluster's CPUs,
and writes the chunks straight to the store: no document passes through the driver.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import ray

from imoe_ray.cluster import init_ray
from imoe_ray.config import Config
from imoe_ray.corpus.readers import CorpusError, corpus_dataset, corpus_error_in, inspect_corpus, locate_corpus
from imoe_ray.corpus.readers import listing_fingerprint, load_hf_dataset
from imoe_ray.store import Store

CHUNKS = ("corpus", "chunks")
# Writing is I/O: its tasks take no CPU, so they run while the actor pools hold every CPU of the cluster.
WRITE_TASKS = {"num_cpus": 0}  # I/O: they must run while the actor pools hold every CPU
READ_TASKS = {"num_cpus": 0}


def corpus_fingerprint(cfg: Config) -> str:
    """Changes whenever the corpus files (names, sizes, modification times) or the reading settings change.
    Computed from the listing alone (a Hugging Face hub dataset: from its cached files); reads no contents."""
    source = locate_corpus(cfg.corpus.path)
    hf_dataset = None
    if source.hf and not source.is_dir:
        hf_dataset = load_hf_dataset(source, cfg.corpus.split)
    return listing_fingerprint(source, cfg.corpus.split, hf_dataset)


def chunk_plan(cluster: dict[str, float]) -> tuple[int, float]:
    """(chunking actors at most, CPUs each): one CPU each, leaving one of the cluster's CPUs to the
    read and parse tasks that feed them (`readers.PARSE_TASKS`); on a one-CPU cluster, half of it."""
    cpus = cluster.get("CPU", 1.0)
    if cpus >= 2:
        return max(1, int(cpus) - 1), 1.0
    return 1, max(0.1, cpus / 2)


@contextmanager
def ordered_execution() -> Iterator[None]:
    """Ray Data keeps the corpus's order while this is on: deterministic row order and generated ids."""
    ctx = ray.data.DataContext.get_current()
    before = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        yield
    finally:
        ctx.execution_options.preserve_order = before


def _discard(store: Store, temp: str) -> None:
    if store.fs.get_file_info(temp).type == pafs.FileType.Directory:
        store.fs.delete_dir(temp)


def run(store: Store, cfg: Config, resume: bool, report: Callable[[str], None] = print) -> dict:
    """Check the corpus in the driver (so errors are immediate), then read, chunk and write it on Ray Data."""
    c = cfg.corpus
    plan = inspect_corpus(c.path, text_column=c.text_column, id_column=c.id_column, split=c.split)
    from imoe_ray.corpus.chunking import Chunker  # transformers: only once the corpus is known to be good

    init_ray(cfg.ray)
    store.clean_temps(*CHUNKS[:1])
    temp = store.temp_path(*CHUNKS)
    actors, actor_cpus = chunk_plan(ray.cluster_resources())
    with ordered_execution():
        chunked = corpus_dataset(plan).map_batches(
            Chunker,
            fn_constructor_kwargs=dict(encoder=cfg.embedding.encoder, text_column=c.text_column,
                                       chunk_tokens=min(c.chunk_tokens, cfg.embedding.max_tokens),
                                       overlap=c.chunk_overlap, min_chunk_tokens=c.min_chunk_tokens),
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
            num_cpus=actor_cpus,
        )
        error = None
        try:
            chunked.write_parquet(temp, filesystem=store.fs, ray_remote_args=WRITE_TASKS)
        except Exception as e:  # noqa: BLE001 - a bad row found by a worker comes back wrapped by Ray
            _discard(store, temp)
            error = corpus_error_in(e, plan.source.spec)
            if error is None:
                raise
        if error is not None:  # raised outside the handler: no chain back to the executor and its actors
            del chunked
            raise error
    written = None
    if store.fs.get_file_info(temp).type == pafs.FileType.Directory:
        written = pads.dataset(temp, filesystem=store.fs, format="parquet")
    documents = written.count_rows(filter=pc.field("chunk_index") == 0) if written is not None else 0
    if written is None or documents == 0:
        _discard(store, temp)
        raise CorpusError(f"corpus is empty: every row of {c.path} has an empty {c.text_column!r}")
    chunks = written.count_rows()
    store.commit(temp, *CHUNKS)
    report(f"[ingest] {documents} documents → {chunks} chunks ({actors} chunking actors at most)")
    return {"documents": documents, "chunks": chunks, "columns": plan.columns}
