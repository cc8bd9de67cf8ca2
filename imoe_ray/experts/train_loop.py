"""The Ray Train worker loop: ordinary PyTorch over token blocks, for pre-training and adapters.

Runs on every worker of a `TorchTrainer`. Each report carries a checkpoint (the trainable weights,
the optimizer — with DeepSpeed, each rank's ZeRO partition in safetensors — and the step), so a
restarted worker group (FailureConfig) or a re-run of a killed build continues from the last report
instead of starting over. The final report's checkpoint also
holds `model/`: the Hugging Face model (pre-training) or the PEFT adapter directory (experts).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time

import numpy as np
import torch

TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
DS_OPTIMIZER = "deepspeed-optimizer-rank{rank}.safetensors"
STATE = "state.json"
MODEL_DIR = "model"


def build_model(config: dict) -> torch.nn.Module:
    """The model a job trains: a new base model, or the stored base with a fresh adapter."""
    from imoe_ray.config import ExpertsConfig
    from imoe_ray.experts.adapters import peft_config
    from imoe_ray.experts.base_model import new_model

    if config["kind"] == "pretrain":
        return new_model(config["model_config"], config["seed"])
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(config["seed"])
    base = AutoModelForCausalLM.from_pretrained(base_dir(config["base"]), torch_dtype=torch.float32)
    return get_peft_model(base, peft_config(ExpertsConfig(**config["experts"]), base))


def base_dir(source: dict) -> str:
    """The stored base model as a local directory on this worker's node (a cached copy for a URI store)."""
    from imoe_ray.store import Store
    from imoe_ray.store.layout import BASE

    return str(Store(source["store"], create=False, cache_dir=source.get("cache_dir")).local_dir(BASE))


def lr_at(step: int, total: int, peak: float, warmup_share: float = 0.05) -> float:
    warmup = max(1, int(total * warmup_share))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_order(n_blocks: int, steps: int, batch: int, seed: int) -> np.ndarray:
    """Block indices for every step: shuffled epochs laid end to end, (steps, batch)."""
    rng = np.random.default_rng(seed)
    needed = steps * batch
    order = np.concatenate([rng.permutation(n_blocks) for _ in range(math.ceil(needed / n_blocks))])
    return order[:needed].reshape(steps, batch)


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(path: str, model, optimizer, step: int, metrics: dict, final: bool) -> None:
    from safetensors.torch import save_file

    save_file(_trainable(model), os.path.join(path, TRAINABLE))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), os.path.join(path, OPTIMIZER))
    with open(os.path.join(path, STATE), "w") as f:
        json.dump({"step": step, "metrics": metrics}, f)
    if final:
        model.save_pretrained(os.path.join(path, MODEL_DIR))


class CheckpointRefused(ValueError):
    """A checkpoint file holds something other than tensors and plain values (a pickled object)."""


def load_optimizer_state(path: str) -> dict:
    """An optimizer state saved by `_save_checkpoint`, read without unpickling any object:
    checkpoints live in the store, and whoever can write there must not get code run here."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as e:
        raise CheckpointRefused(f"{path} is not a plain tensor checkpoint (it holds pickled objects?); "
                                f"refusing to load it: {str(e).splitlines()[0][:200]}") from None


def _restore(model, optimizer) -> int:
    """Load the last checkpoint Ray Train hands this run, if any; returns the step to continue from."""
    import ray.train
    from safetensors.torch import load_file

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as d:
        model.load_state_dict(load_file(os.path.join(d, TRAINABLE)), strict=False)
        if optimizer is not None and os.path.exists(os.path.join(d, OPTIMIZER)):
            optimizer.load_state_dict(load_optimizer_state(os.path.join(d, OPTIMIZER)))
        with open(os.path.join(d, STATE)) as f:
            return int(json.load(f)["step"])


def _deepspeed_optimizer_parts(optimizer):
    """(torch optimizer, the tensors its state is keyed by, whether those are ZeRO's fp32 master
    partitions) of a DeepSpeed engine's optimizer: ZeRO 1-2 step a flat fp32 partition per group."""
    masters = getattr(optimizer, "single_partition_of_fp32_groups", None)
    if masters is not None:
        return optimizer.optimizer, list(masters), True
    base = getattr(optimizer, "optimizer", optimizer)
    return base, [p for group in base.param_groups for p in group["params"]], False


def save_deepspeed_optimizer(path: str, optimizer, rank: int) -> None:
    """This rank's part of a DeepSpeed optimizer (ZeRO partitions each rank's) as safetensors: the
    fp32 master partition and every state tensor (Adam's moments, step), nothing pickled. Every rank
    writes its own file into its checkpoint directory; Ray Train merges the workers' directories."""
    from safetensors.torch import save_file

    base, holders, zero = _deepspeed_optimizer_parts(optimizer)
    tensors = {}
    for i, holder in enumerate(holders):
        if zero:
            tensors[f"master.{i}"] = holder.detach().cpu().contiguous()
        for key, value in base.state.get(holder, {}).items():
            if isinstance(value, torch.Tensor) or isinstance(value, (int, float)):
                tensors[f"state.{i}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    save_file(tensors, os.path.join(path, DS_OPTIMIZER.format(rank=rank)))


def restore_deepspeed_optimizer(path: str, optimizer, rank: int) -> bool:
    """Load what `save_deepspeed_optimizer` wrote for this rank into a freshly initialised engine's
    optimizer; False when the checkpoint has none (a run started before this was saved)."""
    from safetensors.torch import load_file

    file = os.path.join(path, DS_OPTIMIZER.format(rank=rank))
    if not os.path.exists(file):
        return False
    tensors = load_file(file)
    base, holders, zero = _deepspeed_optimizer_parts(optimizer)
    for i, holder in enumerate(holders):
        if zero and f"master.{i}" in tensors:
            holder.data.copy_(tensors[f"master.{i}"])
        state = {k.split(".", 2)[2]: v.to(holder.device) for k, v in tensors.items() if k.startswith(f"state.{i}.")}
        if state:
            base.state[holder] = state
    return True


def _deepspeed_engine(model, optimizer, micro_batch: int, zero_stage: int, device: torch.device):
    # DeepSpeed picks its accelerator at import; on a CPU worker it must be told (it then uses gloo).
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if device.type == "cpu" else "cuda")
    import deepspeed

    if device.type == "cpu":
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (a minute of C++ on every
        # fresh worker) that only its inference all-reduce uses; training reduces through gloo anyway.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": device.type == "cuda" and torch.cuda.is_bf16_supported()},
        "zero_allow_untested_optimizer": True,
    }
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, optimizer


def train_loop(config: dict) -> None:
    """Train one model on its token blocks; reports {step, steps, loss, tokens, tokens_per_s} with checkpoints."""
    import ray
    import ray.train
    import ray.train.torch

    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    inputs, labels = config["blocks"] if isinstance(config["blocks"], tuple) else ray.get(config["blocks"])

    model = build_model(config).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config["lr"], weight_decay=config["weight_decay"])
    start = _restore(model, optimizer)

    micro = max(1, config["batch_size"] // world)
    steps = max(1, math.ceil(config["epochs"] * len(inputs) / (micro * world)))
    order = batch_order(len(inputs), steps, micro * world, config["seed"])
    deepspeed = config["strategy"] == "deepspeed"
    if deepspeed:
        engine, optimizer = _deepspeed_engine(model, optimizer, micro, config["zero_stage"], device)
        forward = engine
        checkpoint = ray.train.get_checkpoint() if start else None
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                restore_deepspeed_optimizer(d, optimizer, rank)
    else:
        forward = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model
    report_every = max(1, steps // config.get("reports", 10))
    min_report_s, last_report = config.get("min_report_s", 10.0), time.perf_counter()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and not deepspeed)

    model.train()
    losses, tokens, started = [], 0, time.perf_counter()
    for step in range(start, steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, config["lr"])
        rows = order[step, rank * micro:(rank + 1) * micro]
        x = torch.as_tensor(inputs[rows], device=device)
        y = torch.as_tensor(labels[rows], device=device)
        with autocast:
            loss = forward(input_ids=x, labels=y).loss
        if deepspeed:
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        tokens += int((y != -100).sum()) * world
        final = step + 1 == steps
        # A checkpoint costs a second or two: at most one per `min_report_s` (a single worker decides
        # alone; several workers must report at the same steps, so they follow the step count only).
        due = (step + 1) % report_every == 0 and (world > 1 or time.perf_counter() - last_report >= min_report_s)
        if due or final:
            last_report = time.perf_counter()
            elapsed = time.perf_counter() - started
            metrics = {"step": step + 1, "steps": steps, "loss": round(float(np.mean(losses)), 4),
                       "tokens": tokens, "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1),
                       "epochs": round(config["epochs"], 3), "workers": world, "resumed_from_step": start}
            if device.type == "cuda":
                metrics["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            losses = []
            with tempfile.TemporaryDirectory() as d:
                if deepspeed:  # every rank's optimizer partition, merged into one checkpoint by Ray Train
                    save_deepspeed_optimizer(d, optimizer, rank)
                if rank == 0:
                    _save_checkpoint(d, model, None if deepspeed else optimizer, step + 1, metrics, final)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
                else:
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if deepspeed else None)
