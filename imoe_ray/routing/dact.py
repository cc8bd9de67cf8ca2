"""DACT-BERT: differentiable adaptive computation time over the layers of a frozen encoder.

After every transformer layer n a small unit reads the layer's pooled state s_n and emits a class
distribution y_n and a halting value h_n in (0, 1). With p_0 = 1 the outputs accumulate as

    a_n = a_{n-1} + p_{n-1} (1 - h_n) y_n,     p_n = p_{n-1} h_n,     (h_L = 0, so a_L sums to 1)

p_n is the probability mass the layers after n still hold. Because no later layer can add more than
p_n to any class, the top-1 decision is final as soon as a_n[first] - a_n[second] >= p_n: inference
stops there, per sample, and reports a_n + p_n y_n.

Training has two stages. Each layer's classifier is a multinomial logistic regression fit on that
layer's unit input (convex, so each is as good as a linear read-out of its layer can be; the last one
is exactly the full encoder + linear head). Then, with the classifiers fixed, the halting units learn
NLL(a_L) + lambda · sum_n p_n, the last term being the expected extra layers; only this stage
depends on lambda, so a lambda sweep refits nothing else.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import overload

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from torch import nn


class DACTHead(nn.Module):
    """`text_dims` > 0: every unit also reads the same transformer-free text features of the request
    (the discovery's tf-idf → SVD view), so an early layer already sees the vocabulary. A unit's input
    is the discovery representation: the L2-normalised state joined with the text features.
    `unit_input="layer_norm"` is the input of routers saved before that (states only)."""

    def __init__(self, n_layers: int, hidden: int, n_classes: int, text_dims: int = 0, unit_input: str = "l2"):
        super().__init__()
        if unit_input not in ("l2", "layer_norm"):
            raise ValueError(f"unknown DACT unit input {unit_input!r}")
        self.n_layers, self.hidden, self.n_classes, self.text_dims = n_layers, hidden, n_classes, text_dims
        self.unit_input = unit_input
        self.classify = nn.ModuleList(nn.Linear(hidden + text_dims, n_classes) for _ in range(n_layers))
        self.halt = nn.ModuleList(nn.Linear(hidden + text_dims, 1) for _ in range(n_layers - 1))

    def features(self, state: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """A unit's input for pooled states (b, h) and, with `text_dims`, the rows' text features (b, text_dims)."""
        if self.unit_input == "layer_norm":
            return F.layer_norm(state, (self.hidden,))
        x = F.normalize(state, dim=-1)
        return torch.cat([x, text], dim=-1) / math.sqrt(2.0) if self.text_dims else x

    def unit(self, n: int, state: torch.Tensor, text: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer n's (0-based) class distribution and halting value."""
        x = self.features(state, text)
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


def train_head(states: np.ndarray, labels: np.ndarray, n_classes: int, ponder_lambda: float, epochs: int,
               lr: float, batch_size: int, seed: int, text: np.ndarray | None = None, weight_decay: float = 0.0,
               c: float = 4.0) -> DACTHead:
    """Both stages on frozen per-layer states (n, L, h) [and the rows' text features (n, d)]."""
    head = fit_classifiers(states, labels, n_classes, c, text)
    return train_halting(head, states, labels, ponder_lambda, epochs, lr, batch_size, seed, text, weight_decay)


def fit_classifiers(states: np.ndarray, labels: np.ndarray, n_classes: int, c: float,
                    text: np.ndarray | None = None) -> DACTHead:
    """Stage 1: every layer's classifier, a logistic regression (inverse regularisation `c`) on its unit input."""
    x, t = _tensor(states), _tensor(text)
    head = DACTHead(x.shape[1], x.shape[2], n_classes, 0 if t is None else t.shape[1])
    for n in range(head.n_layers):
        with torch.no_grad():
            features = head.features(x[:, n], t).numpy()
        model = LogisticRegression(C=c, max_iter=2000).fit(features, labels)
        weight = np.zeros((n_classes, features.shape[1]), np.float32)
        bias = np.full(n_classes, -30.0, np.float32)  # a class with no training row is never predicted
        if len(model.classes_) > 1:
            binary = len(model.classes_) == 2  # sklearn gives one row for two classes
            weight[model.classes_] = np.vstack([-model.coef_, model.coef_]) / 2 if binary else model.coef_
            bias[model.classes_] = np.r_[-model.intercept_, model.intercept_] / 2 if binary else model.intercept_
        else:
            bias[model.classes_[0]] = 0.0
        with torch.no_grad():
            head.classify[n].weight.copy_(torch.from_numpy(weight))
            head.classify[n].bias.copy_(torch.from_numpy(bias))
    return head.eval()


def train_halting(head: DACTHead, states: np.ndarray, labels: np.ndarray, ponder_lambda: float, epochs: int,
                  lr: float, batch_size: int, seed: int, text: np.ndarray | None = None,
                  weight_decay: float = 0.0) -> DACTHead:
    """Stage 2: a copy of `head` whose halting units are trained for `ponder_lambda`, its classifiers fixed."""
    torch.manual_seed(seed)
    head = copy.deepcopy(head)
    x, t = _tensor(states), _tensor(text)
    y = torch.from_numpy(labels.astype(np.int64))
    head.classify.requires_grad_(False)
    opt = torch.optim.AdamW(head.halt.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * -(-len(x) // batch_size)))
    gen = torch.Generator().manual_seed(seed)
    head.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            a, remaining, _ = head(x[idx], None if t is None else t[idx])
            loss = F.nll_loss(torch.log(a.clamp_min(1e-8)), y[idx]) + ponder_lambda * remaining[:, :-1].sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return head.eval()


def head_arrays(head: DACTHead) -> dict[str, np.ndarray]:
    return {f"dact.{k}": v.detach().cpu().numpy() for k, v in head.state_dict().items()}


def head_from_arrays(settings: dict, arrays: dict[str, np.ndarray]) -> DACTHead:
    head = DACTHead(settings["n_layers"], settings["hidden"], settings["n_classes"], settings.get("text_dims", 0),
                    settings.get("unit_input", "layer_norm"))
    head.load_state_dict({k[len("dact."):]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("dact.")})
    return head.eval()


@overload
def _tensor(a: np.ndarray) -> torch.Tensor: ...
@overload
def _tensor(a: np.ndarray | None) -> torch.Tensor | None: ...
def _tensor(a: np.ndarray | None) -> torch.Tensor | None:
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
