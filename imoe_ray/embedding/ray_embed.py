"""Embedding on Ray Data: a callable class on an actor pool, GPUs when the cluster has them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray

from imoe_ray.config import EmbeddingConfig
from imoe_ray.embedding.encoder import Encoder


class EmbedBatch:
    """One encoder per actor; maps a batch of chunks to (chunk_id, embedding, layer_states).

    `layer_states` holds the mean-pooled output of every transformer layer (float16, flattened),
    which the router's early-exit units are trained on and shard with, so no chunk is encoded twice.
    """

    def __init__(self, encoder: str, max_tokens: int, batch_size: int, text_column: str,
                 num_threads: int | None = None, device: str | None = None):
        self.encoder = Encoder(encoder, max_tokens=max_tokens, device=device, num_threads=num_threads)
        self.batch_size = batch_size
        self.text_column = text_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column(self.text_column).to_pylist()
        vectors, layers = self.encoder.encode_with_layers(texts, batch_size=self.batch_size)
        assert layers is not None  # with_layers is on
        flat = layers.reshape(len(texts), -1).astype(np.float16)
        return pa.table({
            "chunk_id": batch.column("chunk_id"),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1]),
            "layer_states": pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), pa.float16()), flat.shape[1]),
        })


@dataclass(frozen=True)
class ActorPlan:
    """How many embedding actors, and what each one reserves."""
    concurrency: int
    num_cpus: float
    num_gpus: float
    num_threads: int


def plan_actors(cfg: EmbeddingConfig, cluster: dict[str, float]) -> ActorPlan:
    """One actor per GPU when the cluster has GPUs; otherwise CPU actors of `num_threads` threads each."""
    gpus = int(cluster.get("GPU", 0))
    cpus = max(1, int(cluster.get("CPU", 1)))
    if gpus > 0:
        return ActorPlan(cfg.concurrency or gpus, num_cpus=1, num_gpus=1, num_threads=cfg.num_threads or 1)
    threads = cfg.num_threads or 1
    # On a cluster, one CPU stays free for the tasks that read and split the chunks feeding the pool
    # (with every CPU held by an actor they would never run); a 2-CPU machine keeps both actors.
    fits = cpus // threads
    concurrency = cfg.concurrency or max(1, fits - 1 if fits > 2 else fits)
    return ActorPlan(concurrency, num_cpus=threads, num_gpus=0, num_threads=threads)


def embed_dataset(ds: "ray.data.Dataset", cfg: EmbeddingConfig, text_column: str,
                  resources: dict[str, float] | None = None) -> "ray.data.Dataset":
    """Add embeddings to a dataset of chunks (columns `chunk_id` and the text column); `resources`:
    custom Ray resources each actor also asks for (config `ray.resources`)."""
    plan = plan_actors(cfg, ray.cluster_resources())
    extra = {"resources": dict(resources)} if resources else {}
    return ds.map_batches(
        EmbedBatch,
        fn_constructor_kwargs=dict(encoder=cfg.encoder, max_tokens=cfg.max_tokens, batch_size=cfg.batch_size,
                                   text_column=text_column, num_threads=plan.num_threads,
                                   device="cuda" if plan.num_gpus else "cpu"),
        batch_size=cfg.batch_size * 4,
        batch_format="pyarrow",
        # From one actor up to the cluster's size, so that the read tasks feeding them find a CPU first.
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.concurrency),
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus,
        **extra,
    )


def embeddings_matrix(table: pa.Table) -> np.ndarray:
    """The `embedding` column of a table as an (n, dim) float32 array."""
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    return column.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)


def layer_states_matrix(table: pa.Table) -> np.ndarray | None:
    """The `layer_states` column as (n, n_layers, dim) float32, or None for stores embedded without it."""
    if "layer_states" not in table.column_names:
        return None
    dim = table.schema.field("embedding").type.list_size
    column = table.column("layer_states").combine_chunks()
    flat = column.values.to_numpy(zero_copy_only=False).astype(np.float32)
    return flat.reshape(len(table), -1, dim)
