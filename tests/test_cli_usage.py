"""The `imoe` command line's usage errors: one line on stderr, exit 2, no traceback; `--version`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def imoe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imoe_ray.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, COLUMNS="200"), timeout=120)


@pytest.mark.parametrize("args, needle", [
    (["build", "--bogus"], "No such option: --bogus"),
    (["build", "--until", "nope"], "'nope' is not one of"),
    (["no-such-command"], "No such command"),
    (["serve", "--port", "eighty"], "Invalid value for '--port'"),
])
def test_usage_errors_are_one_line_and_exit_2(args, needle):
    out = imoe(*args)
    assert out.returncode == 2, out
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("error:"), out.stderr
    assert "Traceback" not in out.stderr


def test_version_and_the_until_choices():
    from importlib.metadata import version

    out = imoe("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"imoe {version('imoe-ray')}"
    help_text = imoe("build", "--help").stdout
    assert "ingest|embed|discover" in help_text.replace("\n", "").replace(" ", "").replace("│", "")
