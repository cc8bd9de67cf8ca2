"""One real local Ray cluster (`ray start --head`, with its dashboard) for the whole test session,
and the lanes.

Lanes: a test that uses the cluster, the built store or the S3 server (the fixtures below) is marked
`ray` here; the others are unit tests and run first (`pytest -m "not ray"` runs only them, with
no Ray cluster). Multi-node and fault-injection runs are marked `slow` in their modules and are
left out of the README's test command (`pytest -m slow` runs them).

Tests join it through RAY_ADDRESS, the same way a `ray job submit` driver does; it is stopped
at the end by terminating the blocking `ray start` process, so other Ray instances on the machine
are left alone. Token authentication is on (Ray's default for new local clusters) with a token
private to the session, so the job CLI and the drivers authenticate as on a real cluster.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

# imported early: hypothesis's pytest plugin otherwise imports it lazily in the end-of-run summary, where
# Python 3.11's compiler can fail under pytest's assertion rewriting ("AST constructor recursion depth")
import hypothesis  # noqa: F401
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TEMP_DIR = Path("/tmp") / f"imoe-ray-test-{os.getpid()}"


def _session_auth() -> dict[str, str]:
    """Ray reads its auth mode once, at import: set it before any test module imports ray."""
    import secrets

    TEMP_DIR.mkdir(parents=True, exist_ok=True)
    token = TEMP_DIR / "auth_token"
    token.write_text(secrets.token_hex(32))
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}


AUTH = _session_auth()
os.environ.update(AUTH)
# This process never starts a Ray instance of its own: after the session's cluster is stopped, a
# leftover Serve handle's metrics thread would otherwise start a fresh local one at exit (read at import).
os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"


INTEGRATION_FIXTURES = {"ray_cluster", "ray_session", "built", "s3", "remote_node", "seaweed_s3"}


def pytest_collection_modifyitems(config, items):
    """Mark the tests that need the cluster or a server `ray`, and run the unit tests first (a stable
    sort: each module's tests keep their order, so module fixtures are set up once)."""
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)
    items.sort(key=lambda item: item.get_closest_marker("ray") is not None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}")


def launch_imoe_serve(store: Path, env: dict, settings: list[str], log_path: Path) -> tuple[subprocess.Popen, str]:
    """`imoe serve` started in its own process on a free port, not waited for: (process, base URL)."""
    port = free_port()
    cmd = [str(BIN / "imoe"), "serve", "--store", str(store), "--port", str(port),
           *[a for s in settings for a in ("--set", s)]]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    return proc, f"http://127.0.0.1:{port}"


def start_imoe_serve(store: Path, env: dict, settings: list[str], log_path: Path,
                     timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """`imoe serve` in its own process, joined to the session's cluster as a user starts it;
    returns (process, base URL) once `/healthz` answers 200."""
    import requests

    proc, base = launch_imoe_serve(store, env, settings, log_path)

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"imoe serve exited: {log_path.read_text()[-3000:]}")
        try:
            return requests.get(f"{base}/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    try:
        _wait_for(ready, timeout, "imoe serve's /healthz")
    except TimeoutError:
        proc.kill()
        raise TimeoutError(log_path.read_text()[-3000:]) from None
    return proc, base


def stop_imoe_serve(proc: subprocess.Popen) -> None:
    """SIGTERM, as a user stops it; it must exit by itself."""
    import signal

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """Start `ray start --head --block`; yields {address, dashboard_url, env}."""
    import requests

    gcs_port, dash_port = free_port(), free_port()
    temp_dir = TEMP_DIR
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0", **AUTH)
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_ENABLE_AUTO_CONNECT", None)  # the CLIs and drivers the tests start behave as a user's would
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
         "--num-cpus=2", "--num-gpus=0",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    dashboard = f"http://127.0.0.1:{dash_port}"

    def ready() -> bool:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited: {head.stdout.read().decode(errors='replace')[-3000:]}")
        try:
            return requests.get(f"{dashboard}/api/version", timeout=1).status_code < 500  # 401: up, wants the token
        except requests.RequestException:
            return False

    _wait_for(ready, 120, "the Ray head and its dashboard")
    address = f"127.0.0.1:{gcs_port}"
    os.environ["RAY_ADDRESS"] = address
    yield {"address": address, "dashboard_url": dashboard, "env": dict(env, RAY_ADDRESS=address)}
    import ray

    ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)
    head.terminate()  # the cluster is private to the session: a short grace, then the whole process group
    try:
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(head.pid, 9)
    except ProcessLookupError:
        pass
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_session(ray_cluster):
    """This process joined to the session's cluster."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_cluster["address"], log_to_driver=False)
    return ray_cluster


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS `weed server`, tests/s3_server.py) for the session,
    started by the first test that asks for it; `s3.env()` holds the AWS_* variables clients read.
    Buckets are created by the first write into them."""
    from s3_server import start_s3_server, stop_s3_server

    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    yield server
    stop_s3_server(server)


@pytest.fixture(scope="module")
def remote_node(ray_session, s3, tmp_path_factory):
    """A worker node joined to the session's cluster for one test module (tests/remote_node.py): its
    own mount namespace with a private /tmp (the driver's temp files and local stores are invisible
    to it), 2 CPUs, the custom resource `{"imoe_remote": 100}` and the s3 server's AWS_* variables.
    Work lands on it with `resources={"imoe_remote": 1}`, or anywhere Ray puts CPU work while the
    module runs. Yields a `RemoteNodes`: `.node_id`, `.kill_raylet()`, `.start()` (a fresh node).
    At module end every node started is stopped and Ray marks it dead, so the rest of the suite
    (whose stores live under /tmp) never runs on it."""
    from remote_node import RemoteNodes

    nodes = RemoteNodes(ray_session["address"], dict(ray_session["env"], **s3.env()),
                        tmp_path_factory.mktemp("remote-node"))
    nodes.start()
    yield nodes
    nodes.stop()


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A small multi-domain corpus of real documentation text (the sample corpus, 12 per domain)."""
    from imoe_ray.corpus.sample import build_sample_corpus

    out = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    build_sample_corpus(out, per_domain=12, seed=0)
    return out


# A base LM and experts small enough to train in seconds; small categories fold, as a user's would.
TINY_LM = ["pretrain.vocab_size=512", "pretrain.hidden_size=32", "pretrain.layers=1", "pretrain.heads=2",
           "pretrain.intermediate_size=64", "pretrain.seq_len=64", "pretrain.epochs=0.5",
           "experts.epochs=0.5", "experts.r=4", "experts.min_chunks=16",  # >= 3 experts (serve tests)
           "fusion.summarizer=false"]  # tests/test_summarizer.py trains one on a copy of the store


@pytest.fixture(scope="session")
def built(ray_session, small_corpus, tmp_path_factory):
    """The small corpus built through every stage once per session: (cfg, store, manifests)."""
    from imoe_ray.build import build
    from imoe_ray.config import load_config
    from imoe_ray.store import Store

    store = tmp_path_factory.mktemp("store")
    cfg = load_config(None, ["embedding.part_rows=40", *TINY_LM], store=str(store), corpus__path=str(small_corpus))
    manifests = build(cfg, report=lambda m: None)
    return cfg, Store(store), manifests
