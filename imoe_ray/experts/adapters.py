"""The adapter kinds an expert can be: one function from the config to a PEFT config."""

from __future__ import annotations

from imoe_ray.config import ExpertsConfig


def peft_config(cfg: ExpertsConfig):
    from peft import IA3Config, LoraConfig, TaskType

    targets = cfg.target_modules
    if cfg.adapter == "ia3":
        # IA3 rescales activations; its feed-forward modules must be a subset of the targets.
        ff = ["down_proj"] if targets == "all-linear" or "down_proj" in targets else []
        return IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=targets, feedforward_modules=ff)
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=targets, use_dora=cfg.adapter == "dora")


def describe(cfg: ExpertsConfig) -> dict:
    """The adapter's settings as the expert manifest records them."""
    out = {"type": cfg.adapter, "target_modules": cfg.target_modules}
    if cfg.adapter != "ia3":
        out |= {"r": cfg.r, "alpha": cfg.alpha, "dropout": cfg.dropout}
    return out
