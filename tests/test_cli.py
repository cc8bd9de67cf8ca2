"""The `imoe` command line: help for newcomers, and bad input gets a clear message and exit 2."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def imoe(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imoe_ray.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), timeout=timeout)


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_help_lists_every_stage_command():
    out = imoe("--help")
    assert out.returncode == 0
    for cmd in ("build", "discover", "sample-corpus", "eval", "status", "config", "quickstart"):
        assert cmd in out.stdout
    assert "--until" in imoe("build", "--help").stdout


def test_config_prints_valid_yaml_with_defaults(tmp_path):
    import yaml

    from imoe_ray.config import Config

    out = imoe("config", "--store", str(tmp_path / "s"), "--set", "discovery.threshold=0.3")
    assert out.returncode == 0 and "threshold: 0.3" in out.stdout and "all-MiniLM-L6-v2" in out.stdout
    assert "# t_C: membership above which a chunk belongs to a category" in out.stdout  # the field's description
    assert Config.model_validate(yaml.safe_load(out.stdout)).discovery.threshold == 0.3  # usable as --config


@pytest.fixture()
def bad_inputs(tmp_path) -> dict[str, tuple[list[str], str]]:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    nocol = tmp_path / "nocol.jsonl"
    nocol.write_text(json.dumps({"id": "a", "body": "hello world"}) + "\n")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"valid start\n\xff\xfe\xfa invalid utf-8 \x80\x81\n")
    typo = tmp_path / "typo.yaml"
    typo.write_text("discovery:\n  treshold: 0.3\n")
    return {
        "missing file": (["--corpus", str(tmp_path / "nope.jsonl")], "not found"),
        "empty corpus": (["--corpus", str(empty)], "empty"),
        "missing column": (["--corpus", str(nocol)], "text"),
        "undecodable bytes": (["--corpus", str(binary)], "binary.txt"),
        "config typo": (["--corpus", str(nocol), "--config", str(typo)], "discovery.treshold"),
        "bad stage": (["--corpus", str(nocol), "--until", "nowhere"], "--until"),
    }


def test_bad_input_is_a_clear_error_and_the_store_is_untouched(ray_session, bad_inputs, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "keep.json").write_text('{"precious": true}')
    before = tree_digest(store)
    for case, (args, needle) in bad_inputs.items():
        out = imoe("build", "--store", str(store), *args, env=ray_session["env"])
        assert out.returncode == 2, f"{case}: exit {out.returncode}\n{out.stderr[-2000:]}"
        assert "Traceback" not in out.stderr, f"{case}: {out.stderr[-2000:]}"
        assert needle in out.stderr, f"{case}: {needle!r} not in {out.stderr[-1000:]!r}"
        assert tree_digest(store) == before, f"{case} changed the store"
