"""Strict mode (`serve.max_loaded_experts: 1`) against capacity 3, for one request mixing 3 experts:
the same decoder, the same tokens; strict runs each step in one pass per expert with only that
expert resident (loaded from the store when it is its turn), the baseline in one pass with all three.

    python benchmarks/bench_strict_mode.py --store store [--tokens 32] [--repeats 5]

Prints the p50 latency of each and the ratio strict / capacity 3 (the issue's bar: within 3x).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from imoe_ray.serving.generation import GenerationRequest
    from imoe_ray.serving.model import ServingModel

    store = Path(args.store)
    names = [e["name"] for e in json.loads((store / "experts" / "index.json").read_text())["experts"]][:3]
    if len(names) < 3:
        raise SystemExit(f"{store} has {len(names)} experts; the benchmark mixes 3")
    results = {}
    for label, capacity in (("capacity 3", 3), ("strict (capacity 1)", 1)):
        model = ServingModel(store, capacity=capacity, threads=args.threads)
        prompt = [model.tokenizer.eos_token_id] + model.tokenizer("the server parses the request and",
                                                                  add_special_tokens=False)["input_ids"]
        request = GenerationRequest(prompt, {n: 1 / 3 for n in names}, args.tokens)
        resident = []
        load = model.bank.load
        model.bank.load = lambda name, d, _load=load: (_load(name, d), resident.append(len(model.bank.resident)))[0]
        model.generate([request])  # warm-up
        times, tokens = [], None
        for _ in range(args.repeats):
            started = time.perf_counter()
            out = model.generate([request])[0]
            times.append(time.perf_counter() - started)
            tokens = out.token_ids
        results[label] = (statistics.median(times), tokens, max(resident or [len(model.bank.resident)]))
    base, strict = results["capacity 3"], results["strict (capacity 1)"]
    print(f"3-expert mixture, {args.tokens} tokens, p50 of {args.repeats}")
    for label, (t, _, most) in results.items():
        print(f"  {label:<22} {t * 1000:9.1f} ms   most resident adapters: {most}")
    print(f"  ratio strict / capacity 3: {strict[0] / base[0]:.2f}x   same tokens: {strict[1] == base[1]}")


if __name__ == "__main__":
    main()
