"""What an expert replica holds: the store's base model and tokenizer, and a bank of LoRA experts
loaded from the store on demand."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from imoe_ray.serving.generation import DecodeBatch, Generated, GenerationRequest, collect, decode_steps
from imoe_ray.serving.lora_bank import BASE, AdapterBank


class UnknownExpert(KeyError):
    """A request named an expert the store does not have."""

    def __str__(self) -> str:
        return str(self.args[0])


def installed_experts(store_dir: str | Path) -> dict[str, Path]:
    """Every servable adapter of a store by name: the trained experts, the dense baseline, and
    fusion adapters (the summarizer) when present."""
    root = Path(store_dir)
    index_path = root / "experts" / "index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{root} has no trained experts (experts/index.json): run "
                                f"`imoe build --store {root} --until experts` first")
    index = json.loads(index_path.read_text())
    found = {e["name"]: root / "experts" / e["name"] for e in index["experts"]}
    for extra in (root / "baselines" / "dense", *sorted((root / "fusion").glob("*"))):
        if (extra / "adapter_config.json").is_file():
            found[extra.name] = extra
    return found


def stop_token_ids(base_dir: str | Path, tokenizer) -> tuple[int, ...]:
    """Every id that ends a completion: the tokenizer's EOS and each `eos_token_id` of the model's
    generation config (Llama-3-style models list several, e.g. `<|end_of_text|>` and `<|eot_id|>`)."""
    ids = [tokenizer.eos_token_id]
    for name in ("generation_config.json", "config.json"):
        path = Path(base_dir) / name
        if path.is_file():
            try:
                eos = json.loads(path.read_text()).get("eos_token_id")
            except ValueError:
                continue
            ids += eos if isinstance(eos, list) else [eos]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def _identity(adapter_dir: Path) -> tuple[int, int] | None:
    """Inode and mtime of an adapter's config: a registry that activates another version renames a
    new directory into place, which changes both."""
    try:
        st = (adapter_dir / "adapter_config.json").stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _files_identity(adapter_dir: Path) -> tuple:
    """Every file of an adapter directory with its inode, size, mtime and ctime: any write, rename
    or replacement changes it (ctime cannot be set back from user space), so an unchanged identity
    means files already verified against their package manifest need no second hashing. Strict mode
    reloads the same experts at every step."""
    try:
        with os.scandir(adapter_dir) as entries:
            stats = sorted((e.name, e.stat()) for e in entries)
    except FileNotFoundError:
        return ()
    return tuple((n, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) for n, st in stats)


class ServingModel:
    """The base LM, its tokenizer and the adapter bank; plain Python, used by the Serve replica,
    the benchmarks and the tests alike."""

    def __init__(self, store_dir: str | Path, capacity: int | None = None, device: str | None = None,
                 threads: int | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        root = Path(store_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(root / "base")
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(root / "base", dtype=dtype).to(self.device).eval()
        self.bank = AdapterBank(self.model, capacity)
        self.root = root
        self._loaded_from: dict[str, tuple[int, int] | None] = {}  # expert → its files' identity when loaded
        self._verified: dict[str, tuple] = {}  # expert → `_files_identity` when its package was last verified
        self.experts = installed_experts(root)
        self.context = int(getattr(self.model.config, "max_position_embeddings", 0) or 2048)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.stop_ids = stop_token_ids(root / "base", self.tokenizer)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def decode_batch(self) -> DecodeBatch:
        """A batch over this model and bank that checks stop strings, and that runs a step in several
        passes when its rows use more adapters than the bank's capacity (loading each pass's own)."""
        return DecodeBatch(self.model, self.bank, self.pad_id, decode=self.decode, capacity=self.bank.capacity,
                           ensure=self.ensure)

    def ensure(self, name: str) -> float:
        """Make an expert resident; returns the milliseconds spent loading it (0 when it was). A
        resident expert whose directory was replaced (another version activated) is loaded again;
        one that was removed is unknown from then on (requests already decoding finish)."""
        if name == BASE:
            return 0.0
        if name in self.bank.resident:
            if name in self.experts and _identity(self.experts[name]) == self._loaded_from.get(name):
                self.bank.resident.move_to_end(name)
                return 0.0
            self.bank.evict(name)
            self.experts = installed_experts(self.root)
        if name not in self.experts:
            self.experts = installed_experts(self.root)  # installed since (`imoe experts install`)?
        if name not in self.experts:
            raise UnknownExpert(f"no expert named {name!r}; installed: {', '.join(sorted(self.experts))}")
        started = time.perf_counter()
        files = _files_identity(self.experts[name])
        if not files or self._verified.get(name) != files:  # first load, or any of its files changed since verified
            from imoe_ray.packaging.registry import verify_adapter

            verify_adapter(self.experts[name])  # an installed package's files must still hash as its manifest says
            self._verified[name] = files
        self.bank.load(name, self.experts[name])
        self._loaded_from[name] = _identity(self.experts[name])
        return (time.perf_counter() - started) * 1000

    def generate(self, requests: list[GenerationRequest]) -> list[Generated]:
        """Decode requests to completion in one batch, loading their experts when needed."""
        return collect(self.steps(requests), len(requests))[0]

    def steps(self, requests: list[GenerationRequest]):
        """The decoding steps of a batch (see `generation.decode_steps`); experts load when needed
        (with a capacity smaller than the batch's experts, pass by pass)."""
        for r in requests:
            for name in r.experts:
                if name != BASE and name not in self.experts:
                    self.experts = installed_experts(self.root)
                if name != BASE and name not in self.experts:
                    raise UnknownExpert(f"no expert named {name!r}; installed: {', '.join(sorted(self.experts))}")
        if self.bank.capacity is None:
            for r in requests:
                for name in r.experts:
                    self.ensure(name)
        return decode_steps(self.model, self.bank, requests, self.pad_id, batch=self.decode_batch())
