"""Whole-model experts resident under a byte budget: an LRU that loads a Hugging Face causal LM from
the store when a request needs it and evicts the least recently used ones so that everything the
replica holds (the base model, its resident adapters, the whole models) stays within
`serve.memory_budget_mb`. Evictions happen before a load, from the size the weights' headers give,
so the budget holds at every moment, not only after the load; the real size (parameters and buffers,
shared tensors counted once) is measured once loaded.

Plain Python: the Serve replica, the benchmark and the tests use it alike.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from imoe_ray.experts.whole_model import weight_bytes

MB = 1 << 20


class BudgetError(RuntimeError):
    """A whole model cannot be resident within the byte budget, even alone."""


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each storage counted once (tied weights)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.device, t.untyped_storage().data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    tokenizer: Any  # the model's own Hugging Face tokenizer
    nbytes: int
    load_ms: float
    stop_ids: tuple[int, ...] = ()
    context: int = 2048
    identity: tuple = field(default_factory=tuple)


def _identity(model_dir: Path) -> tuple:
    """What changes when the expert is replaced in the store (a new directory renamed into place)."""
    try:
        st = (model_dir / "config.json").stat()
    except FileNotFoundError:
        return ()
    return st.st_ino, st.st_mtime_ns


class ModelPool:
    """An LRU of whole models. `budget_bytes` None: at most `max_models` resident, no byte limit.
    `fixed_bytes()` is what the replica holds besides (the base model and its adapters)."""

    def __init__(self, budget_bytes: int | None, fixed_bytes: Callable[[], int] = lambda: 0,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, max_models: int | None = 1,
                 on_evict: Callable[[str], None] | None = None):
        self.budget_bytes = budget_bytes
        self.fixed_bytes = fixed_bytes
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_models = None if budget_bytes is not None else max_models
        self.on_evict = on_evict
        self.resident: OrderedDict[str, LoadedModel] = OrderedDict()
        self.lock = threading.RLock()   # one whole model decodes at a time; a load never races an eviction
        self.loads = 0
        self.evictions = 0
        self._tokenizers: dict[str, tuple[tuple, object]] = {}

    def resident_bytes(self) -> int:
        return sum(m.nbytes for m in self.resident.values())

    def total_bytes(self) -> int:
        """Everything the replica holds: the fixed part and the whole models."""
        return self.fixed_bytes() + self.resident_bytes()

    def evict(self, name: str) -> bool:
        with self.lock:
            dropped = self.resident.pop(name, None)
        if dropped is None:
            return False
        del dropped
        self.evictions += 1
        if self.on_evict is not None:
            self.on_evict(name)
        return True

    def fit(self, extra: int = 0, keep: str | None = None) -> None:
        """Evict least recently used models until `extra` more bytes fit the budget (or the count cap)."""
        with self.lock:
            while self.resident:
                over_bytes = self.budget_bytes is not None and self.total_bytes() + extra > self.budget_bytes
                over_count = self.max_models is not None and len(self.resident) + (1 if extra else 0) > self.max_models
                if not (over_bytes or over_count):
                    return
                victim = next((n for n in self.resident if n != keep), None)
                if victim is None:
                    return
                self.evict(victim)

    def get(self, name: str, model_dir: str | Path) -> tuple[LoadedModel, float]:
        """The model, loaded if needed (evicting others first); and the ms spent loading (0: resident)."""
        model_dir = Path(model_dir)
        with self.lock:
            hit = self.resident.get(name)
            if hit is not None and hit.identity == _identity(model_dir):
                self.resident.move_to_end(name)
                return hit, 0.0
            if hit is not None:   # another model was registered under the name since
                self.evict(name)
            started = time.perf_counter()
            _, need = weight_bytes(model_dir, torch.empty((), dtype=self.dtype).element_size())
            self._check_fits(name, need)
            self.fit(extra=need)
            loaded = self._load(name, model_dir)
            self.resident[name] = loaded
            if self.budget_bytes is not None and self.total_bytes() > self.budget_bytes:
                self.fit(keep=name)   # buffers the headers do not list: make room after all
                if self.total_bytes() > self.budget_bytes:
                    self.evict(name)
                    self._check_fits(name, loaded.nbytes)
            loaded.load_ms = (time.perf_counter() - started) * 1000
            self.loads += 1
            return loaded, loaded.load_ms

    def _check_fits(self, name: str, need: int) -> None:
        if self.budget_bytes is None:
            return
        fixed = self.fixed_bytes()
        if fixed + need > self.budget_bytes:
            raise BudgetError(f"expert {name!r} needs {need / MB:.1f} MB, and the base model and adapters hold "
                              f"{fixed / MB:.1f} MB: serve.memory_budget_mb={self.budget_bytes / MB:g} cannot hold it "
                              "(raise serve.memory_budget_mb)")

    def _load(self, name: str, model_dir: Path) -> LoadedModel:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from imoe_ray.serving.model import stop_token_ids

        from transformers.utils import logging as hf_logging

        identity = _identity(model_dir)
        cached = self._tokenizers.get(name)
        tokenizer = cached[1] if cached is not None and cached[0] == identity else AutoTokenizer.from_pretrained(model_dir)
        self._tokenizers[name] = (identity, tokenizer)  # kept across evictions: no weights, a third of a cold load
        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()   # a bar per load in the replica's log
        try:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype).to(self.device).eval()
        finally:
            if shown:
                hf_logging.enable_progress_bar()
        context = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        return LoadedModel(name, model, tokenizer, module_bytes(model), 0.0,
                           stop_token_ids(model_dir, tokenizer), context, identity)

    def snapshot(self) -> dict:
        """What is resident, in MB (what `GET /v1/experts` reports)."""
        with self.lock:
            models = {n: round(m.nbytes / MB, 3) for n, m in self.resident.items()}
        fixed = self.fixed_bytes()
        return {"resident_mb": round((fixed + sum(m.nbytes for m in self.resident.values())) / MB, 3),
                "budget_mb": None if self.budget_bytes is None else round(self.budget_bytes / MB, 3),
                "base_and_adapters_mb": round(fixed / MB, 3), "models": models,
                "loads": self.loads, "evictions": self.evictions}
