"""The embed stage: every chunk of `corpus/chunks` → `embeddings/part-*.parquet` (chunk_id, embedding).

Ray Data reads the chunks from the store, embeds them on an actor pool sized from the cluster and
writes the parts into `embeddings.partial/` itself, as batches stream out of the pool: no chunk
passes through the driver. A run killed midway keeps its finished parts (a part cut short by the
kill is unreadable and is dropped) and the next run embeds only the chunks they lack. The finished
folder replaces `embeddings/` in one commit, so the previous complete embeddings stay usable until then.
"""

from __future__ import annotations

from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data.datasource import FilenameProvider

from imoe_ray.config import Config
from imoe_ray.corpus.stage import READ_TASKS, WRITE_TASKS
from imoe_ray.embedding.ray_embed import embed_dataset
from imoe_ray.store import Store
from imoe_ray.store.store import StoreError

FINAL_DIR = "embeddings"
STAGING_DIR = "embeddings.partial"
CHUNKS = ("corpus", "chunks")


class PartNames(FilenameProvider):
    """`part-<write>_<task>-<i>.parquet`: unique per run, so a resumed run never overwrites a kept part."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{write_uuid}_{task_index:06}"


class SkipDone:
    """Drops the chunks that the kept parts already hold; each actor reads their chunk ids itself."""

    def __init__(self, filesystem: pafs.FileSystem, parts: list[str]):
        self.done = pq.read_table(parts, filesystem=filesystem, columns=["chunk_id"]).column("chunk_id").combine_chunks()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return batch.filter(pc.invert(pc.is_in(batch.column("chunk_id"), value_set=self.done)))


def _kept_parts(store: Store, report: Callable[[str], None]) -> dict[str, int]:
    """The readable parts of an interrupted run and their row counts (from their footers); unreadable ones go."""
    parts = {}
    for name in store.listdir(STAGING_DIR):
        if not name.endswith(".parquet"):
            continue
        try:
            parts[store.path(STAGING_DIR, name)] = pq.read_metadata(store.path(STAGING_DIR, name), filesystem=store.fs).num_rows
        except (pa.ArrowInvalid, OSError):
            report(f"[embed] dropping {name}: cut short by the interrupted run")
            store.remove(STAGING_DIR, name)
    return parts


def _read_parts(store: Store, folder: str, columns: list[str] | None = None) -> pa.Table | None:
    parts = [p for p in store.listdir(folder) if p.endswith(".parquet")]
    if not parts:
        return None
    return pa.concat_tables([store.read_table(folder, p, columns=columns) for p in parts])


def run(store: Store, cfg: Config, resume: bool, report: Callable[[str], None] = print) -> dict:
    """Embed what is not embedded yet; returns metrics for the stage manifest."""
    store.clean_temps(STAGING_DIR)
    if not resume:
        store.remove(STAGING_DIR)
    text_column = cfg.corpus.text_column
    chunks = pads.dataset(store.path(*CHUNKS), filesystem=store.fs, format="parquet").count_rows()
    kept = _kept_parts(store, report)
    reused = sum(kept.values())
    if reused:
        report(f"[embed] {reused} chunks already embedded by an interrupted run; {chunks - reused} to go")
    if reused < chunks:
        rows = max(cfg.embedding.batch_size * 4, 1)
        ds = ray.data.read_parquet(store.path(*CHUNKS), filesystem=store.fs, columns=["chunk_id", text_column],
                                   ray_remote_args=READ_TASKS)
        if kept:
            ds = ds.map_batches(SkipDone, fn_constructor_kwargs=dict(filesystem=store.fs, parts=sorted(kept)),
                                batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0)
        # Blocks of a few batches, so that every actor of the pool gets work.
        out = embed_dataset(ds.repartition(target_num_rows_per_block=rows), cfg.embedding, text_column,
                            cfg.ray.resources)
        store.fs.create_dir(store.path(STAGING_DIR), recursive=True)
        out.write_parquet(store.path(STAGING_DIR), filesystem=store.fs, filename_provider=PartNames(),
                          min_rows_per_file=cfg.embedding.part_rows, ray_remote_args=WRITE_TASKS)
    parts = [p for p in store.listdir(STAGING_DIR) if p.endswith(".parquet")]
    report(f"[embed] {chunks} chunks embedded ({chunks - reused} now) in {len(parts)} parts")
    store.commit(store.path(STAGING_DIR), FINAL_DIR)
    return {"chunks": chunks, "embedded_now": chunks - reused, "reused": reused, "parts": len(parts)}


def read_embeddings(store: Store) -> pa.Table:
    """All embeddings (chunk_id, embedding), one row per chunk."""
    table = _read_parts(store, FINAL_DIR)
    if table is None:
        raise StoreError(f"no embeddings in {store.path(FINAL_DIR)}: run `imoe build --until embed` first")
    return table
