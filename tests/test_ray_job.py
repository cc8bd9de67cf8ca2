"""The build submitted with the `ray job submit` CLI to a real local cluster."""

from __future__ import annotations

import pytest

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


@pytest.mark.slow  # end to end, tens of seconds: `pytest -m slow`
def test_ray_job_submit_builds_the_store(ray_cluster, built, tmp_path):
    """The session's store without its shard stage: the job skips what is current and shards again
    on the cluster (the whole build from scratch is what `built` does in-process)."""
    cfg, source, _ = built
    store = tmp_path / "store"
    shutil.copytree(source.uri, store, ignore=shutil.ignore_patterns("runs"))
    for stale in ("shards", "kb", "manifests/shard.json"):
        path = store / stale
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    job_cfg = tmp_path / "job.yaml"
    job_cfg.write_text(f"corpus:\n  path: {cfg.corpus.path}\n")
    for attempt in range(5):
        out = subprocess.run(
            [RAY, "job", "submit", "--address", ray_cluster["dashboard_url"], "--working-dir", str(REPO), "--",
             "python", "-m", "jobs.build", "--config", str(job_cfg), "--store", str(store), "--until", "shard"],
            capture_output=True, text=True, timeout=900, env=ray_cluster["env"],
        )
        # Ray's job server answers 500 "No available agent ... try again later" while the node's
        # dashboard agent is not (yet, or momentarily) registered: as its message says, try again.
        if "No available agent" not in out.stderr:
            break
        time.sleep(10)
    log = out.stdout + out.stderr
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "succeeded" in log.lower()
    assert "[embed] up to date, skipped" in log and "[router] up to date, skipped" in log, log[-3000:]
    assert "[shard] running" in log
    assignments = pq.read_table(store / "assignments.parquet")
    assert assignments.num_rows > 0 and "top_category" in assignments.column_names
    assert (store / "shards" / "index.json").exists() and (store / "kb").is_dir()
    assert (store / "manifests" / "shard.json").exists()
