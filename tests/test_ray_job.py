"""The whole build submitted with the `ray job submit` CLI to a real local cluster."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def test_ray_job_submit_builds_the_store(ray_cluster, small_corpus, tmp_path):
    store = tmp_path / "store"
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"corpus:\n  path: {small_corpus}\nembedding:\n  batch_size: 16\n")
    out = subprocess.run(
        [RAY, "job", "submit", "--address", ray_cluster["dashboard_url"], "--working-dir", str(REPO), "--",
         "python", "-m", "jobs.build", "--config", str(cfg), "--store", str(store), "--until", "shard"],
        capture_output=True, text=True, timeout=900, env=ray_cluster["env"],
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "succeeded" in (out.stdout + out.stderr).lower()
    assignments = pq.read_table(store / "assignments.parquet")
    assert assignments.num_rows > 0 and "top_category" in assignments.column_names
    assert (store / "shards" / "index.json").exists() and (store / "kb").is_dir()
