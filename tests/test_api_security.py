"""The served API under attack and under load, over real HTTP (`imoe serve` as a user starts it):
keys turned on while it runs, another key's jobs invisible, idempotent job submission, hostile
requests next to well-formed ones, a burst past the server's bounds, and an outside fuzzer
(schemathesis, from the app's own OpenAPI schema) that must find no 5xx."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import schemathesis
import schemathesis.specs.openapi._hypothesis  # noqa: F401 - imported at collection, not deep inside a test
import schemathesis.specs.openapi.stateful.dependencies  # noqa: F401 - the same: Python 3.11's compiler can fail
# ("AST constructor recursion depth mismatch") when pytest rewrites a plugin's module imported deep in a test
from hypothesis import HealthCheck, settings

from conftest import start_imoe_serve, stop_imoe_serve

BIN = Path(sys.executable).parent
SETTINGS = ["serve.expert_cpus=0.5", "serve.router_cpus=0.25", "serve.max_tokens=8", "serve.max_tokens_limit=32",
            "serve.max_replicas=1", "serve.max_ongoing_requests=4", "serve.max_queued_requests=4",
            "jobs.max_tokens_limit=16", "jobs.max_queued_per_key=50", "serve.max_body_bytes=262144",
            "serve.max_prompt_chars=20000"]


def _shaped(response: requests.Response) -> dict:
    """An OpenAI-shaped error body (asserted), as a dict."""
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


def _api_key(store: Path, name: str, *args: str) -> str:
    out = subprocess.run([str(BIN / "imoe"), "api-keys", "create", name, "--store", str(store), *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["key"]


@pytest.fixture(scope="module")
def secured(ray_cluster, built, tmp_path_factory):
    """A server on a copy of the session's store, open at first; the module's first test turns keys on."""
    store = tmp_path_factory.mktemp("secured") / "store"
    shutil.copytree(built[1].root, store, ignore=shutil.ignore_patterns("runs", "jobs"))
    proc, base = start_imoe_serve(store, ray_cluster["env"], SETTINGS, store.parent / "serve.log")
    server = {"base": base, "url": f"{base}/v1", "store": store, "keys": {}}
    yield server
    stop_imoe_serve(proc)


def _auth(server: dict, name: str) -> dict:
    return {"Authorization": f"Bearer {server['keys'][name]}"}


def test_keys_created_while_serving_turn_authentication_on(secured):
    url, store = secured["url"], secured["store"]
    assert requests.get(f"{url}/models", timeout=30).status_code == 200  # no keys yet: open
    secured["keys"] = {"alice": _api_key(store, "alice", "--max-priority", "1"), "bob": _api_key(store, "bob"),
                       "root": _api_key(store, "root", "--role", "admin")}
    deadline = time.time() + 60  # the server re-reads its keys at most once a second
    while requests.get(f"{url}/models", timeout=30).status_code == 200 and time.time() < deadline:
        time.sleep(0.2)
    for method, path in (("GET", "/models"), ("POST", "/chat/completions"), ("POST", "/completions"),
                         ("GET", "/experts"), ("POST", "/jobs"), ("GET", "/jobs"), ("GET", "/jobs/job-x"),
                         ("DELETE", "/jobs/job-x"), ("POST", "/embeddings"), ("POST", "/route")):
        refused = requests.request(method, f"{url}{path}", json={}, timeout=30)
        assert refused.status_code == 401, (method, path, refused.text)
        assert _shaped(refused)["type"] == "authentication_error"
    wrong = requests.get(f"{url}/models", headers={"Authorization": "Bearer imoe-not-a-key"}, timeout=30)
    assert wrong.status_code == 401
    assert requests.get(f"{secured['base']}/healthz", timeout=30).status_code == 200

    from openai import OpenAI

    client = OpenAI(base_url=url, api_key=secured["keys"]["alice"], max_retries=0, timeout=120)
    reply = client.chat.completions.create(model="imoe", messages=[{"role": "user", "content": "numpy arrays"}],
                                           max_tokens=4)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_jobs_belong_to_their_key(secured):
    url = secured["url"]
    alice, bob, root = (_auth(secured, n) for n in ("alice", "bob", "root"))
    body = {"prompt": "the array is sorted and", "model": "base", "max_tokens": 4}
    job = requests.post(f"{url}/jobs", json=body | {"agent": "planner"}, headers=alice, timeout=60)
    assert job.status_code == 200, job.text
    job_id = job.json()["id"]
    mine = requests.get(f"{url}/jobs/{job_id}", headers=alice, timeout=30).json()
    assert mine["agent"] == "alice/planner"
    for method in ("GET", "DELETE"):
        other = requests.request(method, f"{url}/jobs/{job_id}", headers=bob, timeout=30)
        assert other.status_code == 404 and _shaped(other)["code"] == "job_not_found"
    events = requests.get(f"{url}/jobs/{job_id}/events", headers=bob, timeout=30)
    assert events.status_code == 404
    assert requests.get(f"{url}/jobs/{job_id}", headers=root, timeout=30).status_code == 200  # admin
    assert job_id not in [j["id"] for j in requests.get(f"{url}/jobs", headers=bob, timeout=30).json()["data"]]
    assert job_id in [j["id"] for j in requests.get(f"{url}/jobs", headers=alice, timeout=30).json()["data"]]
    too_high = requests.post(f"{url}/jobs", json=body | {"priority": 5}, headers=alice, timeout=60)
    assert too_high.status_code == 403 and _shaped(too_high)["param"] == "priority"


def test_a_retried_post_with_the_same_idempotency_key_is_one_job(secured):
    url, bob = secured["url"], _auth(secured, "bob")
    body = {"prompt": "a matrix of numbers", "model": "base", "max_tokens": 4}
    first = requests.post(f"{url}/jobs", json=body, headers=bob | {"Idempotency-Key": "retry-1"}, timeout=60).json()
    again = requests.post(f"{url}/jobs", json=body, headers=bob | {"Idempotency-Key": "retry-1"}, timeout=60).json()
    other = requests.post(f"{url}/jobs", json=body, headers=bob | {"Idempotency-Key": "retry-2"}, timeout=60).json()
    assert first["id"] == again["id"] != other["id"]
    alice_same_key = requests.post(f"{url}/jobs", json=body, headers=_auth(secured, "alice") | {"Idempotency-Key": "retry-1"},
                                   timeout=60).json()
    assert alice_same_key["id"] != first["id"], "idempotency keys are per caller"


HOSTILE = [
    ({"seed": 2**64}, 400, "seed"),
    ({"temperature": 1e-50}, 400, "temperature"),
    ({"prompt": "x" * 100_000}, 400, "prompt"),                  # past serve.max_prompt_chars
    ({"prompt": "x" * 300_000}, 413, None),                       # past serve.max_body_bytes
    ({"stop": ["s" * 1000]}, 400, "stop"),
    ({"max_tokens": 10**9}, 400, "max_tokens"),
]


def test_hostile_requests_fail_alone_next_to_well_formed_ones(secured):
    """Well-formed completions run while every hostile kind is sent several times: each hostile one
    gets its 4xx naming the parameter, every well-formed one succeeds."""
    url, alice = secured["url"], _auth(secured, "alice")
    good_body = {"model": "imoe", "prompt": "how do I sort an array", "max_tokens": 8, "temperature": 0.7, "seed": 1}
    results: list[int] = []

    def good() -> None:
        results.append(requests.post(f"{url}/completions", json=good_body, headers=alice, timeout=300).status_code)

    workers = [threading.Thread(target=good) for _ in range(4)]
    for w in workers:
        w.start()
    for _ in range(3):
        for extra, status, param in HOSTILE:
            r = requests.post(f"{url}/completions", json={"model": "imoe", "prompt": "hi"} | extra, headers=alice,
                              timeout=120)
            assert r.status_code == status, (extra.keys(), r.status_code, r.text[:300])
            assert _shaped(r)["param"] == param or param is None
    many = requests.post(f"{url}/chat/completions", headers=alice, timeout=120,
                         json={"model": "imoe", "messages": [{"role": "user", "content": "hi"}] * 300})
    assert many.status_code == 400 and _shaped(many)["param"] == "messages"
    job = requests.post(f"{url}/jobs", headers=alice, timeout=60, json={"prompt": "hi", "seed": 2**64})
    assert job.status_code == 400 and "seed" in _shaped(job)["param"]
    for w in workers:
        w.join(timeout=300)
    assert results == [200] * 4


def test_a_burst_past_the_bounds_is_answered_at_once_and_nothing_hangs(secured):
    """100 concurrent completions against bounds of 4 running + 4 queued: every request ends, with
    a 200 or a JSON 429 that says when to retry (how many of each depends on how much they overlap,
    which this test does not assume)."""
    url, root = secured["url"], _auth(secured, "root")
    body = {"model": "base", "prompt": "the array", "max_tokens": 2}

    def one(_) -> requests.Response:
        return requests.post(f"{url}/completions", json=body, headers=root, timeout=300)

    with ThreadPoolExecutor(100) as pool:
        responses = list(pool.map(one, range(100)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429} and 200 in codes, [(r.status_code, r.text[:300]) for r in responses if r.status_code != 200]
    for r in responses:
        if r.status_code == 429:
            assert r.headers.get("retry-after") and _shaped(r)["code"] == "rate_limit_exceeded"


def test_the_fuzzer_finds_no_server_error(secured):
    """Schemathesis generates requests for every operation of the app's own OpenAPI schema (a few
    examples each here; more with `st run` against a server): none gets a 5xx, every error is
    OpenAI-shaped. Driven from Hypothesis directly, one operation after another."""
    from hypothesis import given

    schema = schemathesis.openapi.from_url(f"{secured['base']}/openapi.json", headers=_auth(secured, "root"), timeout=60)
    failures, calls = [], 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=3, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            nonlocal calls
            calls += 1
            response = case.call(headers=_auth(secured, "root"), timeout=300)
            if response.status_code >= 500:
                failures.append((case.method, case.path, response.status_code, response.text[:300]))
            elif response.status_code >= 400:
                error = response.json().get("error", {})
                if not {"message", "type", "param", "code"} <= set(error):
                    failures.append((case.method, case.path, response.status_code, response.text[:300]))

        check()
    assert calls >= 10 and not failures, failures
