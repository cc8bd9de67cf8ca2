"""LoRA experts resident next to one base model, mixed freely inside a batch.

PEFT switches adapters for the whole model (`set_adapter`) and loads them through its tuner
machinery (`load_adapter`), both far slower than a batch step (`benchmarks/bench_serve.py` times an
adapter switch both ways). Serving many small experts wants neither: the bank
reads an adapter's two low-rank matrices per layer straight from its safetensors file, keeps them
as plain tensors, and every wrapped linear layer adds

    y = W x + s_j · B_j (A_j x)          for the adapter j of each row of the batch

so one forward pass serves rows of different experts (the S-LoRA/Punica idea without custom
kernels: the batch is grouped by adapter and each group's update is two small matmuls on its
slice). Switching an adapter is choosing an index; loading one is
reading a file of a few MB. The base weights are never modified, so "base" is simply index 0.
The files are the PEFT adapter directories training writes. DoRA adds, per output row, the ratio of
its learnt magnitude to the norm of the adapted weight (computed once, at load, from the base
weight), y = Wx + b + (g − 1)·Wx + g·s·B(Ax); IA3 rescales a layer's output (or, for feed-forward
layers, its input) by a learnt vector. Anything else (per-module rank or alpha patterns, other PEFT
types) is refused with a clear error.
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

BASE = "base"
_PREFIX = "base_model.model."
_A, _B = ".lora_A.weight", ".lora_B.weight"


class AdapterError(ValueError):
    """An adapter directory the bank cannot serve; the message says why."""


@dataclass
class LoRAWeights:
    """One adapter: per wrapped module, A (r, in) and B (out, r), and its scale alpha/r; for DoRA the
    per-module magnitude (out,) (turned into the ratio magnitude / ‖W + s·BA‖ when loaded); for IA3
    the per-module scaling vector and whether it scales the input (feed-forward) or the output."""
    name: str
    rank: int
    scale: float
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    magnitude: dict[str, torch.Tensor] = field(default_factory=dict)
    ia3: dict[str, tuple[torch.Tensor, bool]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        tensors = [t for pair in self.modules.values() for t in pair] + list(self.magnitude.values()) + \
            [v for v, _ in self.ia3.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def targets(self) -> set[str]:
        return set(self.modules) | set(self.ia3)


def read_lora(name: str, adapter_dir: str | Path, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> LoRAWeights:
    """Read a PEFT LoRA adapter directory into plain tensors (no PEFT machinery involved)."""
    root = Path(adapter_dir)
    config_path, weights_path = root / "adapter_config.json", root / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise AdapterError(f"{root} is not a PEFT adapter directory (adapter_config.json and "
                           f"adapter_model.safetensors expected)")
    config = json.loads(config_path.read_text())
    kind = config.get("peft_type")
    if kind not in ("LORA", "IA3"):
        raise AdapterError(f"adapter {name!r} is {kind}; the bank serves LoRA, DoRA and IA3")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise AdapterError(f"adapter {name!r} has per-module rank or alpha patterns, which the bank does not serve")
    tensors = _read_tensors(weights_path, device, kind)
    if kind == "IA3":
        ia3 = {}
        for key, v in tensors.items():
            if key.endswith(".ia3_l"):
                module = key[len(_PREFIX):-len(".ia3_l")] if key.startswith(_PREFIX) else key[:-len(".ia3_l")]
                ia3[module] = (v.to(dtype).flatten().contiguous(), v.shape[0] == 1 and v.dim() == 2 and v.shape[1] > 1)
        if not ia3:
            raise AdapterError(f"adapter {name!r} holds no IA3 weights")
        return LoRAWeights(name, 0, 1.0, {}, ia3=ia3)
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    modules, magnitude = {}, {}
    for key, a in tensors.items():
        for suffix in (".lora_magnitude_vector", ".lora_magnitude_vector.weight"):
            if key.endswith(suffix):
                module = key[:-len(suffix)]
                magnitude[module[len(_PREFIX):] if module.startswith(_PREFIX) else module] = a.to(dtype).flatten()
        if not key.endswith(_A):
            continue
        module = key[len(_PREFIX):-len(_A)] if key.startswith(_PREFIX) else key[:-len(_A)]
        b = tensors.get(key[:-len(_A)] + _B)
        if b is None:
            raise AdapterError(f"adapter {name!r} has {key} without its lora_B")
        modules[module] = (a.to(dtype).contiguous(), b.to(dtype).contiguous())
    if not modules:
        raise AdapterError(f"adapter {name!r} holds no LoRA weights")
    if config.get("use_dora") and set(magnitude) != set(modules):
        raise AdapterError(f"adapter {name!r} is DoRA but its magnitude vectors do not match its LoRA modules")
    return LoRAWeights(name, rank, scale, modules, magnitude)


_WANTED = {"LORA": (_A, _B, ".lora_magnitude_vector", ".lora_magnitude_vector.weight"), "IA3": (".ia3_l",)}


def _read_tensors(path: Path, device: torch.device | str, kind: str) -> dict[str, torch.Tensor]:
    """The adapter's own tensors of a safetensors file, and only those: a PEFT file may also hold
    copies of base layers (`base_layer.weight` of a tied output layer, `modules_to_save`), which
    the bank never uses and which are often most of its bytes. Read with `pread` where safetensors
    offers it (0.8+) for a CPU bank: a load is then a few reads, not a mapping whose pages fault in
    during the first pass that uses them."""
    from safetensors import safe_open

    handle = None
    if torch.device(device).type == "cpu":
        try:
            handle = safe_open(str(path), framework="pt", device="cpu", backend="pread")
        except TypeError:  # safetensors before 0.8
            pass
    if handle is None:  # memory-mapped
        handle = safe_open(str(path), framework="pt", device=str(device))
    with handle as f:
        return {key: f.get_tensor(key) for key in f.keys() if key.endswith(_WANTED[kind])}


def dora_ratio(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, magnitude: torch.Tensor) -> torch.Tensor:
    """magnitude / ‖W + s·B·A‖ per output row, as PEFT's DoRA computes it (the norm is not trained through)."""
    adapted = weight.float() + scale * (b.float() @ a.float())
    return (magnitude.float() / torch.linalg.norm(adapted, dim=1)).to(a.dtype)


class _Plan:
    """Which adapter every row of the current batch uses, as runs of consecutive rows that share one
    (a batch grouped by adapter has one run per adapter). Each run adds its low-rank update to its
    slice of the output in place: a few small matmuls per layer, nothing gathered or stacked."""

    def __init__(self, adapters: list[LoRAWeights | None], rows: list[int]):
        self.adapters = adapters                     # None: the base (no adapter)
        self.runs: list[tuple[int, int, int]] = []   # (adapter index, first row, row after the last)
        for i, j in enumerate(rows):
            if self.runs and self.runs[-1][0] == j:
                self.runs[-1] = (j, self.runs[-1][1], i + 1)
            else:
                self.runs.append((j, i, i + 1))

    def add_delta(self, module: str, x: torch.Tensor, y: torch.Tensor, base: nn.Linear) -> None:
        whole = len(self.runs) == 1
        for j, start, stop in self.runs:
            adapter = self.adapters[j]
            if adapter is None:
                continue
            part = x if whole else x[start:stop]
            out = y if whole else y[start:stop]
            if module in adapter.ia3:
                vector, feedforward = adapter.ia3[module]
                if feedforward:  # W(x·l) + b = Wx + b + W(x·(l − 1))
                    out.add_(torch.nn.functional.linear(part * (vector - 1), base.weight).to(y.dtype))
                else:
                    out.mul_(vector.to(y.dtype))
                continue
            if module not in adapter.modules:
                continue
            a, b = adapter.modules[module]
            delta = (part @ a.t()) @ b.t()
            if module in adapter.magnitude:  # DoRA: (g − 1)·Wx + g·s·B(Ax), g = magnitude / ‖W + s·BA‖
                g = adapter.magnitude[module].to(y.dtype)
                plain = out if base.bias is None else out - base.bias
                out.add_(plain * (g - 1) + (delta.to(y.dtype) * adapter.scale) * g)
            else:
                out.add_(delta.to(y.dtype), alpha=adapter.scale)


class LoRAHost(nn.Module):
    """A base linear layer plus whatever adapter deltas the bank's current plan asks for."""

    def __init__(self, base: nn.Linear, module: str, bank: "AdapterBank"):
        super().__init__()
        self.base_layer = base
        self.module = module
        self._bank = [bank]  # a list, so the bank is not registered as a sub-module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        plan = self._bank[0].plan
        if plan is not None:
            plan.add_delta(self.module, x, y, self.base_layer)
        return y


class AdapterBank:
    """Resident LoRA adapters over one base model, with an optional LRU capacity.

    `load` reads an adapter (cold), `use` selects one adapter or a mix of adapters per row for the
    forward passes run inside it (warm). Forward passes through the model are serialised by a lock:
    the plan is state of the model."""

    def __init__(self, model: nn.Module, capacity: int | None = None, on_evict=None):
        self.model = model
        self.capacity = capacity
        self.on_evict = on_evict  # called with the name of each adapter the LRU drops
        self.resident: OrderedDict[str, LoRAWeights] = OrderedDict()
        self.most_resident = 0  # the most adapters ever resident at once (strict mode: 1)
        self.plan: _Plan | None = None
        self.lock = threading.RLock()
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype
        self._hosts: dict[str, LoRAHost] = {}

    # ---- residency ---------------------------------------------------------------------
    def load(self, name: str, adapter_dir: str | Path) -> LoRAWeights:
        """Make an adapter resident (a no-op when it is). At capacity, the least recently used one is
        evicted first, before the new one is read: resident adapters (and their memory) never
        exceed the capacity, not even during a load."""
        if name in self.resident:
            self.resident.move_to_end(name)
            return self.resident[name]
        while self.capacity is not None and self.resident and len(self.resident) >= self.capacity:
            dropped, _ = self.resident.popitem(last=False)
            if self.on_evict is not None:
                self.on_evict(dropped)
        weights = read_lora(name, adapter_dir, self.device, self.dtype)
        self._host(weights)
        for module, magnitude in list(weights.magnitude.items()):
            a, b = weights.modules[module]
            weights.magnitude[module] = dora_ratio(self._hosts[module].base_layer.weight, a, b, weights.scale, magnitude)
        self.resident[name] = weights
        self.most_resident = max(self.most_resident, len(self.resident))
        return weights

    def evict(self, name: str) -> bool:
        """Drop an adapter; batches already running with it keep their own reference to its weights."""
        return self.resident.pop(name, None) is not None

    @property
    def resident_bytes(self) -> int:
        return sum(w.nbytes for w in self.resident.values())

    def _host(self, weights: LoRAWeights) -> None:
        """Wrap (once) every linear layer the adapter touches."""
        if all(m in self._hosts for m in weights.targets()):  # reloaded: only its shapes to check
            modules = {}
        else:
            modules = dict(self.model.named_modules())
        shapes = {m: (b.shape[0], a.shape[1]) for m, (a, b) in weights.modules.items()}
        for m, (vector, feedforward) in weights.ia3.items():
            target = self._hosts[m].base_layer if m in self._hosts else modules.get(m)
            if isinstance(target, nn.Linear) and vector.numel() != (target.in_features if feedforward else target.out_features):
                raise AdapterError(f"adapter {weights.name!r}'s IA3 vector for {m!r} does not fit the layer — "
                                   f"trained on another base model?")
        for module in weights.targets():
            target = self._hosts[module].base_layer if module in self._hosts else modules.get(module)
            if module in shapes and isinstance(target, nn.Linear) and \
                    (target.in_features, target.out_features) != (shapes[module][1], shapes[module][0]):
                a, b = weights.modules[module]
                raise AdapterError(f"adapter {weights.name!r} does not fit {module!r}: LoRA {tuple(b.shape[:1]) + tuple(a.shape[1:])} "
                                   f"vs layer ({target.out_features}, {target.in_features}) — trained on another base model?")
            if module in self._hosts:
                continue
            if not isinstance(target, nn.Linear):
                raise AdapterError(f"adapter {weights.name!r} targets {module!r}, which is not a linear layer of the base model")
            parent_name, _, child = module.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            host = LoRAHost(target, module, self)
            setattr(parent, child, host)
            self._hosts[module] = host

    # ---- selection ---------------------------------------------------------------------
    @contextmanager
    def use(self, rows: list[str]) -> Iterator[None]:
        """Forward passes inside run row i with adapter `rows[i]` ("base": none). Every adapter
        must be resident; the selection itself costs microseconds."""
        missing = [n for n in dict.fromkeys(rows) if n != BASE and n not in self.resident]
        if missing:
            raise KeyError(f"adapter(s) not resident: {', '.join(missing)}")
        names = list(dict.fromkeys(rows))
        index = {n: i for i, n in enumerate(names)}
        adapters = [None if n == BASE else self.resident[n] for n in names]
        with self.lock:
            previous, self.plan = self.plan, _Plan(adapters, [index[n] for n in rows])
            try:
                yield
            finally:
                self.plan = previous
