"""Parallel expert training: K expert jobs at once (Ray Tune over TorchTrainers, one CPU each) vs
the same K jobs one after another on the same per-job resources, in one run.

    imoe build --corpus corpus.jsonl --store store --until experts
    python benchmarks/bench_experts.py --store store [--k 2] [--steps 60]

Every job trains one expert's adapter for the same number of optimizer steps on the first K
experts' shards (run directories under a scratch folder, nothing in the store changes). Prints the
wall time of each schedule, the speed-up and the parallel efficiency (speed-up / K).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def jobs_for(store, cfg, k: int, steps: int, tag: str):
    from transformers import AutoTokenizer

    from imoe_ray.experts import stage
    from imoe_ray.experts.data import token_blocks
    from imoe_ray.sharding.stage import SHARDS

    index = store.read_json(*stage.INDEX)
    names = [e["name"] for e in index["experts"]][:k]
    if len(names) < k:
        raise SystemExit(f"the store has {len(names)} experts; --k {k} needs as many")
    base_dir = store.local_dir(stage.BASE)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    seq_len = stage._seq_len(cfg, base_dir)
    jobs = []
    for name in names:
        texts = stage._training_texts(store.read_table(SHARDS, name, columns=["id", cfg.corpus.text_column]), cfg)
        inputs, labels = token_blocks(texts, tokenizer, seq_len)
        epochs = steps * cfg.experts.batch_size / len(inputs)  # the same number of steps for every job
        job = stage._job(name, tag, inputs, labels, epochs, cfg, store, k)
        job.loop_config["reports"] = 2
        jobs.append(job)
    return jobs


def timed(jobs, storage: str, concurrent: int) -> float:
    from imoe_ray.experts.parallel import Storage, run_parallel
    from imoe_ray.store import Store

    started = time.perf_counter()
    run_parallel(jobs, Storage(Store(storage), ()), concurrent, 0, lambda name, metrics, checkpoint: {"loss": metrics["loss"]}, verbose=0)
    return time.perf_counter() - started


def main() -> None:
    import ray
    import yaml

    from imoe_ray.config import load_config
    from imoe_ray.store import Store

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--k", type=int, default=2, help="experts trained at once (each on one CPU)")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per expert")
    args = ap.parse_args()

    cfg = load_config(base=yaml.safe_load((Path(args.store) / "config.yaml").read_text()), store=args.store,
                      overrides=["experts.cpus_per_worker=1", "experts.workers_per_expert=1"])
    ray.init(num_cpus=args.k, log_to_driver=False)
    store = Store(args.store)
    scratch = Path(tempfile.mkdtemp(prefix="bench-experts-"))
    try:
        sequential = timed(jobs_for(store, cfg, args.k, args.steps, "seq"), str(scratch / "seq"), 1)
        parallel = timed(jobs_for(store, cfg, args.k, args.steps, "par"), str(scratch / "par"), args.k)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    speedup = sequential / parallel
    print(f"{args.k} experts x {args.steps} steps, 1 CPU per job, on a {args.k}-CPU Ray cluster")
    print(f"  one after another : {sequential:7.1f} s")
    print(f"  all {args.k} at once     : {parallel:7.1f} s")
    print(f"  speed-up {speedup:.2f}x, parallel efficiency {speedup / args.k:.2f} (ideal 1.00)")
    print(json.dumps({"k": args.k, "steps": args.steps, "sequential_s": round(sequential, 1),
                      "parallel_s": round(parallel, 1), "speedup": round(speedup, 3),
                      "efficiency": round(speedup / args.k, 3)}))


if __name__ == "__main__":
    main()
