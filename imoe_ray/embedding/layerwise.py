"""Run a BERT-style encoder one transformer layer at a time, so that a caller can stop early.

`Encoder.model(...)` always runs every layer; the router's early-exit classifier needs the pooled
state after each layer and the freedom to drop rows that have decided. Any encoder with the usual
`embeddings` + `encoder.layer` layout (BERT, MiniLM, RoBERTa, ...) works.
"""

from __future__ import annotations

import torch

from imoe_ray.embedding.encoder import Encoder, EncoderError, mean_pool


class LayerwiseEncoder:
    def __init__(self, encoder: Encoder):
        model = encoder.model
        layers = getattr(getattr(model, "encoder", None), "layer", None)
        if not hasattr(model, "embeddings") or layers is None:
            raise EncoderError(f"early exit needs a BERT-style encoder (embeddings + encoder.layer); "
                               f"{encoder.name!r} is a {type(model).__name__}")
        self.encoder = encoder
        self.embeddings = model.embeddings
        self.layers = list(layers)
        self.n_layers = len(self.layers)

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings before the first layer, and the attention mask: (b, t, h), (b, t)."""
        batch = self.encoder.tokenize(texts)
        kwargs = {"input_ids": batch["input_ids"]}
        if "token_type_ids" in batch:
            kwargs["token_type_ids"] = batch["token_type_ids"]
        return self.embeddings(**kwargs), batch["attention_mask"]

    @torch.inference_mode()
    def layer(self, n: int, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Apply transformer layer `n` (0-based) to the rows given."""
        additive = None
        if not bool(mask.all()):
            additive = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        out = self.layers[n](hidden, additive)
        return out[0] if isinstance(out, tuple) else out

    @staticmethod
    def pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return mean_pool(hidden, mask)
