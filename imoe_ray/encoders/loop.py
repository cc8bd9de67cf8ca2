"""The contrastive training loop of the MoE encoder, plain PyTorch (the Ray Train worker calls it)."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch


def embed(model, tokenizer, texts: list[str], max_tokens: int, device) -> torch.Tensor:
    """Mean-pooled, L2-normalised embeddings, as `Encoder` computes them (with gradients)."""
    from imoe_ray.embedding.encoder import mean_pool

    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt").to(device)
    hidden = model(**batch).last_hidden_state
    return torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)


def fit(model, tokenizer, anchors: list[str], positives: list[str], group_names: list[str], topics: list[int],
        m: dict, device, on_report: Callable[[dict], None] = lambda metrics: None) -> dict:
    """Train `model` (upcycled, on `device`) on the pairs with the `moe_encoder` settings `m`; returns metrics.
    `topics`: each pair's discovered category (-1: unknown), which `m["batches"] == "topic"` draws batches by.

    Loss: the pair loss plus aux_weight x the mean load-balancing loss of the two forwards. The routers
    (new weights) learn at router_lr, the rest at lr; both warm up linearly over the first tenth."""
    from imoe_ray.encoders.contrastive import batch_mode, batch_order, pair_loss
    from imoe_ray.encoders.moe import aux_loss

    routers = [p for n, p in model.named_parameters() if ".router." in n]
    others = [p for n, p in model.named_parameters() if ".router." not in n]
    optimizer = torch.optim.AdamW([{"params": others, "lr": m["lr"]}, {"params": routers, "lr": m["router_lr"]}])
    groups = torch.as_tensor(np.unique(group_names, return_inverse=True)[1], device=device)
    rng = np.random.default_rng(m["seed"])
    steps = m["steps"]
    mode = batch_mode(m["batches"], topics)
    batches = batch_order(topics, m["batch_size"], steps, mode, rng)
    every = max(1, steps // 10)

    model.train()
    started, history = time.perf_counter(), []
    for step in range(steps):
        scale = min(1.0, (step + 1) / every)
        for group, base in zip(optimizer.param_groups, (m["lr"], m["router_lr"])):
            group["lr"] = base * scale
        rows = batches[step]
        a = embed(model, tokenizer, [anchors[i] for i in rows], m["max_tokens"], device)
        aux_a = aux_loss(model)
        b = embed(model, tokenizer, [positives[i] for i in rows], m["max_tokens"], device)
        aux = (aux_a + aux_loss(model)) / 2
        loss = pair_loss(m["loss"], a, b, groups[torch.as_tensor(rows, device=device)], m["temperature"], m["margin"])
        optimizer.zero_grad()
        (loss + m["aux_weight"] * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history.append((loss.item(), aux.item()))
        if (step + 1) % every == 0 and step + 1 < steps:
            recent = np.mean(history[-every:], axis=0)
            on_report({"step": step + 1, "steps": steps, "loss": float(recent[0]), "aux_loss": float(recent[1])})
    model.eval()
    return {"step": steps, "steps": steps, "loss": float(np.mean([h[0] for h in history[-every:]])),
            "aux_loss": float(np.mean([h[1] for h in history[-every:]])),
            "first_loss": float(np.mean([h[0] for h in history[:every]])),
            "train_s": round(time.perf_counter() - started, 1), "pairs": len(anchors),
            "batches": mode}
