"""Trainable sentence encoders for discovery, routing and retrieval (issue 9).

- `moe.py`          the sparse-MoE encoder upcycled from a dense BERT (top-k gated expert FFNs), save/load
- `contrastive.py`  label-free training pairs and the contrastive losses
- `loop.py`         the plain-PyTorch training loop
- `train.py`        the Ray Train job (→ STORE/encoders/moe with its manifest)
- `cli.py`          `imoe train-encoder` and `imoe eval encoder` (imoe_ray/evaluation/encoder.py)
"""
