"""API keys without Ray: the CLI's contract, the stored digests, the middleware in front of a real
Starlette app (401, 429 with Retry-After, the open health check), and job ownership."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from imoe_ray.serving.auth import Authenticate, KeyRing, agent_of, create_key, load_keys, owns, revoke_key
from imoe_ray.store import Store

BIN = Path(sys.executable).parent


def imoe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "imoe"), *args], capture_output=True, text=True, timeout=120)


def test_the_cli_prints_the_key_once_and_stores_only_its_digest(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    made = imoe("api-keys", "create", "alice", "--store", str(store), "--role", "admin", "--max-priority", "5")
    assert made.returncode == 0, made.stderr
    out = json.loads(made.stdout)
    assert out["name"] == "alice" and out["role"] == "admin" and out["key"].startswith("imoe-")
    stored = (store / "auth" / "keys.json").read_text()
    assert out["key"] not in stored and "alice" in stored
    listed = json.loads(imoe("api-keys", "list", "--store", str(store), "--json").stdout)
    assert [(k["name"], k["role"], k["max_priority"]) for k in listed] == [("alice", "admin", 5)]
    assert "sha256" not in listed[0]
    again = imoe("api-keys", "create", "alice", "--store", str(store))
    assert again.returncode == 2 and "exists" in again.stderr and "Traceback" not in again.stderr
    assert imoe("api-keys", "create", "a/b", "--store", str(store)).returncode == 2
    assert imoe("api-keys", "revoke", "alice", "--store", str(store)).returncode == 0
    assert imoe("api-keys", "revoke", "alice", "--store", str(store)).returncode == 2
    assert load_keys(Store(str(store))).keys == []


def test_serving_beyond_the_loopback_without_keys_is_refused(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    out = imoe("serve", "--store", str(store), "--host", "0.0.0.0")
    assert out.returncode == 2 and "no API keys" in out.stderr and "--insecure" in out.stderr
    assert "Traceback" not in out.stderr


def _app(store: Store):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def whoami(request):
        key = request.state.api_key
        return JSONResponse({"name": key.name if key else None})

    app = Starlette(routes=[Route("/healthz", whoami), Route("/v1/models", whoami)])
    app.add_middleware(Authenticate)
    app.state.keys = KeyRing(store, refresh_s=0)
    return app


def test_once_a_key_exists_every_endpoint_but_the_health_check_needs_it(tmp_path):
    from starlette.testclient import TestClient

    store = Store(str(tmp_path))
    client = TestClient(_app(store))
    assert client.get("/v1/models").json() == {"name": None}  # no keys: open
    _, secret = create_key(store, "bob", rate=1000)
    refused = client.get("/v1/models")
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
    assert client.get("/v1/models", headers={"Authorization": "Bearer imoe-wrong"}).status_code == 401
    assert client.get("/healthz").status_code == 200
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {secret}"}).json() == {"name": "bob"}
    revoke_key(store, "bob")
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {secret}"}).status_code == 200  # open again


def test_a_key_over_its_rate_gets_429_with_retry_after(tmp_path):
    from starlette.testclient import TestClient

    store = Store(str(tmp_path))
    _, secret = create_key(store, "slow", rate=0.01)  # a burst of one request, then one per 100 s
    client = TestClient(_app(store))
    codes = [client.get("/v1/models", headers={"Authorization": f"Bearer {secret}"}).status_code for _ in range(3)]
    assert codes[0] == 200 and codes[-1] == 429
    last = client.get("/v1/models", headers={"Authorization": f"Bearer {secret}"})
    assert last.headers["retry-after"] == "1" and last.json()["error"]["code"] == "rate_limit_exceeded"


def test_job_agents_live_in_the_key_namespace(tmp_path):
    store = Store(str(tmp_path))
    alice, _ = create_key(store, "alice")
    admin, _ = create_key(store, "root", role="admin")
    assert agent_of(alice, None) == "alice" and agent_of(alice, "planner") == "alice/planner"
    assert agent_of(alice, "bob") == "alice/bob" and agent_of(alice, "alice/x") == "alice/x"
    assert owns(alice, "alice/planner") and not owns(alice, "bob") and not owns(alice, "alicex")
    assert owns(admin, "bob") and owns(None, "anyone")
    assert agent_of(None, None) == "anonymous" and agent_of(None, "x") == "x"


@pytest.mark.parametrize("name", ["", "a" * 65, "../x", "a b"])
def test_bad_key_names_are_refused(tmp_path, name):
    from imoe_ray.serving.auth import ApiKeyError

    with pytest.raises(ApiKeyError):
        create_key(Store(str(tmp_path)), name)
