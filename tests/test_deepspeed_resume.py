"""Defect 4: a DeepSpeed run resumes with its optimizer (ZeRO's fp32 master partition and Adam's
moments, saved per rank in safetensors), so training continued from a checkpoint takes the same
steps as training that was never interrupted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import os, sys, tempfile
from imoe_ray.experts import train_loop
from imoe_ray.experts.train_loop import restore_deepspeed_optimizer, save_deepspeed_optimizer, _deepspeed_engine
import torch
from safetensors.torch import load_file

stage = int(sys.argv[1])
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
data = [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(6)]

def engine(weights=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    if weights is not None:
        model.load_state_dict(weights)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    return model, *_deepspeed_engine(model, optimizer, 4, stage, torch.device("cpu"))

def steps(eng, xs):
    for x in xs:
        loss = eng(x).pow(2).mean()
        eng.backward(loss)
        eng.step()

model, eng, opt = engine()
steps(eng, data[:3])
with tempfile.TemporaryDirectory() as d:
    save_deepspeed_optimizer(d, opt, 0)
    names = sorted(os.listdir(d))
    saved = load_file(os.path.join(d, names[0]))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    steps(eng, data[3:])
    continued = [p.detach().clone() for p in model.parameters()]
    resumed_model, resumed, ropt = engine(weights)
    assert restore_deepspeed_optimizer(d, ropt, 0)
    steps(resumed, data[3:])
    fresh_model, fresh, _ = engine(weights)
    steps(fresh, data[3:])
same = all(torch.allclose(a, b, atol=1e-6) for a, b in zip(continued, resumed_model.parameters()))
fresh_same = all(torch.allclose(a, b, atol=1e-6) for a, b in zip(continued, fresh_model.parameters()))
print("RESULT", names, any(k.endswith("exp_avg") for k in saved), same, fresh_same)
"""


@pytest.mark.parametrize("stage", [0, 2])
def test_deepspeed_resumes_with_its_optimizer(stage):
    from conftest import free_port

    run = subprocess.run([sys.executable, "-c", SCRIPT, str(stage), str(free_port())], cwd=REPO, capture_output=True,
                         text=True, timeout=600, env={**__import__("os").environ, "DS_ACCELERATOR": "cpu"})
    line = next((line for line in run.stdout.splitlines() if line.startswith("RESULT")), None)
    assert line is not None, run.stderr[-3000:]
    names, moments, same, fresh_same = line.split(" ", 1)[1].rsplit(" ", 3)
    assert names == "['deepspeed-optimizer-rank0.safetensors']" and moments == "True"
    assert same == "True", "resumed training diverged from uninterrupted training"
    assert fresh_same == "False", "a fresh optimizer took the same steps: the test shows nothing"
