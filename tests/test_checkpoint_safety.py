"""Checkpoints in the store are untrusted: the optimizer state is read with `weights_only=True`, so
a pickle payload in `optimizer.pt` is refused and never runs."""

from __future__ import annotations

import os

import pytest
import torch

from imoe_ray.experts.train_loop import CheckpointRefused, load_optimizer_state


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_a_real_optimizer_state_round_trips(tmp_path):
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(3, 4)).sum().backward()
    optimizer.step()
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    restored = torch.optim.AdamW(model.parameters(), lr=1e-3)
    restored.load_state_dict(load_optimizer_state(str(tmp_path / "optimizer.pt")))
    assert torch.equal(restored.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


def test_a_pickle_payload_in_a_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state": {}, "param_groups": [], "x": _Payload(str(marker))}, tmp_path / "optimizer.pt")
    with pytest.raises(CheckpointRefused, match="not a plain tensor checkpoint"):
        load_optimizer_state(str(tmp_path / "optimizer.pt"))
    assert not marker.exists()
    torch.load(tmp_path / "optimizer.pt", weights_only=False)   # the payload is real: unpickling runs it
    assert marker.exists()
