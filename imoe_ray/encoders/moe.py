"""A sparse mixture-of-experts sentence encoder "upcycled" from a dense BERT encoder (plain PyTorch).

`upcycle` replaces the feed-forward block (intermediate + output dense) of every `every`-th layer by
E expert FFNs initialised as copies of it (plus optional noise so they can diverge) and a per-token
linear router picking the top-k experts (gates: softmax over the k chosen logits). The BERT layer
keeps its own dropout, residual and LayerNorm, so a token an expert has no room for (capacity
factor, training only) passes through the residual unchanged. Each MoE layer records the
Switch/GShard load-balancing loss E · Σ_i f_i · P_i of its last forward and counts tokens per expert.

At inference no token is dropped: an embedding must not depend on the other texts of its batch.

Saved as a directory: the BERT `config.json`, the tokenizer, `imoe_moe.json` (E, k, layers, capacity)
and `imoe_moe.safetensors` (a plain state dict: no pickle, no remote code). `Encoder` rebuilds it
when `imoe_moe.json` is present.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

MOE_FILE = "imoe_moe.json"
WEIGHTS_FILE = "imoe_moe.safetensors"


@dataclass
class MoESpec:
    n_experts: int = 4
    top_k: int = 2
    layers: list[int] = field(default_factory=list)  # indices of the encoder layers that are MoE
    capacity_factor: float | None = 1.25  # None: no capacity limit


class MoEFeedForward(nn.Module):
    """Top-k gated expert FFNs over the tokens of a batch; output (b, t, hidden), the FFN's residual branch."""

    def __init__(self, hidden: int, intermediate: int, n_experts: int, top_k: int,
                 capacity_factor: float | None, activation: nn.Module):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in 1..n_experts ({n_experts}), not {top_k}")
        self.n_experts, self.top_k, self.capacity_factor = n_experts, top_k, capacity_factor
        self.router = nn.Linear(hidden, n_experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, intermediate), activation, nn.Linear(intermediate, hidden))
            for _ in range(n_experts))
        self.token_mask: torch.Tensor | None = None  # (b, t) attention mask, set by the model's pre-hook
        self.aux_loss = torch.zeros(())
        self.reset_counts()

    def reset_counts(self) -> None:
        self.routed = torch.zeros(self.n_experts, dtype=torch.long)   # token-slots sent to each expert
        self.dropped = torch.zeros(self.n_experts, dtype=torch.long)  # of those, over capacity

    def capacity(self, n_tokens: int) -> int | None:
        if not self.training or self.capacity_factor is None:
            return None
        return max(1, math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        flat = hidden.reshape(-1, shape[-1])
        n = flat.shape[0]
        valid = (self.token_mask.reshape(-1).bool() if self.token_mask is not None and self.token_mask.numel() == n
                 else torch.ones(n, dtype=torch.bool, device=flat.device))
        logits = self.router(flat).float()
        top_logits, top_experts = logits.topk(self.top_k, dim=-1)  # (n, k)
        gates = torch.softmax(top_logits, dim=-1).to(hidden.dtype)

        # queue position of every valid (token, slot) in its expert: first choices before second choices
        slots = top_experts.t().reshape(-1)  # (k*n,) slot-major
        slot_valid = valid.repeat(self.top_k)
        one_hot = nn.functional.one_hot(slots, self.n_experts) * slot_valid.unsqueeze(-1)
        keep = slot_valid
        if self.training and self.capacity_factor is not None:
            position = ((one_hot.cumsum(0) - 1) * one_hot).sum(-1)
            keep = keep & (position < self.capacity(int(valid.sum())))

        n_valid = valid.sum().clamp(min=1)
        probs = torch.softmax(logits, dim=-1) * valid.unsqueeze(-1)
        share = one_hot.sum(0).float() / (n_valid * self.top_k)  # f_i: share of the valid token-slots
        self.aux_loss = self.n_experts * (share.detach() * probs.sum(0) / n_valid).sum()
        with torch.no_grad():  # counted where the model runs: reading them back is `utilisation`'s one sync
            self.routed = self.routed.to(flat.device) + one_hot.sum(0)
            self.dropped = self.dropped.to(flat.device) + (one_hot * (~keep).unsqueeze(-1)).sum(0)
        return self._dispatch(flat, slots, gates, keep).reshape(shape)

    def _dispatch(self, flat: torch.Tensor, slots: torch.Tensor, gates: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Each kept (token, slot) through its expert, gated, summed per token. The slots are sorted by
        expert so each expert runs on one contiguous slice: one host sync per layer (the slice sizes),
        where masking per expert would sync once per expert."""
        n = flat.shape[0]
        bucket = torch.where(keep, slots, self.n_experts)  # dropped slots and padding: a bucket no expert reads
        order = torch.argsort(bucket, stable=True)
        sizes = torch.bincount(bucket, minlength=self.n_experts + 1).tolist()
        token_of = torch.arange(n, device=flat.device).repeat(self.top_k)[order]
        gate_of = gates.t().reshape(-1)[order].unsqueeze(-1)
        inputs = flat[token_of[:sum(sizes[:-1])]]
        outputs = [expert(part) for expert, part in zip(self.experts, inputs.split(sizes[:-1])) if len(part)]
        out = torch.zeros_like(flat)
        if outputs:
            kept = inputs.shape[0]
            out.index_add_(0, token_of[:kept], torch.cat(outputs) * gate_of[:kept])
        return out


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Mean load-balancing loss of the MoE layers' last forward (1.0 = perfectly balanced)."""
    losses = [m.aux_loss for m in moe_layers(model)]
    return torch.stack(losses).mean() if losses else torch.zeros(())


def utilisation(model: nn.Module) -> list[dict]:
    """Per MoE layer: the share of token-slots each expert got, and the share dropped over capacity."""
    out = []
    for layer, m in zip(model.imoe_moe.layers, moe_layers(model)):
        total = max(1, int(m.routed.sum()))
        out.append({"layer": layer, "share": [round(int(c) / total, 4) for c in m.routed],
                    "dropped": round(int(m.dropped.sum()) / total, 4), "tokens": total // m.top_k})
    return out


def reset_utilisation(model: nn.Module) -> None:
    for m in moe_layers(model):
        m.reset_counts()


def _set_token_mask(model: nn.Module, args: tuple, kwargs: dict) -> None:
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1:
        mask = args[1]
    for m in moe_layers(model):
        m.token_mask = mask


def upcycle(model: nn.Module, n_experts: int = 4, top_k: int = 2, every: int = 2,
            capacity_factor: float | None = 1.25, noise: float = 0.0, seed: int = 0) -> nn.Module:
    """Turn a BERT-style encoder (HF `BertModel`) into a sparse MoE encoder, in place; returns it.

    Layers `every-1, 2*every-1, ...` (every=1: all) get E copies of their FFN; `noise` adds Gaussian
    noise of that fraction of each weight's std to every copy but the first."""
    layers = model.encoder.layer
    chosen = [i for i in range(len(layers)) if (i + 1) % every == 0]
    if not chosen:
        raise ValueError(f"every={every} leaves no MoE layer in a {len(layers)}-layer encoder")
    generator = torch.Generator().manual_seed(seed)
    for i in chosen:
        layer = layers[i]
        dense_in, dense_out = layer.intermediate.dense, layer.output.dense
        moe = MoEFeedForward(dense_in.in_features, dense_in.out_features, n_experts, top_k, capacity_factor,
                             layer.intermediate.intermediate_act_fn)
        with torch.no_grad():
            nn.init.normal_(moe.router.weight, std=0.02, generator=generator)
            for e, expert in enumerate(moe.experts):
                for target, source in ((expert[0], dense_in), (expert[2], dense_out)):
                    for name in ("weight", "bias"):
                        value = getattr(source, name).detach().clone()
                        if noise and e:
                            value += torch.randn(value.shape, generator=generator) * noise * value.std()
                        getattr(target, name).copy_(value)
        moe.to(dense_in.weight.device, dense_in.weight.dtype)
        moe.train(layer.training)
        layer.intermediate = moe
        layer.output.dense = nn.Identity()  # output: LayerNorm(dropout(moe(x)) + x)
    model.imoe_moe = MoESpec(n_experts, top_k, chosen, capacity_factor)
    model.register_forward_pre_hook(_set_token_mask, with_kwargs=True)
    return model


def is_moe_dir(path: str | Path) -> bool:
    return (Path(path) / MOE_FILE).is_file()


def save_moe(model: nn.Module, tokenizer, directory: str | Path, extra: dict | None = None) -> None:
    """Write the encoder as a directory `load_moe` (and `Encoder`) reads."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    (directory / MOE_FILE).write_text(json.dumps(asdict(model.imoe_moe) | (extra or {}), indent=2))


def load_moe(directory: str | Path) -> nn.Module:
    """Rebuild a saved MoE encoder: the BERT skeleton from its config, upcycled, then its weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    directory = Path(directory)
    try:
        spec = json.loads((directory / MOE_FILE).read_text())
        config = AutoConfig.from_pretrained(directory)
        model = AutoModel.from_config(config)
        layers = spec["layers"]
        every = layers[1] - layers[0] if len(layers) > 1 else layers[0] + 1
        upcycle(model, spec["n_experts"], spec["top_k"], every, spec["capacity_factor"])
        if model.imoe_moe.layers != layers:
            raise ValueError(f"{MOE_FILE} lists MoE layers {layers}, which no 'every' reproduces")
        # assign: the weights keep the dtype they were saved in, whatever dtype the config names
        model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True, assign=True)
    except (KeyError, json.JSONDecodeError, RuntimeError) as e:
        raise ValueError(f"{directory} is not a valid MoE encoder directory: {e}") from e
    return model.eval()
