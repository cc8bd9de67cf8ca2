"""What the summarizer's tests share: three tiny domains to synthesize fusion cases from, and a
tiny untrained LM with a tokenizer trained on them (no Ray, seconds to make)."""

from __future__ import annotations

from imoe_ray.config import load_config
from imoe_ray.experts.base_model import llama_config, new_model, train_tokenizer

TEXTS = {
    "net": ["the socket sends bytes over the network to a server which answers every request with a status line "
            "and headers before the body arrives in chunks"] * 6,
    "linalg": ["a matrix of floats is inverted by the solver when its determinant is nonzero otherwise the "
               "factorization raises an error naming the singular pivot column"] * 6,
    "xml": ["parse the document and walk its element tree collecting attributes namespaces comments and the "
            "text of every child node into plain dictionaries"] * 6,
}


def tiny_lm(seq_len: int):
    """(model, tokenizer): a 1-layer Llama of hidden size 32 over a tokenizer of the domains' words."""
    texts = [t for chunks in TEXTS.values() for t in chunks]
    tok = train_tokenizer(texts + ["Mention and At most words Answer: [ ] - ."] * 3, 400)
    cfg = load_config(None, ["pretrain.hidden_size=32", "pretrain.layers=1", "pretrain.heads=2",
                             "pretrain.intermediate_size=64", f"pretrain.seq_len={seq_len}"]).pretrain
    return new_model(llama_config(cfg, tok), 0).eval(), tok
