"""`imoe ARGS` run in this process, through the CLI's own entry point (`imoe_ray.cli.main`: the same
exit codes and messages), without a fresh interpreter's imports for every call (seconds each). The
installed binary itself (usage errors, `--version`, `imoe serve`, a killed process) is still started
as a subprocess by the tests of those contracts."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from dataclasses import dataclass


@dataclass
class Ran:
    """What `subprocess.run(..., capture_output=True, text=True)` would have given."""
    returncode: int
    stdout: str
    stderr: str


def imoe(*args: object, env: dict[str, str] | None = None) -> Ran:
    """Run `imoe *args` here, with `env` added to the environment for the call's length."""
    from imoe_ray.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv, environ = sys.argv, dict(os.environ)
    code = 0
    sys.argv = ["imoe", *(str(a) for a in args)]
    os.environ.update(env or {})
    os.environ.setdefault("COLUMNS", "400")  # rich wraps at 80 columns on a pipe: one line per message
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
        os.environ.clear()
        os.environ.update(environ)
    return Ran(code, out.getvalue(), err.getvalue())
