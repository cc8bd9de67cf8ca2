"""Whole-model experts under a byte budget: what swapping costs when only one fits, against keeping
both resident.

    python benchmarks/bench_whole_models.py --store STORE [--swaps 20]

Two whole-model experts of the store's embedded base's size (its architecture and tokenizer, weights
re-initialised with two seeds) are registered into a copy of STORE with `imoe_ray.experts.whole_model`
(the `imoe experts add-model` path). Then requests alternate between them, each loading its expert
from the store when it is not resident (`imoe_ray.serving.model_pool.ModelPool`, the expert
replica's LRU), under two budgets:
- ours: `serve.memory_budget_mb` = the base + one model (+1%): exactly one resident, every switch a
  cold load from the store;
- baseline: a budget for both: both resident, a switch costs nothing, memory is twice the models.
Printed side by side: switch latency (p50 / p95 / max, ms), resident MB (the base model counted as
the replica holds it), and the ratio.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def like_base(store: Path, out: Path, seed: int) -> Path:
    """A model directory shaped like STORE/base (config and tokenizer), weights from `seed`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(store / "base"))
    model.save_pretrained(out)
    for f in (store / "base").iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copyfile(f, out / f.name)
    return out


def run(store: Path, swaps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from imoe_ray.config import store_config
    from imoe_ray.experts.whole_model import add_model, model_experts
    from imoe_ray.routing.stage import make_encoder
    from imoe_ray.serving.model_pool import MB, ModelPool, module_bytes

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-whole-"))
    try:
        copy = work / "store"
        copy.mkdir()
        for part in ("base", "experts", "router", "config.yaml", "manifests"):
            src = store / part
            if src.is_dir():
                shutil.copytree(src, copy / part)
            elif src.is_file():
                shutil.copyfile(src, copy / part)
        encoder = make_encoder(store_config(str(copy)))
        for name, seed in (("model-a", 1), ("model-b", 2)):
            add_model(copy, name, like_base(copy, work / name, seed), [name], None, lambda: encoder)
        paths = model_experts(copy)
        base = module_bytes(AutoModelForCausalLM.from_pretrained(copy / "base").eval())
        one = ModelPool(None, max_models=None).get("model-a", paths["model-a"])[0].nbytes
        results = {}
        for label, budget in (("one resident (ours)", base + int(one * 1.01)), ("both resident (baseline)", base + 3 * one)):
            pool = ModelPool(budget, fixed_bytes=lambda: base)
            pool.get("model-b", paths["model-b"])                    # the first request's load, not a switch
            times, peak = [], 0
            for i in range(swaps):
                name = ("model-a", "model-b")[i % 2]
                _, ms = pool.get(name, paths[name])
                times.append(ms)
                peak = max(peak, pool.total_bytes())
            times.sort()
            results[label] = {"p50": statistics.median(times), "p95": times[int(0.95 * (len(times) - 1))],
                              "max": times[-1], "resident_mb": peak / MB, "loads": pool.loads}
        results["sizes"] = {"base_mb": base / MB, "model_mb": one / MB}
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, type=Path)
    parser.add_argument("--swaps", type=int, default=20)
    args = parser.parse_args()
    r = run(args.store.resolve(), args.swaps)
    ours, base = r["one resident (ours)"], r["both resident (baseline)"]
    s = r["sizes"]
    print(f"base model {s['base_mb']:.2f} MB, each whole-model expert {s['model_mb']:.2f} MB; "
          f"{args.swaps} requests alternating between the two experts")
    print(f"{'':28}{'switch p50 ms':>15}{'p95 ms':>10}{'max ms':>10}{'resident MB':>14}{'loads':>7}")
    for label, row in (("one resident (ours)", ours), ("both resident (baseline)", base)):
        print(f"{label:28}{row['p50']:15.1f}{row['p95']:10.1f}{row['max']:10.1f}{row['resident_mb']:14.2f}{row['loads']:7d}")
    print(f"resident memory ours/baseline: {ours['resident_mb'] / base['resident_mb']:.2f}x; "
          f"ours vs one model + base: {ours['resident_mb'] / (s['base_mb'] + s['model_mb']):.3f}x; "
          f"switch p50 ours: {ours['p50']:.1f} ms (baseline {base['p50']:.2f} ms)")


if __name__ == "__main__":
    main()
