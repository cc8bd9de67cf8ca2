"""Serving benchmarks, each ours against its baseline in the same run, with the ratio:

1. adapter switch: warm (resident) and cold (from the store) — the adapter bank vs PEFT's own
   `load_adapter` + `set_adapter`;
2. resident memory of one replica with 32 installed experts (bank LRU of `max_loaded_experts`)
   vs a PEFT model with all 32 loaded, each in a fresh process, against the base model alone;
3. request overhead: the Serve HTTP path (forced expert) vs calling generate in-process, next to
   Ray Serve's own floor for the same two hops (proxy → FastAPI ingress → handle → replica, no model);
4. throughput at 16 concurrent clients: `@serve.batch` mixed-adapter batches vs max_batch_size 1.

    imoe build --corpus corpus.jsonl --store store --until experts
    python benchmarks/bench_serve.py --store store [--only switch,memory,overhead,throughput]

The 32 installed experts of part 2 are the store's experts copied under 32 names into a scratch
store (same sizes as real ones; nothing in the store changes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def p50(xs: list[float]) -> float:
    return statistics.median(xs)


def _experts(store: Path) -> list[str]:
    return [e["name"] for e in json.loads((store / "experts" / "index.json").read_text())["experts"]]


# ---- 1. adapter switch -----------------------------------------------------------------------
def bench_switch(store: Path, reps: int) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from imoe_ray.serving.lora_bank import AdapterBank

    torch.set_num_threads(1)
    names = _experts(store)[:4]
    dirs = {n: store / "experts" / n for n in names}
    ids = torch.randint(3, 200, (1, 8))

    bank_model = AutoModelForCausalLM.from_pretrained(store / "base").eval()
    bank = AdapterBank(bank_model)
    cold, warm = [], []
    for i in range(reps):
        n = names[i % len(names)]
        bank.evict(n)
        t = time.perf_counter()
        bank.load(n, dirs[n])
        with bank.use([n]):
            pass
        cold.append(time.perf_counter() - t)
    for i in range(reps):
        n = names[i % len(names)]
        t = time.perf_counter()
        with bank.use([n]), torch.inference_mode():
            switch = time.perf_counter() - t
            bank_model(input_ids=ids)
        warm.append(switch)

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(store / "base"), str(dirs[names[0]]),
                                     adapter_name="seed").eval()
    p_cold, p_warm = [], []
    for i in range(reps):
        n = f"{names[i % len(names)]}-{i}"
        t = time.perf_counter()
        peft.load_adapter(str(dirs[names[i % len(names)]]), adapter_name=n)
        peft.set_adapter(n)
        p_cold.append(time.perf_counter() - t)
        peft.delete_adapter(n)
    for n in names:
        peft.load_adapter(str(dirs[n]), adapter_name=n)
    for i in range(reps):
        n = names[i % len(names)]
        t = time.perf_counter()
        peft.set_adapter(n)
        p_warm.append(time.perf_counter() - t)
        with torch.inference_mode():
            peft(input_ids=ids)
    out = {"warm_ms": {"bank": p50(warm) * 1e3, "peft_set_adapter": p50(p_warm) * 1e3},
           "cold_ms": {"bank": p50(cold) * 1e3, "peft_load_and_set": p50(p_cold) * 1e3}}
    print(f"adapter switch, p50 of {reps}:")
    print(f"  warm  bank {out['warm_ms']['bank']:.4f} ms   PEFT set_adapter {out['warm_ms']['peft_set_adapter']:.3f} ms"
          f"   ratio {out['warm_ms']['peft_set_adapter'] / out['warm_ms']['bank']:.0f}x")
    print(f"  cold  bank {out['cold_ms']['bank']:.2f} ms   PEFT load_adapter+set_adapter "
          f"{out['cold_ms']['peft_load_and_set']:.2f} ms   ratio {out['cold_ms']['peft_load_and_set'] / out['cold_ms']['bank']:.1f}x")
    return out


# ---- 2. memory with 32 installed experts -----------------------------------------------------
_MEMORY_CHILD = r"""
import json, sys, resource, torch
from pathlib import Path
torch.set_num_threads(1)
store, mode, cap = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
names = [e["name"] for e in json.loads((store / "experts" / "index.json").read_text())["experts"]]
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
ids = torch.randint(3, 200, (1, 8))
if mode == "bank":
    from imoe_ray.serving.model import ServingModel
    from imoe_ray.serving.generation import GenerationRequest
    m = ServingModel(store, capacity=cap, threads=1)
    for rnd in range(2):
        for n in names:
            m.generate([GenerationRequest([1, 5, 6], {n: 1.0}, 2)])
    extra = m.bank.resident_bytes
elif mode == "peft":
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(store / "base"), str(store / "experts" / names[0]),
                                  adapter_name=names[0]).eval()
    for n in names[1:]:
        m.load_adapter(str(store / "experts" / n), adapter_name=n)
    for n in names:
        m.set_adapter(n)
        with torch.inference_mode():
            m(input_ids=ids)
    extra = sum(p.numel() * p.element_size() for k, p in m.named_parameters() if "lora_" in k)
else:
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(store / "base").eval()
    with torch.inference_mode():
        m(input_ids=ids)
    extra = 0
print(json.dumps({"rss_mb": rss_mb(), "adapter_bytes": extra}))
"""


def _scratch_store(store: Path, n: int) -> Path:
    """A store whose experts/ lists `n` experts: the real ones copied under new names."""
    root = Path(tempfile.mkdtemp(prefix="imoe-bench-")) / "store"
    (root / "experts").mkdir(parents=True)
    os.symlink(store / "base", root / "base")
    names = _experts(store)
    rows = []
    for i in range(n):
        src = names[i % len(names)]
        shutil.copytree(store / "experts" / src, root / "experts" / f"x{i:02d}-{src}")
        rows.append({"name": f"x{i:02d}-{src}"})
    (root / "experts" / "index.json").write_text(json.dumps({"experts": rows, "aliases": {}}))
    return root


def bench_memory(store: Path, installed: int, capacity: int) -> dict:
    scratch = _scratch_store(store, installed)

    def child(mode: str) -> dict:
        out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(scratch), mode, str(capacity)],
                             capture_output=True, text=True, cwd=REPO, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    base, bank, peft = child("base"), child("bank"), child("peft")
    one = bank["adapter_bytes"] / max(1, capacity) / 2**20
    budget = (base["rss_mb"] + capacity * one) * 1.10
    print(f"resident memory, {installed} installed experts, max_loaded_experts={capacity}:")
    print(f"  base alone {base['rss_mb']:.0f} MB | bank {bank['rss_mb']:.0f} MB (adapters {bank['adapter_bytes'] / 2**20:.1f} MB) | "
          f"PEFT all loaded {peft['rss_mb']:.0f} MB (adapters {peft['adapter_bytes'] / 2**20:.1f} MB)")
    print(f"  bank over base {bank['rss_mb'] - base['rss_mb']:.0f} MB, PEFT over base {peft['rss_mb'] - base['rss_mb']:.0f} MB; "
          f"target: bank <= {budget:.0f} MB (base + {capacity} adapters + 10%) -> {'met' if bank['rss_mb'] <= budget else 'MISSED'}")
    shutil.rmtree(scratch.parent, ignore_errors=True)
    return {"base": base, "bank": bank, "peft": peft, "budget_mb": budget}


# ---- 3 and 4: through Serve ------------------------------------------------------------------
def _serve(store: Path, port: int, overrides: list[str]) -> str:
    from imoe_ray.cluster import init_ray
    from imoe_ray.config import RayConfig
    from serve_apps.imoe import start

    init_ray(RayConfig(num_cpus=2))
    return start(str(store), None, overrides, port=port)


def _floor_app():
    """Ray Serve with nothing of ours: a FastAPI ingress that hands the JSON body to a second
    deployment by handle and returns its answer, the two hops every `imoe` request makes."""
    from fastapi import FastAPI
    from ray import serve

    api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Echo:
        def __call__(self, body: dict) -> dict:
            return {"object": "text_completion", "choices": [{"index": 0, "text": ""}], "request": body}

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class Ingress:
        def __init__(self, echo):
            self.echo = echo

        @api.post("/completions")
        async def completions(self, body: dict) -> dict:
            return await self.echo.remote(body)

    return Ingress.bind(Echo.bind())


def bench_overhead(store: Path, port: int, reps: int, tokens: int) -> dict:
    """HTTP requests, in-process generate calls and requests to Ray Serve's floor app alternate, so
    that drift in this machine's speed affects all alike; the overhead is the median of the paired
    differences."""
    import requests
    import torch
    from ray import serve

    from imoe_ray.serving.generation import GenerationRequest
    from imoe_ray.serving.model import ServingModel

    name = _experts(store)[0]
    url = _serve(store, port, ["serve.max_replicas=1", "serve.expert_cpus=1", "serve.router_cpus=0.5"])
    serve.run(_floor_app(), name="floor", route_prefix="/floor")
    floor_url = f"http://127.0.0.1:{port}/floor/completions"
    body = {"model": name, "prompt": "the function returns", "max_tokens": tokens, "temperature": 0}
    torch.set_num_threads(1)
    model = ServingModel(store, threads=1)
    prompt = [model.tokenizer.eos_token_id] + model.tokenizer("the function returns", add_special_tokens=False)["input_ids"]
    session = requests.Session()
    http, local, server, replica, floor = [], [], [], [], []
    for i in range(reps + 5):
        t = time.perf_counter()
        r = session.post(f"{url}/completions", json=body, timeout=60)
        elapsed = time.perf_counter() - t
        r.raise_for_status()
        reply = r.json()
        assert reply["usage"]["completion_tokens"] == tokens
        t = time.perf_counter()
        model.generate([GenerationRequest(prompt, {name: 1.0}, tokens)])
        generated = time.perf_counter() - t
        t = time.perf_counter()
        session.post(floor_url, json=body, timeout=60).raise_for_status()
        if i >= 5:
            http.append(elapsed)
            local.append(generated)
            floor.append(time.perf_counter() - t)
            server.append(reply["imoe"]["server_ms"] / 1e3)
            replica.append(reply["imoe"]["timings_ms"]["generate"] / 1e3)
    ms = lambda xs: p50(xs) * 1e3  # noqa: E731
    out = {"http_p50_ms": ms(http), "in_process_p50_ms": ms(local),
           "overhead_ms": ms([h - g for h, g in zip(http, local)]),
           "proxy_and_http_ms": ms([h - s for h, s in zip(http, server)]),
           "router_and_handle_ms": ms([s - g for s, g in zip(server, replica)]),
           "replica_decode_minus_in_process_ms": ms([g - x for g, x in zip(replica, local)]),
           "ray_serve_floor_ms": ms(floor),
           "overhead_beyond_floor_ms": ms([h - g - f for h, g, f in zip(http, local, floor)])}
    print(f"request overhead ({tokens} tokens, forced expert, p50 of {reps} alternating pairs): HTTP through Serve "
          f"{out['http_p50_ms']:.1f} ms, in-process generate {out['in_process_p50_ms']:.1f} ms, "
          f"overhead {out['overhead_ms']:.1f} ms (target <= 15 ms)")
    print(f"  where: proxy + HTTP {out['proxy_and_http_ms']:.1f} ms | router + handle call {out['router_and_handle_ms']:.1f} ms"
          f" | replica decoding vs in-process {out['replica_decode_minus_in_process_ms']:+.1f} ms")
    print(f"  Ray Serve's floor for the same two hops (no model): {out['ray_serve_floor_ms']:.1f} ms; "
          f"our overhead beyond it: {out['overhead_beyond_floor_ms']:.1f} ms")
    serve.delete("floor")
    serve.delete("imoe")
    return out


def _load(url: str, clients: int, per_client: int, tokens: int, names: list[str]) -> float:
    import requests

    done = []

    def client(c: int) -> None:
        s = requests.Session()
        for i in range(per_client):
            body = {"model": names[(c + i) % len(names)], "prompt": f"request {c} {i} returns", "max_tokens": tokens,
                    "temperature": 0}
            r = s.post(f"{url}/completions", json=body, timeout=300)
            r.raise_for_status()
            done.append(r.json()["usage"]["completion_tokens"])

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sum(done) / (time.perf_counter() - t)


def bench_throughput(store: Path, port: int, clients: int, per_client: int, tokens: int) -> dict:
    from ray import serve

    os.nice(19)  # the load generator runs on the same 2 cores: it must not starve the server (Ray workers run at nice 15)
    names = _experts(store)[:4]  # mixed adapters: every batch holds several experts
    settings = ["serve.max_replicas=1", "serve.expert_cpus=1", "serve.router_cpus=0.5", "serve.max_loaded_experts=4"]
    out = {}
    for label, size in (("batched", 16), ("unbatched", 1)):
        url = _serve(store, port, settings + [f"serve.max_batch_size={size}"])
        _load(url, 2, 1, tokens, names)  # warm up: adapters resident
        out[label] = _load(url, clients, per_client, tokens, names)
        serve.delete("imoe")
    out["ratio"] = out["batched"] / out["unbatched"]
    print(f"throughput, {clients} concurrent clients x {per_client} requests of {tokens} tokens over {len(names)} experts: "
          f"batched {out['batched']:.0f} tok/s, unbatched {out['unbatched']:.0f} tok/s, ratio {out['ratio']:.2f}x (target >= 3x)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, type=Path)
    parser.add_argument("--only", default="switch,memory,overhead,throughput")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--installed", type=int, default=32)
    parser.add_argument("--max-loaded", type=int, default=4)
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--per-client", type=int, default=4)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    store, parts, results = args.store.resolve(), args.only.split(","), {}
    if "switch" in parts:
        results["switch"] = bench_switch(store, args.reps)
    if "memory" in parts:
        results["memory"] = bench_memory(store, args.installed, args.max_loaded)
    if "overhead" in parts:
        results["overhead"] = bench_overhead(store, args.port, args.reps, args.tokens)
    if "throughput" in parts:
        results["throughput"] = bench_throughput(store, args.port, args.clients, args.per_client, args.tokens)
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
