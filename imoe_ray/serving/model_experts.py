"""Answers of whole-model experts in an expert replica: the model comes from the byte-budgeted pool
(`model_pool.ModelPool`) and decodes the prompt text with its own tokenizer (its vocabulary is not
the base's, so it never joins the adapters' batch); Hugging Face `generate` does the decoding."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from imoe_ray.experts.whole_model import model_experts
from imoe_ray.serving.model_pool import MB, ModelPool


@dataclass(frozen=True)
class ModelRequest:
    """What a whole-model expert is asked: a prompt text (its chat template applied, encoded with its
    own tokenizer) or, for a job's next step, token ids already in its own vocabulary."""
    name: str
    max_new_tokens: int
    prompt: str | None = None
    prompt_ids: tuple[int, ...] | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class ModelAnswer:
    text: str
    finish_reason: str         # "stop" (an end token) or "length"
    prompt_tokens: int         # in the expert's own tokenizer
    completion_tokens: int
    load_ms: float             # 0 when the model was resident
    generate_ms: float
    tokens: list[int] = field(default_factory=list)  # the completion's ids in the expert's vocabulary

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelRefusal:
    """A request a replica cannot serve, with the HTTP status and error code the API answers."""
    error: str
    status: int
    code: str


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A prompt text as a whole-model expert reads it: its chat template applied when it has one."""
    templated = bool(getattr(tokenizer, "chat_template", None))
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True) if templated else prompt
    return tokenizer(text, add_special_tokens=not templated)["input_ids"]


class ModelExperts:
    """The store's whole-model experts for one replica. `budget_mb` None: one whole model resident at
    a time, bytes not limited; else everything resident (`fixed_bytes()` plus the models) within it."""

    def __init__(self, store_dir: str | Path, budget_mb: float | None, fixed_bytes, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, on_evict=None):
        self.root = Path(store_dir)
        self.pool = ModelPool(None if budget_mb is None else int(budget_mb * MB), fixed_bytes, device, dtype,
                              max_models=1, on_evict=on_evict)
        self.known = model_experts(self.root)

    def path(self, name: str) -> Path:
        if name not in self.known:
            self.known = model_experts(self.root)  # registered since (`imoe experts add-model`)?
        if name not in self.known:
            raise KeyError(f"no whole-model expert named {name!r}; whole-model experts: "
                           f"{', '.join(sorted(self.known)) or 'none'}")
        return self.known[name]

    def answer(self, request: ModelRequest) -> ModelAnswer:
        """Load the expert if needed and continue the request's prompt (text or ids). Under greedy
        decoding, continuing from prompt + the first n tokens gives the same next tokens as one run."""
        import time

        with self.pool.lock:  # the model stays resident until its answer is done
            if request.name not in self.pool.resident:
                from imoe_ray.packaging.registry import verify_adapter

                verify_adapter(self.path(request.name).parent)  # one installed from a package: its files as signed
            loaded, load_ms = self.pool.get(request.name, self.path(request.name))
            tok, model = loaded.tokenizer, loaded.model
            given = list(request.prompt_ids) if request.prompt_ids is not None else prompt_ids(tok, request.prompt or "")
            room = max(1, loaded.context - request.max_new_tokens)
            ids = torch.tensor([given[-room:]], dtype=torch.long)
            limit = max(1, min(request.max_new_tokens, loaded.context - ids.shape[1]))
            started = time.perf_counter()
            sample = request.temperature is not None and request.temperature > 0
            if request.seed is not None:
                torch.manual_seed(request.seed)
            pad = tok.pad_token_id if tok.pad_token_id is not None else (loaded.stop_ids[0] if loaded.stop_ids else 0)
            with torch.inference_mode():
                out = model.generate(ids.to(model.device), attention_mask=torch.ones_like(ids).to(model.device),
                                     max_new_tokens=limit, do_sample=sample,
                                     temperature=request.temperature if sample else None,
                                     top_p=request.top_p if sample else None,
                                     top_k=None, eos_token_id=list(loaded.stop_ids) or None, pad_token_id=pad)
            generate_ms = (time.perf_counter() - started) * 1000
        new = out[0, ids.shape[1]:].tolist()
        stopped = bool(new) and new[-1] in loaded.stop_ids
        if stopped:
            new = new[:-1]
        return ModelAnswer(tok.decode(new, skip_special_tokens=True), "stop" if stopped else "length",
                           int(ids.shape[1]), len(new), load_ms, generate_ms, new)

    def snapshot(self) -> dict:
        return self.pool.snapshot()

    def serve(self, request: ModelRequest) -> ModelAnswer | ModelRefusal:
        """One request of the Serve replica: its answer, or why it cannot be served."""
        from imoe_ray.packaging import PackageError
        from imoe_ray.serving.model_pool import BudgetError

        try:
            return self.answer(request)
        except KeyError as e:
            return ModelRefusal(str(e.args[0]), 404, "model_not_found")
        except BudgetError as e:
            return ModelRefusal(str(e), 503, "memory_budget")
        except PackageError as e:   # its files differ from its package's manifest
            return ModelRefusal(str(e), 503, "expert_integrity")


def replica_models(store_dir: str | Path, serving, budget_mb: float | None) -> ModelExperts:
    """The whole-model experts of an expert replica that holds `serving` (a `ServingModel`): the fixed
    part of the budget is its base model (measured once) plus its resident adapters."""
    from imoe_ray.serving.model_pool import module_bytes

    base = module_bytes(serving.model)
    if budget_mb is not None and base > budget_mb * MB:
        raise ValueError(f"serve.memory_budget_mb={budget_mb:g} is below the base model's {base / MB:.1f} MB")
    def fixed() -> int:
        return base + sum(w.nbytes for w in serving.bank.resident.values())

    return ModelExperts(store_dir, budget_mb, fixed, serving.device, next(serving.model.parameters()).dtype)


def check_budget(store_dir: str | Path, budget_mb: float | None, max_loaded_experts: int) -> None:
    """Before deploying: a budget must hold the base model and `max_loaded_experts` of the largest
    adapter (their weights' sizes in float32, the CPU serving dtype; a GPU replica serves bfloat16,
    half of it), so that only whole models ever need to give way. Raises ValueError naming the fields."""
    from imoe_ray.experts.whole_model import weight_bytes

    root = Path(store_dir)
    if budget_mb is None or not (root / "base").is_dir() or torch.cuda.is_available():
        return
    _, base = weight_bytes(root / "base")
    adapters = [adapter_bytes(d) for folder in ("experts", "fusion", "baselines") for d in (root / folder).glob("*")
                if (d / "adapter_config.json").is_file()]
    largest = sorted(adapters, reverse=True)[:max_loaded_experts]
    need = base + sum(largest)
    if need > budget_mb * MB:
        raise ValueError(f"serve.memory_budget_mb={budget_mb:g} cannot hold the base model ({base / MB:.2f} MB) and "
                         f"serve.max_loaded_experts={max_loaded_experts} adapters ({sum(largest) / MB:.2f} MB): "
                         f"raise it to at least {need / MB:.2f}, plus room for a whole-model expert")


_BANKED = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector", ".lora_magnitude_vector.weight", ".ia3_l")


def adapter_bytes(adapter_dir: str | Path, element_size: int = 4) -> int:
    """Bytes of the tensors the adapter bank keeps of a PEFT adapter (not, e.g., a saved copy of a base layer)."""
    import numpy as np

    from imoe_ray.experts.whole_model import safetensors_shapes

    return sum(int(np.prod(shape)) * element_size for key, (shape, _) in safetensors_shapes(adapter_dir).items()
               if key.endswith(_BANKED))
