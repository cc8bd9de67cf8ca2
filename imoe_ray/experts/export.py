"""Experts as portable adapter directories, and the model card every expert directory carries.

`export_expert` writes an expert as a PEFT adapter directory for outside engines:
- `peft`: the adapter as trained (it loads with plain `PeftModel.from_pretrained`);
- `vllm`: what vLLM's LoRA loader accepts: no `lm_head`/embedding targets (vLLM refuses LoRA on the
  output layer and embeddings unless configured for extra vocabulary), only the decoder's linear
  projections, LoRA only (no DoRA/IA3), and a rank in vLLM's supported set — a smaller rank is padded
  with zero rows/columns and `lora_alpha` rescaled, so B·A·alpha/r is unchanged.
Both have a `base_model_name_or_path` that is a hub id, or a path relative to the output directory,
never an absolute path of the machine that trained it. Dropping the output layer's LoRA changes
the expert; `experts.output_layer` decides whether there is one to drop (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)   # vLLM's max_lora_rank choices
VLLM_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "qkv_proj", "gate_up_proj", "dense", "query_key_value", "dense_h_to_4h", "dense_4h_to_h",
                "c_attn", "c_proj", "c_fc", "fc1", "fc2", "out_proj", "w1", "w2", "w3", "wqkv", "wo"}
_NOT_FOR_VLLM = ("lm_head", "embed_tokens", "embed_out", "wte", "word_embeddings", "output_layer")
ADAPTER_CONFIG, ADAPTER_WEIGHTS, CARD = "adapter_config.json", "adapter_model.safetensors", "README.md"


class ExportError(ValueError):
    """An expert that cannot be exported in the asked format; the message says why."""


def model_card(manifest: dict, base_ref: str | None = None) -> str:
    """README.md with Hugging Face front matter, from an expert's manifest: what it knows (category,
    keywords), what it was trained on and how well, and on which base model."""
    base = base_ref or manifest.get("base_model", {}).get("name", "store:base")
    routing = manifest.get("routing", {})
    training = manifest.get("training", {})
    adapter = manifest.get("adapter", {})
    keywords = [str(k) for k in routing.get("keywords", [])]
    front = {"library_name": "peft", "base_model": base, "pipeline_tag": "text-generation",
             "tags": ["imoe-ray", "lora" if adapter.get("type", "lora") == "lora" else adapter.get("type"),
                      *([f"category:{manifest['category']['name']}"] if "category" in manifest else [])]}
    lines = ["---", *_yaml(front), "---", "", f"# {manifest.get('name', 'expert')}", ""]
    kind = manifest.get("kind", "expert")
    if "category" in manifest:
        lines += [f"An IMoE-Ray {kind} for the discovered category `{manifest['category']['name']}` "
                  f"(id {manifest['category']['id']}), served by routing; categories it serves: "
                  f"{', '.join(manifest.get('categories', [manifest['category']['name']]))}.", ""]
    else:
        lines += [f"An IMoE-Ray {kind}.", ""]
    lines += ["| | |", "|---|---|",
              f"| base model | `{base}` (fingerprint `{manifest.get('base_model', {}).get('fingerprint', '?')}`) |",
              f"| adapter | {adapter.get('type', '?')}, r={adapter.get('r', '-')}, alpha={adapter.get('alpha', '-')}, "
              f"output layer: {adapter.get('output_layer', '-')} |",
              f"| routing keywords | {', '.join(keywords) or '(none)'} |",
              f"| training rows | {manifest.get('rows', '-')} |",
              f"| training tokens | {training.get('tokens', '-')} |",
              f"| final training loss | {training.get('loss', '-')} |",
              f"| epochs | {training.get('epochs', '-')} |",
              f"| created | {manifest.get('created_at', '-')} |", ""]
    if "evaluation" in manifest:
        lines += ["## Evaluation", "", "```json", json.dumps(manifest["evaluation"], indent=2), "```", ""]
    lines += ["## Use", "", "```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM",
              "", f"base = AutoModelForCausalLM.from_pretrained({base!r})",
              "model = PeftModel.from_pretrained(base, \"path/to/this/directory\")", "```", ""]
    return "\n".join(lines)


def _yaml(data: dict) -> list[str]:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).rstrip().splitlines()


def _base_ref(manifest: dict, store_base: Path | None, out: Path) -> str:
    """A hub id when the expert's base came from one, else the store's base relative to `out`."""
    name = manifest.get("base_model", {}).get("name", "store:base")
    if name and name != "store:base" and not os.path.isabs(name) and not Path(name).exists():
        return name
    if store_base is None:
        return "base"
    return os.path.relpath(store_base.resolve(), out.resolve())


def _vllm_rank(r: int) -> int:
    fit = [v for v in VLLM_RANKS if v >= r]
    if not fit:
        raise ExportError(f"rank {r} is above vLLM's largest supported rank {VLLM_RANKS[-1]}")
    return fit[0]


def export_expert(expert_dir: str | Path, out: str | Path, fmt: Literal["peft", "vllm"] = "vllm",
                  store_base: str | Path | None = None) -> dict:
    """Write the expert in `expert_dir` as an adapter directory `out` (temp, then rename); returns a
    summary: format, rank, targets, dropped modules."""
    from safetensors.torch import load_file, save_file

    src, out = Path(expert_dir), Path(out)
    if not (src / ADAPTER_CONFIG).is_file() or not (src / ADAPTER_WEIGHTS).is_file():
        raise ExportError(f"{src} is not a PEFT adapter directory ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} expected)")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty")
    config = json.loads((src / ADAPTER_CONFIG).read_text())
    manifest = json.loads((src / "manifest.json").read_text()) if (src / "manifest.json").is_file() else {}
    tensors = load_file(str(src / ADAPTER_WEIGHTS))
    dropped: list[str] = []
    if fmt == "vllm":
        if config.get("peft_type") != "LORA" or config.get("use_dora"):
            kind = "DoRA" if config.get("use_dora") else config.get("peft_type")
            raise ExportError(f"vLLM serves LoRA adapters; this expert is {kind}")
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            raise ExportError("vLLM needs one rank for every module; this expert has rank or alpha patterns")
        targets = config.get("target_modules") or []
        targets = [targets] if isinstance(targets, str) else list(targets)
        dropped = sorted({t for t in targets if t in _NOT_FOR_VLLM or t not in VLLM_TARGETS})
        keep = [t for t in targets if t not in dropped]
        if not keep:
            raise ExportError(f"none of the expert's target modules ({', '.join(targets)}) is one vLLM applies LoRA to")
        tensors = {k: v for k, v in tensors.items()
                   if not any(f".{d}." in k or k.endswith(f".{d}") for d in dropped) and "embed" not in k}
        r = int(config["r"])
        rank = _vllm_rank(r)
        if rank != r:
            tensors = {k: _pad_rank(k, v, rank) for k, v in tensors.items()}
            ratio = math.sqrt(rank / r) if config.get("use_rslora") else rank / r
            config["lora_alpha"] = float(config["lora_alpha"]) * ratio
            config["r"] = rank
        config |= {"target_modules": keep, "modules_to_save": None}
    out.parent.mkdir(parents=True, exist_ok=True)
    config["base_model_name_or_path"] = _base_ref(manifest, Path(store_base) if store_base else None, out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
        if manifest:
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        (tmp / CARD).write_text(model_card(manifest | {"name": manifest.get("name", src.name)},
                                           config["base_model_name_or_path"]))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"format": fmt, "out": str(out), "r": config.get("r"), "target_modules": config.get("target_modules"),
            "dropped": dropped, "base_model_name_or_path": config["base_model_name_or_path"]}


def _pad_rank(key: str, tensor, rank: int):
    """LoRA A (r, in) gets zero rows, B (out, r) zero columns: the product is unchanged."""
    import torch

    if key.endswith("lora_A.weight"):
        return torch.cat([tensor, tensor.new_zeros(rank - tensor.shape[0], tensor.shape[1])])
    if key.endswith("lora_B.weight"):
        return torch.cat([tensor, tensor.new_zeros(tensor.shape[0], rank - tensor.shape[1])], dim=1)
    return tensor
