"""The cluster path, end to end: the corpus and the store on a real S3 server (SeaweedFS), and the
work placed on a Ray worker node that shares no disk with the driver (its own mount namespace with a
private /tmp: see tests/remote_node.py). Everything a stage needs must travel as a URI.

One store is built once for the module (through the experts stage, tiny settings); the tests then
use it the way a user would: `imoe route`, `imoe eval lm`, `imoe serve` + the `openai` client,
`ray job submit`, `imoe experts install`, and a worker node killed while experts train.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import BIN, REPO, TINY_LM, start_imoe_serve, stop_imoe_serve

pytestmark = pytest.mark.slow  # a second build, on S3, with a second node: `pytest -m slow`

BUCKET = "imoe-cluster"
PLACE_REMOTE = 'ray.resources={"imoe_remote": 1}'
# What a local store's assignments.parquet holds (tests/test_discovery.py checks the local store's).
ASSIGNMENT_COLUMNS = {"chunk_id", "id", "top_category", "categories", "memberships"}
STORE_FILES = ("adapter_model.safetensors", "model.safetensors", "assignments.parquet", "index.json")


def _sets(settings: list[str]) -> list[str]:
    return [a for s in settings for a in ("--set", s)]


def imoe(args: list[str], env: dict, timeout: float = 1800) -> subprocess.CompletedProcess:
    out = subprocess.run([str(BIN / "imoe"), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert out.returncode == 0, f"imoe {' '.join(args)} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _local_copies(fs, store_path: str, roots: list[Path], skip: Path, since: float) -> list[str]:
    """Local files (outside `skip`) whose bytes equal one of the store's models or tables: what a stage
    would have left on the driver's disk had it written the store there."""
    import hashlib

    from pyarrow.fs import FileSelector, FileType

    stored = {}
    for info in fs.get_file_info(FileSelector(store_path, recursive=True)):
        if info.type == FileType.File and info.base_name in STORE_FILES and info.size > 64:
            with fs.open_input_stream(info.path) as f:
                stored[(info.size, hashlib.sha256(f.read()).hexdigest())] = info.path
    found = []
    for root in roots:
        for name in STORE_FILES:
            for p in root.rglob(name) if root.is_dir() else []:
                if str(p).startswith(str(skip)) or not p.is_file() or p.stat().st_mtime < since:
                    continue
                if (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()) in stored:
                    found.append(str(p))
    return found


@pytest.fixture(scope="module")
def cluster(ray_session, s3, remote_node, tmp_path_factory):
    """(env for CLI commands, the nodes' shared cache dir, the remote node)."""
    cache = tmp_path_factory.mktemp("node-cache")
    env = dict(ray_session["env"], **s3.env())
    return env, cache, remote_node


@pytest.fixture(scope="module")
def s3_store(cluster, s3, small_corpus):
    """The small corpus uploaded to S3 and built there through the experts stage on the cluster."""
    env, cache, _ = cluster
    fs = s3.filesystem()
    fs.create_dir(BUCKET)
    with fs.open_output_stream(f"{BUCKET}/corpus.jsonl") as f:
        f.write(small_corpus.read_bytes())
    store = f"s3://{BUCKET}/store"
    started = time.time()
    out = imoe(["build", "--corpus", f"s3://{BUCKET}/corpus.jsonl", "--text-column", "text", "--id-column", "id",
                "--store", store, "--until", "experts",
                *_sets([*TINY_LM, "embedding.part_rows=40", PLACE_REMOTE, f"cache_dir={cache}"])], env)
    return store, out.stdout + out.stderr, started


def test_build_on_s3_places_training_on_the_remote_node(s3_store, s3, cluster):
    from ray.util.state import list_actors

    store, log, _ = s3_store
    _, _, remote = cluster
    fs = s3.filesystem()
    with fs.open_input_file(f"{BUCKET}/store/assignments.parquet") as f:
        columns = set(pq.read_schema(f).names)
    assert ASSIGNMENT_COLUMNS <= columns, columns
    with fs.open_input_stream(f"{BUCKET}/store/experts/index.json") as f:
        index = json.loads(f.read())
    assert len(index["experts"]) >= 2, log[-2000:]
    train_nodes = {a.node_id for a in list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=1000)}
    assert remote.started[0].node_id in train_nodes, "no Train worker ran on the remote node"
    for name in ("manifests/experts.json", "config.yaml", "kb/fusion.json"):
        assert fs.get_file_info(f"{BUCKET}/store/{name}").size > 0, name


def test_route_and_eval_lm_read_the_s3_store(s3_store, cluster, tmp_path):
    store, _, _ = s3_store
    env, cache, _ = cluster
    routed = json.loads(imoe(["route", "--store", store, "--json", "how do I index a numpy array",
                              "--set", f"cache_dir={cache}"], env).stdout.strip().splitlines()[-1])
    assert routed["names"] and routed["experts"]
    out = tmp_path / "eval-lm.json"
    imoe(["eval", "lm", "--store", store, "-o", str(out), "--max-texts", "20", "--set", f"cache_dir={cache}"], env)
    result = json.loads(out.read_text())
    assert result["perplexity"]["mixture"] > 1


def test_serve_on_the_remote_node_answers_the_openai_client(s3_store, cluster, tmp_path):
    from openai import OpenAI
    from ray.util.state import list_actors

    store, _, _ = s3_store
    env, cache, remote = cluster
    proc, base = start_imoe_serve(store, env, [PLACE_REMOTE, f"cache_dir={cache}"], tmp_path / "serve.log")
    try:
        client = OpenAI(base_url=f"{base}/v1", api_key="unused")
        answer = client.chat.completions.create(
            model="imoe", messages=[{"role": "user", "content": "how do I plot a histogram"}], max_tokens=8,
            extra_body={"imoe": {"mode": "optimized"}})
        assert answer.choices[0].finish_reason in ("stop", "length")
        assert answer.model_extra["imoe"]["experts"] and answer.model_extra["imoe"]["citations"]
        replicas = list_actors(filters=[("class_name", "=", "ServeReplica:imoe:Experts"), ("state", "=", "ALIVE")])
        assert replicas and {r.node_id for r in replicas} == {remote.node_id}
    finally:
        stop_imoe_serve(proc)


def _serve_cli(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    out = subprocess.run([str(BIN / "serve"), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert out.returncode == 0, f"serve {' '.join(args)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def test_serve_deploy_of_the_serve_config_serves_the_s3_store(s3_store, cluster, s3, ray_cluster, tmp_path):
    """`serve deploy serve_apps/serve_config.yaml` as the file says to use it (args.store edited)."""
    import requests
    import yaml
    from openai import OpenAI
    from ray.util.state import list_actors

    from conftest import free_port

    store, _, _ = s3_store
    env, cache, remote = cluster
    config = yaml.safe_load((REPO / "serve_apps" / "serve_config.yaml").read_text())
    port = free_port()
    config["http_options"].update(host="127.0.0.1", port=port)  # a shared machine: no fixed port
    (app,) = config["applications"]
    app["args"] = {"store": store, "set": f"{PLACE_REMOTE},cache_dir={cache},serve.min_replicas=1,serve.max_replicas=1"}
    app["runtime_env"] = {"env_vars": s3.env()}  # the nodes' S3 settings (on a real cluster: the image or role)
    made = subprocess.run([str(BIN / "imoe"), "api-keys", "create", "deployer", "--store", store], env=env,
                          capture_output=True, text=True, timeout=300)  # a deployed app refuses a store without keys
    assert made.returncode == 0, made.stderr[-2000:]
    key = json.loads(made.stdout)["key"]
    deployed = tmp_path / "serve_config.yaml"
    deployed.write_text(yaml.safe_dump(config))
    _serve_cli(["deploy", str(deployed), "--address", ray_cluster["dashboard_url"]], env)
    try:
        deadline, status = time.monotonic() + 900, None
        while status != 200 and time.monotonic() < deadline:
            try:
                status = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code
            except requests.RequestException:
                time.sleep(2)
        assert status == 200, _serve_cli(["status", "--address", ray_cluster["dashboard_url"]], env).stdout[-3000:]
        assert requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).status_code == 401
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=300)
        reply = client.chat.completions.create(model="imoe", max_tokens=8,
                                               messages=[{"role": "user", "content": "how do I plot a histogram"}])
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens > 0
        replicas = list_actors(filters=[("class_name", "=", "ServeReplica:imoe:Experts"), ("state", "=", "ALIVE")])
        assert replicas and {r.node_id for r in replicas} == {remote.node_id}
    finally:
        _serve_cli(["shutdown", "-y", "--address", ray_cluster["dashboard_url"]], env)


def test_experts_install_into_the_s3_store(s3_store, cluster, s3, tmp_path):
    """An expert packaged out of the S3 store and installed back under another name: the registry's
    files, the experts index and the router's profiles change on the object store."""
    store, _, _ = s3_store
    env, cache, _ = cluster
    fs = s3.filesystem()
    with fs.open_input_stream(f"{BUCKET}/store/experts/index.json") as f:
        first = json.loads(f.read())["experts"][0]["name"]
    package = tmp_path / "copy.expert"
    imoe(["experts", "package", first, "--store", store, "--name", "copied-expert", "--version", "1.0.0",
          "-o", str(package)], env)
    imoe(["experts", "install", str(package), "--store", store, "--allow-unsigned"], env)
    with fs.open_input_stream(f"{BUCKET}/store/experts/index.json") as f:
        names = [e["name"] for e in json.loads(f.read())["experts"]]
    assert "copied-expert" in names and first in names
    assert fs.get_file_info(f"{BUCKET}/store/registry/copied-expert/1.0.0").type.name == "Directory"
    assert fs.get_file_info(f"{BUCKET}/store/experts/copied-expert/adapter_config.json").size > 0
    listed = imoe(["experts", "list", "--store", store, "--json"], env).stdout
    assert "copied-expert" in listed


def test_ray_job_submit_runs_the_build_on_the_s3_store(s3_store, cluster, s3, ray_cluster):
    store, _, _ = s3_store
    env, cache, _ = cluster
    runtime_env = json.dumps({"env_vars": s3.env()})
    cmd = [str(BIN / "ray"), "job", "submit", "--address", ray_cluster["dashboard_url"], "--working-dir", str(REPO),
           "--runtime-env-json", runtime_env, "--", "python", "-m", "jobs.build", "--corpus",
           f"s3://{BUCKET}/corpus.jsonl", "--text-column", "text", "--id-column", "id", "--store", store,
           "--until", "experts", *_sets([*TINY_LM, "embedding.part_rows=40", PLACE_REMOTE, f"cache_dir={cache}"])]
    for _ in range(5):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        if "No available agent" not in out.stderr:  # the job server's agent not registered yet: as it says, retry
            break
        time.sleep(10)
    log = out.stdout + out.stderr
    assert out.returncode == 0 and "succeeded" in log.lower(), log[-4000:]
    assert "[experts] up to date, skipped" in log, log[-3000:]


def test_nothing_of_the_store_lands_on_local_disk_outside_the_cache(s3_store, cluster, s3):
    """Files written since the module's build started whose bytes equal the store's models or tables
    (builds are deterministic: a local store of the same corpus elsewhere has the same bytes, but not
    from this module's time on)."""
    _, _, started = s3_store
    _, cache, _ = cluster
    copies = _local_copies(s3.filesystem(), f"{BUCKET}/store", [Path("/tmp"), REPO, Path.home() / ".cache" / "imoe-ray"],
                           skip=Path(str(cache)), since=started)
    assert not copies, copies[:10]


def test_a_worker_node_killed_while_experts_train_loses_no_expert(s3_store, cluster, s3):
    """The experts stage re-run with longer training; when the first checkpoint of a job reaches the
    store, the remote node's raylet is killed and a fresh node joins. The build finishes; the job
    that was cut off continues from its checkpoint, and every expert is stored once."""
    store, _, _ = s3_store
    env, cache, remote = cluster
    fs = s3.filesystem()
    settings = [*TINY_LM, "embedding.part_rows=40", PLACE_REMOTE, f"cache_dir={cache}",
                "experts.epochs=60", "experts.checkpoint_s=1", "experts.max_concurrent=1",
                "experts.dense_baseline=false"]
    cmd = [str(BIN / "imoe"), "build", "--corpus", f"s3://{BUCKET}/corpus.jsonl", "--text-column", "text",
           "--id-column", "id", "--store", store, "--until", "experts", *_sets(settings)]
    from pyarrow.fs import FileSelector, FileType

    runs = f"{BUCKET}/store/runs/experts"
    earlier = {i.base_name for i in fs.get_file_info(FileSelector(runs, allow_not_found=True))}  # the first build's
    with open(Path(str(cache)) / "fault-build.log", "w") as log:
        build = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + 900
        checkpointed = None
        while checkpointed is None and time.monotonic() < deadline and build.poll() is None:
            if fs.get_file_info(runs).type == FileType.Directory:
                for info in fs.get_file_info(FileSelector(runs, recursive=True)):
                    run = info.path[len(runs) + 1:].split("/")[0]
                    if info.base_name == "trainable.safetensors" and run not in earlier:
                        checkpointed = run  # the first checkpoint of this re-run reached the store
                        break
            time.sleep(1)
        assert checkpointed, "no expert checkpoint reached the store"
        remote.kill_raylet()
        remote.start()
        assert build.wait(timeout=1800) == 0, (Path(str(cache)) / "fault-build.log").read_text()[-4000:]
    finally:
        if build.poll() is None:
            build.kill()
    with fs.open_input_stream(f"{BUCKET}/store/experts/index.json") as f:
        names = [e["name"] for e in json.loads(f.read())["experts"] if "package" not in e]  # trained ones
    manifests = {}
    for name in names:
        with fs.open_input_stream(f"{BUCKET}/store/experts/{name}/manifest.json") as f:
            manifests[name] = json.loads(f.read())
    assert all(m["training"]["epochs"] == 60 for m in manifests.values())
    cut_off = checkpointed.rsplit("-", 1)[0]
    assert manifests[cut_off]["training"]["resumed_from_step"] > 0, manifests[cut_off]["training"]
