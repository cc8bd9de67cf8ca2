"""The adapter kinds an expert can be: one function from the config (and the base model) to a PEFT config."""

from __future__ import annotations

from imoe_ray.config import ExpertsConfig


def target_modules(cfg: ExpertsConfig, model=None) -> list[str] | str:
    """The module names to wrap. PEFT's "all-linear" leaves the output layer out; with
    `output_layer` we name every linear layer ourselves, lm_head included."""
    # DoRA divides by each output row's weight norm: the padding token's all-zero row in a tied
    # output layer would make that NaN, so DoRA keeps PEFT's own all-linear.
    if cfg.target_modules != "all-linear" or not cfg.output_layer or cfg.adapter == "dora" or model is None:
        return cfg.target_modules
    import torch
    from transformers.pytorch_utils import Conv1D

    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, (torch.nn.Linear, Conv1D))})


def peft_config(cfg: ExpertsConfig, model=None):
    from peft import IA3Config, LoraConfig, TaskType

    targets = target_modules(cfg, model)
    if cfg.adapter == "ia3":
        # IA3 rescales activations; its feed-forward modules must be a subset of the targets.
        ff = ["down_proj"] if targets == "all-linear" or "down_proj" in targets else []
        return IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=targets, feedforward_modules=ff)
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=targets, use_dora=cfg.adapter == "dora")


def describe(cfg: ExpertsConfig) -> dict:
    """The adapter's settings as the expert manifest records them."""
    out: dict[str, object] = {"type": cfg.adapter, "target_modules": cfg.target_modules, "output_layer": cfg.output_layer}
    if cfg.adapter != "ia3":
        out |= {"r": cfg.r, "alpha": cfg.alpha, "dropout": cfg.dropout}
    return out
