"""Strict mode (`serve.max_loaded_experts: 1`) against capacity 3, for one request mixing 3 experts.

Two measurements, each printed side by side with the ratio strict / capacity 3 (the issue's bar:
within 3x, with never more than one adapter resident):

- `decode`: the decoder alone, in this process (`ServingModel.generate`): the same tokens; strict
  runs each step in one pass per expert with only that expert resident (loaded from the store in
  its turn), the baseline in one pass with all three resident. Counts resident adapters after
  every load and at every forward pass.
- `served`: the served application over HTTP (`serve_apps.imoe.build_app`, what `imoe serve` runs) on
  a local Ray cluster of its own, twice side by side: with `serve.max_loaded_experts=3` and with 1
  (one replica each, one torch thread), requests alternating between them: the same
  `/v1/completions` request asking for an ensemble of the router's top 3 experts (`"imoe": {"ensemble": true, "top_k": 3, "mode": "basic", "fusion":
  "mixture"}`, greedy, every stop id biased away so that each answer is `--tokens` long), p50 of
  the wall time of N requests from one client after 2 warm-ups, and the most adapters each replica
  ever held (`Experts.most_resident`).

    python benchmarks/bench_strict_mode.py --store STORE [--only decode,served] [--tokens 32] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time
from pathlib import Path

PROMPT = "the server parses the request and"


def _experts(store: Path) -> list[str]:
    names = [e["name"] for e in json.loads((store / "experts" / "index.json").read_text())["experts"]][:3]
    if len(names) < 3:
        raise SystemExit(f"{store} has {len(names)} experts; the benchmark mixes 3")
    return names


def bench_decode(store: Path, tokens: int, repeats: int, threads: int) -> dict:
    """Both models built first, then their runs alternate (capacity 3, strict, capacity 3, ...), so
    that drift in the machine's speed (it is shared) affects both alike."""
    from imoe_ray.serving.generation import GenerationRequest
    from imoe_ray.serving.model import ServingModel

    names = _experts(store)
    runs = {}
    for label, capacity in (("capacity 3", 3), ("strict (capacity 1)", 1)):
        model = ServingModel(store, capacity=capacity, threads=threads)
        prompt = [model.tokenizer.eos_token_id] + model.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
        run = {"model": model, "request": GenerationRequest(prompt, {n: 1 / 3 for n in names}, tokens),
               "times": [], "loads": 0, "in_pass": []}
        load, use = model.bank.load, model.bank.use

        def counted_load(name, directory, _load=load, _run=run):
            _run["loads"] += 1
            out = _load(name, directory)
            _run["in_pass"].append(len(_run["model"].bank.resident))
            return out

        def counted_use(rows, _use=use, _run=run):  # resident adapters while a forward pass runs
            _run["in_pass"].append(len(_run["model"].bank.resident))
            return _use(rows)

        model.bank.load, model.bank.use = counted_load, counted_use
        model.generate([run["request"]])  # warm-up
        run["loads"] = 0
        runs[label] = run
    for _ in range(repeats):
        for run in runs.values():
            started = time.perf_counter()
            run["tokens"] = run["model"].generate([run["request"]])[0].token_ids
            run["times"].append(time.perf_counter() - started)
    results = {label: {"p50_ms": statistics.median(r["times"]) * 1000, "loads_per_request": r["loads"] / repeats,
                       "most_resident": max(r["in_pass"])} for label, r in runs.items()}
    base, strict = runs["capacity 3"], runs["strict (capacity 1)"]
    ratio = results["strict (capacity 1)"]["p50_ms"] / results["capacity 3"]["p50_ms"]
    paired = statistics.median(s / b for s, b in zip(strict["times"], base["times"]))
    same = strict["tokens"] == base["tokens"] and len(base["tokens"]) == tokens
    print(f"decode only: 3-expert mixture, {tokens} tokens, p50 of {repeats} alternating runs")
    for label, r in results.items():
        print(f"  {label:<22} {r['p50_ms']:9.1f} ms   loads per request {r['loads_per_request']:5.1f}   "
              f"most resident adapters (at every load and pass): {r['most_resident']}")
    print(f"  ratio strict / capacity 3: {ratio:.2f}x (median of the paired ratios {paired:.2f}x)   same tokens: {same}")
    return {"tokens": tokens, "repeats": repeats, **results, "ratio": ratio, "paired_ratio": paired, "same_tokens": same}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_served(store: Path, tokens: int, repeats: int, mode: str) -> dict:
    """Both applications run side by side (as `imoe serve` builds them, `serve_apps.imoe.build_app`),
    each under its own route prefix, and one client alternates its requests between them, so that
    drift in the machine's speed affects both alike."""
    import ray
    import requests
    from ray import serve
    from transformers import AutoTokenizer

    from imoe_ray.serving.model import stop_token_ids
    from serve_apps.imoe import build_app

    # every stop id biased away: each answer is max_tokens long (the decode-only runs have no stop id)
    stops = stop_token_ids(store / "base", AutoTokenizer.from_pretrained(store / "base"))
    body = {"model": "imoe", "prompt": PROMPT, "max_tokens": tokens, "temperature": 0,
            "logit_bias": {str(i): -100 for i in stops},
            "imoe": {"ensemble": True, "top_k": 3, "mode": mode, "fusion": "mixture"}}
    apps = {"capacity 3": 3, "strict (capacity 1)": 1}
    port = _free_port()
    # a cluster of this process's own ("local"): never another user's, whatever RAY_ADDRESS or /tmp/ray say
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for capacity in apps.values():
            overrides = [f"serve.max_loaded_experts={capacity}", "serve.min_replicas=1", "serve.max_replicas=1",
                         "serve.expert_cpus=0.5", "serve.router_cpus=0.25", "serve.threads=1"]
            serve.run(build_app(str(store), None, overrides), name=f"imoe-c{capacity}", route_prefix=f"/c{capacity}",
                      blocking=False)
        session = requests.Session()
        for capacity in apps.values():
            deadline = time.monotonic() + 900
            while True:
                try:
                    if session.get(f"http://127.0.0.1:{port}/c{capacity}/healthz", timeout=5).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit(f"the application with capacity {capacity} did not start (see `serve status`)")
                time.sleep(1)
        runs = {label: {"times": [], "server": [], "answers": set()} for label in apps}
        for i in range(repeats + 2):  # 2 warm-up rounds
            for label, capacity in apps.items():
                started = time.perf_counter()
                reply = session.post(f"http://127.0.0.1:{port}/c{capacity}/v1/completions", json=body, timeout=300)
                elapsed = time.perf_counter() - started
                if reply.status_code != 200:
                    raise SystemExit(f"{label}: HTTP {reply.status_code}: {reply.text[:500]}")
                data = reply.json()
                if len(data["imoe"]["experts"]) != 3:
                    raise SystemExit(f"{label}: the answer mixed {data['imoe']['experts']}, not 3 experts")
                if i >= 2:
                    runs[label]["times"].append(elapsed)
                    runs[label]["server"].append(data["imoe"]["server_ms"] / 1000)
                    runs[label]["answers"].add((data["choices"][0]["text"], data["usage"]["completion_tokens"]))
        results = {label: {"p50_ms": statistics.median(r["times"]) * 1000,
                           "server_p50_ms": statistics.median(r["server"]) * 1000,
                           "completion_tokens": sorted(n for _, n in r["answers"]),
                           "most_resident": _most_resident(f"imoe-c{apps[label]}")} for label, r in runs.items()}
    finally:
        serve.shutdown()
        ray.shutdown()
    base, strict = runs["capacity 3"], runs["strict (capacity 1)"]
    ratio = results["strict (capacity 1)"]["p50_ms"] / results["capacity 3"]["p50_ms"]
    paired = statistics.median(s / b for s, b in zip(strict["times"], base["times"]))
    same = base["answers"] == strict["answers"] and len(base["answers"]) == 1
    print(f"served over HTTP: /v1/completions, ensemble of the router's top 3 experts (mode {mode}, mixture), "
          f"{tokens} tokens, p50 of {repeats} alternating requests")
    for label, r in results.items():
        print(f"  {label:<22} {r['p50_ms']:9.1f} ms (server side {r['server_p50_ms']:.1f} ms)   completion tokens "
              f"{r['completion_tokens']}   most resident adapters: {r['most_resident']}")
    print(f"  ratio strict / capacity 3: {ratio:.2f}x (median of the paired ratios {paired:.2f}x)   same answer: {same}")
    return {"tokens": tokens, "repeats": repeats, "mode": mode, **results, "ratio": ratio, "paired_ratio": paired,
            "same_answer": same}


def _most_resident(app: str) -> int | str:
    from ray import serve
    from ray.serve.exceptions import RayServeException

    experts = serve.get_deployment_handle("Experts", app_name=app)
    try:
        return experts.most_resident.remote().result()
    except RayServeException:  # code from before `Experts.most_resident` (a --baseline run): only what is resident now
        return f"{len(experts.resident.remote().result())} (now)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, type=Path)
    parser.add_argument("--only", default="decode,served", help="decode, served or both (comma-separated)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the in-process decoder")
    parser.add_argument("--mode", default="basic", choices=["basic", "fast", "optimized"],
                        help="the served request's imoe.mode (basic: no retrieval, no compression)")
    parser.add_argument("--output", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args()
    store, parts, results = args.store.resolve(), args.only.split(","), {}
    if "decode" in parts:
        results["decode"] = bench_decode(store, args.tokens, args.repeats, args.threads)
    if "served" in parts:
        results["served"] = bench_served(store, args.tokens, args.repeats, args.mode)
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
