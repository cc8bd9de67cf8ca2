"""GPU checks, each ours against its baseline in one run (needs a CUDA GPU; the tests never need one):

1. DeepSpeed through Ray Train on the GPU: the expert train loop with `experts.strategy: deepspeed`
   (ZeRO stages 1 and 2, bf16) against plain PyTorch (`ddp`, bf16 autocast) on the same blocks, steps and
   worker: tokens/s, final loss, the worker's peak GPU memory, and the stored adapter reloads with PEFT.
2. Expert replicas on the GPU: 16 requests over 4 experts decoded as one mixed-adapter batch (the adapter
   bank) against the same requests one after another; and the adapter switch, warm and cold.

    python benchmarks/bench_gpu.py --store STORE [--hidden 1024 --layers 12] [-o gpu.json]

STORE gives the tokenizer (STORE/base) and the training text (STORE/shards). The base LM is a new
Llama of the given size with random weights (timings depend on shapes, not values), written with
random LoRA experts of the store's adapter shape into a scratch store.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def scratch_store(src: Path, out: Path, hidden: int, layers: int, n_experts: int, r: int, seq_len: int) -> Path:
    import torch
    from peft import get_peft_model
    from transformers import AutoTokenizer

    from imoe_ray.config import ExpertsConfig, PretrainConfig
    from imoe_ray.experts.adapters import peft_config
    from imoe_ray.experts.base_model import llama_config, new_model

    tokenizer = AutoTokenizer.from_pretrained(src / "base")
    size = PretrainConfig(hidden_size=hidden, layers=layers, heads=max(1, hidden // 64), intermediate_size=hidden * 4,
                          seq_len=seq_len)
    new_model(llama_config(size, tokenizer), seed=0).save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    names = [f"expert-{i}" for i in range(n_experts)]
    for i, name in enumerate(names):
        base = new_model(llama_config(size, tokenizer), seed=0)
        model = get_peft_model(base, peft_config(ExpertsConfig(r=r), base))
        torch.manual_seed(i)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
        model.save_pretrained(out / "experts" / name)
    (out / "experts" / "index.json").write_text(json.dumps({"experts": [{"name": n} for n in names]}))
    return out


def corpus_texts(store: Path) -> list[str]:
    import pyarrow.parquet as pq

    texts: list[str] = []
    for part in sorted((store / "shards").rglob("*.parquet")):
        texts += [t for t in pq.read_table(part, columns=["text"]).column("text").to_pylist() if t]
    return texts


def bench_deepspeed(store: Path, texts: list[str], seq_len: int, epochs: float, cpus: int) -> dict:
    import ray
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from imoe_ray.config import ExpertsConfig
    from imoe_ray.experts import parallel
    from imoe_ray.experts.data import token_blocks
    from imoe_ray.experts.train_loop import MODEL_DIR
    from imoe_ray.store import Store

    base = store / "base"
    blocks = ray.put(token_blocks(texts, AutoTokenizer.from_pretrained(base), seq_len))
    out = {}
    for strategy, stage in (("ddp", 0), ("deepspeed", 1), ("deepspeed", 2)):
        label = strategy if strategy == "ddp" else f"deepspeed-zero{stage}"
        e = ExpertsConfig(strategy=strategy, zero_stage=stage, r=16)
        job = parallel.TrainJob(f"gpu-{label}", label=label, loop_config={
            "kind": "adapter", "base": {"store": str(store), "cache_dir": None}, "experts": e.model_dump(mode="json"), "blocks": blocks,
            "epochs": epochs, "lr": 1e-3, "batch_size": 16, "weight_decay": 0.0, "seed": 0, "threads": cpus,
            "strategy": strategy, "zero_stage": stage, "reports": 2}, workers=1, cpus_per_worker=cpus,
            gpus_per_worker=1.0)

        def check(name: str, metrics: dict, checkpoint: str) -> dict:
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), Path(checkpoint) / MODEL_DIR)
            return metrics | {"adapter_reloads": type(model).__name__ == "PeftModelForCausalLM"}

        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as runs:
            metrics = parallel.run_one(job, parallel.Storage(Store(runs), ()), 0, check)
        out[label] = {k: metrics.get(k) for k in ("steps", "loss", "tokens", "tokens_per_s", "gpu_peak_mb",
                                                   "adapter_reloads")} | {"wall_s": round(time.perf_counter() - started, 1)}
        print(label, json.dumps(out[label]), flush=True)
    return out


def bench_decode(store: Path, tokens: int, rows: int, reps: int) -> dict:
    import torch

    from imoe_ray.serving.generation import GenerationRequest
    from imoe_ray.serving.model import ServingModel

    model = ServingModel(store, capacity=4, device="cuda")
    names = sorted(model.experts)[:4]
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, len(model.tokenizer), (24,), generator=gen).tolist() for _ in range(rows)]

    def requests() -> list[GenerationRequest]:
        return [GenerationRequest(p, {names[i % len(names)]: 1.0}, max_new_tokens=tokens) for i, p in enumerate(prompts)]

    def timed(fn) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t

    model.generate(requests())  # warm-up: loads the experts, compiles nothing, fills the caches
    batched = statistics.median(timed(lambda: model.generate(requests())) for _ in range(reps))
    one_by_one = statistics.median(timed(lambda: [model.generate([r]) for r in requests()]) for _ in range(reps))
    def switch(name: str) -> None:
        with model.bank.use([name]):
            pass

    cold, warm = [], []
    for i in range(20):
        n = names[i % len(names)]
        model.bank.evict(n)
        cold.append(timed(lambda: (model.ensure(n), switch(n))))
        warm.append(timed(lambda: switch(n)))
    out = {"rows": rows, "experts": len(names), "new_tokens": tokens,
           "batched_tok_s": round(rows * tokens / batched, 1), "unbatched_tok_s": round(rows * tokens / one_by_one, 1),
           "ratio": round(one_by_one / batched, 2),
           "switch_cold_ms": round(statistics.median(cold) * 1000, 3),
           "switch_warm_ms": round(statistics.median(warm) * 1000, 3), "gpu": torch.cuda.get_device_name()}
    print("decode", json.dumps(out), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, type=Path)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=4)
    parser.add_argument("--only", default="deepspeed,decode")
    parser.add_argument("-o", "--output", type=Path)
    args = parser.parse_args()
    import ray
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_gpu needs a CUDA GPU")
    result: dict = {"hidden": args.hidden, "layers": args.layers, "gpu": torch.cuda.get_device_name()}
    with tempfile.TemporaryDirectory() as d:
        store = scratch_store(args.store, Path(d) / "store", args.hidden, args.layers, 4, 16, args.seq_len)
        if "deepspeed" in args.only:
            ray.init(num_cpus=args.cpus + 2, num_gpus=1, include_dashboard=False, log_to_driver=True)
            result["deepspeed"] = bench_deepspeed(store, corpus_texts(args.store), args.seq_len, args.epochs, args.cpus)
            ray.shutdown()
        if "decode" in args.only:
            result["decode"] = bench_decode(store, args.tokens, args.rows, args.reps)
    print(json.dumps(result, indent=2))
    if args.output:
        args.output.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
