"""Experts: the base LM (given, or pre-trained on the corpus) and one PEFT adapter per category.

- `base_model.py`  tokenizer training, a small Llama-style model, fingerprints
- `data.py`        training text per expert, token blocks
- `adapters.py`    LoRA / DoRA / IA3 behind one function
- `train_loop.py`  the Ray Train worker loop (ordinary PyTorch; DDP or DeepSpeed)
- `parallel.py`    many TorchTrainers at once (Ray Tune over trainers)
- `mixture.py`     loading the experts; top-1 and token-level mixture log-probabilities
- `stage.py`       the `base` and `experts` build stages
"""
