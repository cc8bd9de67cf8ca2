"""Retrieval latency per request, as the serving pipeline does it, against an in-memory baseline.

    python benchmarks/bench_retrieval.py --store STORE [--queries 200]

For held-out query views of the store: the router picks the categories; then the timed part is the
pipeline's retrieval slot (`StoreRetriever.retrieve`: encode the query, search the categories'
LanceDB tables, fuse, apply the floor) in hybrid, vector and text modes, and over all tables. The
baseline is brute-force cosine over every knowledge-base embedding held in a numpy matrix (query
encoding included), the least a vector search can cost. Also the compressors' latency per prompt
(the query and 4 passages). Prints JSON: p50/p95 in ms and the ratio hybrid p50 / baseline p50.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def percentiles(ms: list[float]) -> dict:
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p95_ms": round(float(np.percentile(ms, 95)), 3),
            "n": len(ms)}


def request_overhead(router, retriever, experts: list[str], cfg, queries: list[str]) -> dict:
    """What retrieval adds to a request: the serving pipeline's whole planning step (route, then
    retrieve; the query is encoded while the router runs) in `optimized` mode without compression,
    against `basic` mode (route only) on the same queries, alternating."""
    from imoe_ray.serving.openai_api import ImoeOptions
    from imoe_ray.serving.pipeline import Planner

    planner = Planner(router, experts, "basic", cfg.experts.top_k, retriever, None, cfg.retrieval.k)
    ms: dict[str, list[float]] = {"basic": [], "optimized": []}
    slot = []
    for q in queries:
        for mode in ms:
            started = time.perf_counter()
            plan = planner.plan("imoe", q, q, ImoeOptions(mode=mode))
            ms[mode].append((time.perf_counter() - started) * 1000)
            if mode == "optimized":
                slot.append(plan.timings_ms["retrieval"])
    basic, optimized = (float(np.percentile(ms[m], 50)) for m in ("basic", "optimized"))
    return {"plan_basic": percentiles(ms["basic"]), "plan_optimized_no_compression": percentiles(ms["optimized"]),
            "retrieval_slot_in_plan": percentiles(slot), "request_added_by_retrieval_p50_ms": round(optimized - basic, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from imoe_ray.config import store_config
    from imoe_ray.retrieval.evaluate import heldout_queries
    from imoe_ray.retrieval.serving import build_components
    from imoe_ray.routing.stage import load_router
    from imoe_ray.store import Store

    torch.set_num_threads(args.threads)
    cfg = store_config(args.store)
    store = Store(args.store)
    retriever, compressor, _ = build_components(args.store, cfg, threads=args.threads)
    kb = retriever.kb
    from transformers import AutoTokenizer

    from imoe_ray.embedding.encoder import resolve_encoder_path
    encoder_tokenizer = AutoTokenizer.from_pretrained(resolve_encoder_path(cfg.embedding.encoder))
    queries, _, _ = heldout_queries(store, cfg, kb, None, None, args.queries, encoder_tokenizer)
    router = load_router(store, cfg)
    categories = [router.route(q).names for q in queries]

    import os

    out: dict = {"load_average_1m": round(os.getloadavg()[0], 2), "store": args.store, "queries": len(queries),
                 "tables": len(kb.names()),
                 "rows": sum(kb.table(n).count_rows() for n in kb.names()), "threads": args.threads}
    for q, c in zip(queries[:5], categories[:5]):  # warm up: tables open, indexes cached
        retriever.retrieve(q, c, cfg.retrieval.k)
    for mode in ("hybrid", "vector", "text"):
        retriever.rc = cfg.retrieval.model_copy(update={"search": mode})
        ms = []
        for q, c in zip(queries, categories):
            started = time.perf_counter()
            retriever.retrieve(q, c, cfg.retrieval.k)
            ms.append((time.perf_counter() - started) * 1000)
        out[f"{mode}_routed"] = percentiles(ms)
    retriever.rc = cfg.retrieval
    ms = []
    for q in queries:
        started = time.perf_counter()
        retriever.retrieve(q, [], cfg.retrieval.k)
        ms.append((time.perf_counter() - started) * 1000)
    out["hybrid_all_tables"] = percentiles(ms)
    ms = []
    for q in queries:
        started = time.perf_counter()
        kb.embed([q])
        ms.append((time.perf_counter() - started) * 1000)
    out["query_encoding"] = percentiles(ms)

    matrix = np.concatenate([np.stack(kb.table(n).to_arrow().column("embedding").to_numpy(zero_copy_only=False))
                             for n in kb.names()]).astype(np.float32)
    ms = []
    for q in queries:
        started = time.perf_counter()
        v = kb.embed([q])[0]
        np.argpartition(-(matrix @ v), cfg.retrieval.k)[: cfg.retrieval.k]
        ms.append((time.perf_counter() - started) * 1000)
    out["baseline_numpy_bruteforce"] = percentiles(ms)
    out.update(request_overhead(router, retriever, kb.names(), cfg, queries))
    out["ratio_hybrid_to_baseline_p50"] = round(out["hybrid_routed"]["p50_ms"] / out["baseline_numpy_bruteforce"]["p50_ms"], 3)
    out["search_only_hybrid_p50_ms"] = round(out["hybrid_routed"]["p50_ms"] - out["query_encoding"]["p50_ms"], 3)

    if compressor is not None:
        from imoe_ray.compression.filler import FillerCompressor

        passages = [[p.text for p in retriever.retrieve(q, c, 4)] for q, c in zip(queries[:50], categories[:50])]
        method = compressor.method
        for name, comp in (("selective", method), ("filler", FillerCompressor(compressor.count))):
            if comp is None:
                continue
            ms, ratios = [], []
            for q, ps in zip(queries[:50], passages):
                started = time.perf_counter()
                ratios.append(comp.reduce(q, ps, cfg.retrieval.compression_ratio).ratio)
                ms.append((time.perf_counter() - started) * 1000)
            out[f"compression_{name}"] = percentiles(ms) | {"mean_ratio": round(float(np.mean(ratios)), 3)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
