"""Sentence embeddings: the encoder (plain PyTorch) and its Ray Data actor."""

from imoe_ray.embedding.encoder import Encoder, resolve_encoder_path

__all__ = ["Encoder", "resolve_encoder_path"]
