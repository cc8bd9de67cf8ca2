"""The cluster test infrastructure is real: a SeaweedFS S3 server that checks credentials, and a
Ray worker node in its own mount namespace that does not see the driver's /tmp."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from remote_node import kept_paths, namespace_script

REMOTE = {"imoe_remote": 1}


@ray.remote(num_cpus=0)
def _probe(path: str, probe_name: str) -> dict:
    """Where this task ran and what it sees of the filesystem."""
    import os

    import imoe_ray

    mine = Path("/tmp") / probe_name
    mine.write_text("written on the node that ran the task")
    return {"node_id": ray.get_runtime_context().get_node_id(), "sees": os.path.exists(path),
            "imoe_ray": imoe_ray.__file__, "probe": str(mine)}


@ray.remote(num_cpus=0)
def _read_parquet(uri: str) -> dict:
    """Read a Parquet file by its s3:// URI with nothing but the node's AWS_* environment."""
    import os

    return {"node_id": ray.get_runtime_context().get_node_id(), "rows": pq.read_table(uri).to_pylist(),
            "endpoint": os.environ.get("AWS_ENDPOINT_URL")}


def test_the_private_tmp_shows_only_the_paths_bound_into_it(tmp_path):
    """The namespace's /tmp, as the remote node gets it: a directory and a file kept under /tmp
    (as the repository, its virtualenv and the Ray token are when they live there) stay visible
    at the same path; everything else under /tmp is gone."""
    kept, hidden, token = tmp_path / "repo", tmp_path / "driver-only", tmp_path / "auth_token"
    kept.mkdir()
    (kept / "module.py").write_text("kept")
    hidden.mkdir()
    (hidden / "store.parquet").write_text("hidden")
    token.write_text("token")
    probe = "import os, sys; print(*[os.path.exists(p) for p in sys.argv[1:]])"
    script = namespace_script(kept_paths([kept, token]),
                              [sys.executable, "-c", probe, str(kept / "module.py"), str(token), str(hidden / "store.parquet")])
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "False"]


@pytest.mark.slow
def test_a_task_on_the_remote_node_runs_there_and_shares_no_tmp_with_the_driver(remote_node, tmp_path):
    secret = tmp_path / "driver-only.txt"
    secret.write_text("the driver's local file")
    driver_node = ray.get_runtime_context().get_node_id()

    there = ray.get(_probe.options(resources=REMOTE).remote(str(secret), f"remote-{uuid.uuid4().hex}"))
    assert there["node_id"] == remote_node.node_id != driver_node
    assert not there["sees"], "the remote node sees a file the driver wrote under /tmp"
    assert not Path(there["probe"]).exists(), "the driver sees a file the remote node wrote under /tmp"
    assert Path(there["imoe_ray"]).resolve() == Path(__file__).resolve().parents[1] / "imoe_ray" / "__init__.py"

    # the same probe on the driver's node does see both: the difference is the namespace, not the probe
    here = ray.get(_probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(driver_node, soft=False))
                   .remote(str(secret), f"local-{uuid.uuid4().hex}"))
    assert here["node_id"] == driver_node and here["sees"] and Path(here["probe"]).exists()
    Path(here["probe"]).unlink()


@pytest.mark.slow
def test_the_remote_node_reads_parquet_from_the_s3_server(remote_node, s3):
    key = f"infra-{uuid.uuid4().hex}/table.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["one", "two"]}), f"imoe-test/{key}", filesystem=s3.filesystem())

    got = ray.get(_read_parquet.options(resources=REMOTE).remote(f"s3://imoe-test/{key}"))
    assert got["node_id"] == remote_node.node_id
    assert got["endpoint"] == s3.endpoint
    assert got["rows"] == [{"id": "a", "text": "one"}, {"id": "b", "text": "two"}]


def test_the_s3_server_refuses_a_wrong_secret_key(s3):
    fs = s3.filesystem()
    pq.write_table(pa.table({"x": [1]}), "imoe-test/auth/t.parquet", filesystem=fs)
    assert fs.get_file_info("imoe-test/auth/t.parquet").size > 0
    with pytest.raises(OSError, match="ACCESS_DENIED"):
        s3.filesystem(secret_key=s3.secret_key[::-1]).get_file_info("imoe-test/auth/t.parquet")


def test_pyarrow_and_lancedb_open_s3_uris_from_the_aws_variables(s3, monkeypatch):
    """The recipes the product relies on: pyarrow reads AWS_ENDPOINT_URL itself; Lance reads the same
    variables but needs allow_http for an http:// endpoint (an option, or AWS_ALLOW_HTTP=true)."""
    import lancedb
    from pyarrow.fs import FileSystem, S3FileSystem

    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    prefix = f"s3://imoe-test/recipes-{uuid.uuid4().hex}"
    fs, path = FileSystem.from_uri(f"{prefix}/t.parquet")
    assert isinstance(fs, S3FileSystem)
    pq.write_table(pa.table({"x": [1, 2]}), path, filesystem=fs)
    assert pq.read_table(f"{prefix}/t.parquet").column("x").to_pylist() == [1, 2]

    rows = [{"vector": [1.0, 0.0], "text": "alpha"}, {"vector": [0.0, 1.0], "text": "beta"}]
    lancedb.connect(f"{prefix}/kb", storage_options={"allow_http": "true"}).create_table("chunks", data=rows)
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
    table = lancedb.connect(f"{prefix}/kb").open_table("chunks")
    assert table.count_rows() == 2
    assert table.search([0.0, 1.0]).limit(1).to_list()[0]["text"] == "beta"
    assert fs.get_file_info(f"{path.rsplit('/', 1)[0]}/kb/chunks.lance").type.name == "Directory"


@pytest.mark.slow
def test_a_killed_remote_node_is_marked_dead_and_a_fresh_one_takes_work(remote_node):
    """The fault tests' tools: the raylet killed, Ray marks the node dead; a fresh node joins."""
    dead = remote_node.kill_raylet()
    assert not any(n["NodeID"] == dead and n["Alive"] for n in ray.nodes())
    fresh = remote_node.start()
    assert fresh != dead
    got = ray.get(_probe.options(resources=REMOTE).remote("/nonexistent", f"fresh-{uuid.uuid4().hex}"))
    assert got["node_id"] == fresh
