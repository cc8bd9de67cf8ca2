"""Embedding throughput: Ray Data actor pool vs a plain single-process loop, same model and batch size.

    python benchmarks/bench_embedding.py --passages 600 --batch-size 64

Both encode the same passages of the sample corpus. The Ray figure is end to end (actor start and
model load included); the plain loop is timed after its model is loaded, so the ratio is conservative.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pyarrow as pa


def load_passages(n: int) -> list[str]:
    from imoe_ray.corpus.sample import build_sample_corpus

    out = Path(tempfile.mkdtemp()) / "corpus.jsonl"
    build_sample_corpus(out, per_domain=max(1, n // 10 + 1), seed=0)
    texts = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    return (texts * (n // max(1, len(texts)) + 1))[:n]


def plain_loop(texts: list[str], batch_size: int, encoder: str) -> float:
    from imoe_ray.embedding import Encoder

    enc = Encoder(encoder)
    start = time.perf_counter()
    enc.encode(texts, batch_size=batch_size)
    return len(texts) / (time.perf_counter() - start)


def ray_pool(texts: list[str], batch_size: int, encoder: str) -> float:
    import ray

    from imoe_ray.config import EmbeddingConfig
    from imoe_ray.embedding.ray_embed import embed_dataset

    cfg = EmbeddingConfig(encoder=encoder, batch_size=batch_size)
    table = pa.table({"chunk_id": [str(i) for i in range(len(texts))], "text": texts})
    blocks = [table.slice(i, batch_size * 4) for i in range(0, len(texts), batch_size * 4)]
    start = time.perf_counter()
    rows = embed_dataset(ray.data.from_arrow(blocks), cfg, "text").count()
    assert rows == len(texts)
    return len(texts) / (time.perf_counter() - start)


def main() -> None:
    import ray

    from imoe_ray.config import DEFAULT_ENCODER

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passages", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--encoder", default=DEFAULT_ENCODER)
    args = p.parse_args()
    texts = load_passages(args.passages)
    ray.init(include_dashboard=False, log_to_driver=False)
    resources = ray.cluster_resources()
    plain = plain_loop(texts, args.batch_size, args.encoder)
    pooled = ray_pool(texts, args.batch_size, args.encoder)
    print(json.dumps({"passages": len(texts), "batch_size": args.batch_size,
                      "cluster": {k: resources.get(k, 0) for k in ("CPU", "GPU")},
                      "plain_loop_passages_per_s": round(plain, 1),
                      "ray_data_passages_per_s": round(pooled, 1),
                      "ratio_ray_over_plain": round(pooled / plain, 2)}, indent=2))


if __name__ == "__main__":
    main()
