"""DACT-BERT: differentiable adaptive computation time over the layers of a frozen encoder.

After every transformer layer n a small unit reads the layer's pooled state s_n and emits a class
distribution y_n and a halting value h_n in (0, 1). With p_0 = 1 the outputs accumulate as

    a_n = a_{n-1} + p_{n-1} (1 - h_n) y_n,     p_n = p_{n-1} h_n,     (h_L = 0, so a_L sums to 1)

p_n is the probability mass the layers after n still hold. Because no later layer can add more than
p_n to any class, the top-1 decision is final as soon as a_n[first] - a_n[second] >= p_n: inference
stops there, per sample, and reports a_n + p_n y_n. Training minimises
NLL(a_L) + aux · mean_n CE(y_n) + lambda · sum_n p_n, the last term being the expected extra layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class DACTHead(nn.Module):
    """`text_dims` > 0: every unit also reads the same transformer-free text features of the request
    (the discovery's tf-idf → SVD view), so an early layer already sees the vocabulary."""

    def __init__(self, n_layers: int, hidden: int, n_classes: int, text_dims: int = 0):
        super().__init__()
        self.n_layers, self.hidden, self.n_classes, self.text_dims = n_layers, hidden, n_classes, text_dims
        self.classify = nn.ModuleList(nn.Linear(hidden + text_dims, n_classes) for _ in range(n_layers))
        self.halt = nn.ModuleList(nn.Linear(hidden + text_dims, 1) for _ in range(n_layers - 1))

    def unit(self, n: int, state: torch.Tensor, text: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer n's (0-based) class distribution and halting value for pooled states (b, h)
        and, with `text_dims`, the rows' text features (b, text_dims)."""
        x = F.layer_norm(state, (self.hidden,))
        if self.text_dims:
            x = torch.cat([x, text], dim=-1)
        y = torch.softmax(self.classify[n](x), dim=-1)
        h = torch.sigmoid(self.halt[n](x)).squeeze(-1) if n < self.n_layers - 1 else torch.zeros(len(x), device=x.device)
        return y, h

    def forward(self, states: torch.Tensor, text: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """states (b, L, h) [, text (b, text_dims)] → final accumulated distribution (b, K), remaining mass p_n (b, L), y_n (b, L, K)."""
        b = states.shape[0]
        a = states.new_zeros(b, self.n_classes)
        p = states.new_ones(b)
        remaining, ys = [], []
        for n in range(self.n_layers):
            y, h = self.unit(n, states[:, n], text)
            a = a + (p * (1 - h)).unsqueeze(-1) * y
            p = p * h
            remaining.append(p)
            ys.append(y)
        return a, torch.stack(remaining, 1), torch.stack(ys, 1)


@dataclass
class Exit:
    probabilities: np.ndarray  # (b, K), a_n + p_n y_n at the exit layer
    layers: np.ndarray         # (b,) 1-based number of layers run


class Accumulator:
    """Per-sample DACT state during inference; `update` returns which rows may stop."""

    def __init__(self, head: DACTHead, batch: int, text: torch.Tensor | None = None):
        self.head = head
        self.text = text
        self.a = torch.zeros(batch, head.n_classes)
        self.p = torch.ones(batch)

    def update(self, n: int, rows: torch.Tensor, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add layer n for `rows`; returns (halted mask over rows, their exit distributions)."""
        y, h = self.head.unit(n, pooled, self.text[rows] if self.text is not None else None)
        p = self.p[rows]
        a = self.a[rows] + (p * (1 - h)).unsqueeze(-1) * y
        p = p * h
        self.a[rows], self.p[rows] = a, p
        top2 = torch.topk(a, k=min(2, a.shape[1]), dim=-1).values
        gap = top2[:, 0] - (top2[:, 1] if top2.shape[1] > 1 else 0.0)
        halted = (gap >= p) | (n == self.head.n_layers - 1)
        return halted, a + p.unsqueeze(-1) * y


@torch.inference_mode()
def exit_from_states(head: DACTHead, states: np.ndarray, text: np.ndarray | None = None) -> Exit:
    """DACT decisions for precomputed per-layer states (n, L, h): the same halting as live inference."""
    x = torch.from_numpy(np.ascontiguousarray(states, dtype=np.float32))
    acc = Accumulator(head, len(x), _tensor(text))
    probs = torch.zeros(len(x), head.n_classes)
    layers = torch.zeros(len(x), dtype=torch.long)
    rows = torch.arange(len(x))
    for n in range(head.n_layers):
        halted, out = acc.update(n, rows, x[rows, n])
        probs[rows[halted]] = out[halted]
        layers[rows[halted]] = n + 1
        rows = rows[~halted]
        if len(rows) == 0:
            break
    return Exit(probs.numpy(), layers.numpy())


def train_head(states: np.ndarray, labels: np.ndarray, n_classes: int, ponder_lambda: float, aux_weight: float,
               epochs: int, lr: float, batch_size: int, seed: int, text: np.ndarray | None = None,
               weight_decay: float = 1e-4) -> DACTHead:
    """Fit the units on frozen per-layer states (n, L, h) [and the rows' text features (n, d)]."""
    torch.manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(states, dtype=np.float32))
    t = _tensor(text)
    y = torch.from_numpy(labels.astype(np.int64))
    head = DACTHead(x.shape[1], x.shape[2], n_classes, 0 if t is None else t.shape[1])
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * -(-len(x) // batch_size)))
    gen = torch.Generator().manual_seed(seed)
    head.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            a, remaining, ys = head(x[idx], None if t is None else t[idx])
            loss = F.nll_loss(torch.log(a.clamp_min(1e-8)), y[idx])
            loss = loss + aux_weight * F.nll_loss(torch.log(ys.clamp_min(1e-8)).flatten(0, 1),
                                                  y[idx].repeat_interleave(head.n_layers))
            loss = loss + ponder_lambda * remaining[:, :-1].sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    head.eval()
    return head


def head_arrays(head: DACTHead) -> dict[str, np.ndarray]:
    return {f"dact.{k}": v.detach().cpu().numpy() for k, v in head.state_dict().items()}


def head_from_arrays(settings: dict, arrays: dict[str, np.ndarray]) -> DACTHead:
    head = DACTHead(settings["n_layers"], settings["hidden"], settings["n_classes"], settings.get("text_dims", 0))
    head.load_state_dict({k[len("dact."):]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("dact.")})
    return head.eval()


def _tensor(a: np.ndarray | None) -> torch.Tensor | None:
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
