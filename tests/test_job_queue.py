"""The job queue: the scheduler (priority, FIFO, fairness, limits, victims), durable records across a
restart, greedy output identical across preemptions, and `/v1/jobs` over real HTTP on `imoe serve`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import requests

from imoe_ray.job_queue.preemption import absorb, step_request
from imoe_ray.job_queue.queue import JobQueueCore
from imoe_ray.job_queue.records import JobRecord
from imoe_ray.job_queue.scheduler import Scheduler

from conftest import TEMP_DIR, start_imoe_serve, stop_imoe_serve

REPO = Path(__file__).resolve().parents[1]


def _job(agent: str = "a", priority: int = 0, max_tokens: int = 4, **kw) -> JobRecord:
    return JobRecord(agent=agent, priority=priority, prompt_ids=[0, 5, 6], experts={"base": 1.0},
                     max_tokens=max_tokens, **kw)


# ---- the scheduler and the core, without Ray or a model ---------------------------------------

def test_priority_then_fifo_then_fairness_between_agents(tmp_path):
    q = JobQueueCore(str(tmp_path), slots=1)
    a1, a2, a3 = (q.submit(_job("a")) for _ in range(3))
    b1 = q.submit(_job("b"))
    urgent = q.submit(_job("c", priority=5))
    order = []
    for _ in range(5):
        r = q.take()
        order.append(r.id)
        assert q.stepped(r, [1, 2, 3, 4], None) == "done"
    # the higher class first; then agents take turns (b is not starved by a's backlog); FIFO per agent
    assert order == [urgent.id, a1.id, b1.id, a2.id, a3.id]
    assert q.jobs[a1.id].state == "succeeded" and q.jobs[a1.id].telemetry.tokens == 4


def test_per_agent_limit_and_free_slots(tmp_path):
    q = JobQueueCore(str(tmp_path), slots=3, per_agent_limit=1)
    a1, a2 = q.submit(_job("a")), q.submit(_job("a"))
    b1 = q.submit(_job("b"))
    assert {q.take().id, q.take().id} == {a1.id, b1.id}
    assert q.take() is None, "agent a is at its limit of one running job"
    assert q.view(a2.id)["position"] == 0 and q.view(a2.id)["state"] == "queued"


def test_victim_is_the_lowest_priority_and_latest_started():
    s = Scheduler(slots=2)
    low, mid = _job(priority=1), _job(priority=3)
    low.running_since, mid.running_since = 10.0, 5.0
    assert s.victim(_job(priority=5), [low, mid]) is low
    assert s.victim(_job(priority=1), [low, mid]) is None, "equal priority never preempts"
    assert s.victim(_job(priority=5), [low]) is None, "a free slot: nobody yields"
    newer = _job(priority=1)
    newer.running_since = 20.0
    assert s.victim(_job(priority=9), [low, newer, mid]) is newer


def test_preemption_at_a_step_boundary_keeps_the_tokens(tmp_path):
    q = JobQueueCore(str(tmp_path), slots=1)
    low = q.submit(_job("a", priority=0, max_tokens=6))
    assert q.take() is low and q.stepped(low, [7, 8], None) == "continue"
    high = q.submit(_job("b", priority=9, max_tokens=2))
    assert q.urgent() is high, "started at once in an extra slot"
    assert q.stepped(low, [9], None) == "preempted"
    assert low.generated == [7, 8, 9] and low.telemetry.preemptions == 1 and low.state == "preempted"
    assert step_request(low, 8).prompt_ids == [0, 5, 6, 7, 8, 9] and step_request(low, 8).max_new_tokens == 3
    assert q.stepped(high, [1, 2], None) == "done"
    assert q.take() is low and q.stepped(low, [10, 11, 12, 13], None) == "done"
    assert [h.state for h in low.history] == ["queued", "running", "preempted", "running", "succeeded"]
    assert [h.at for h in low.history] == sorted(h.at for h in low.history) and low.history[0].at == low.created
    saved = json.loads(low.model_dump_json())
    del saved["history"]  # a record written before jobs kept their history
    assert [(h.state, h.at) for h in JobRecord.model_validate(saved).history] == [("queued", low.created)]
    assert low.generated == [7, 8, 9, 10, 11, 12], "max_tokens caps the last step"


def test_records_survive_a_restart(tmp_path):
    q = JobQueueCore(str(tmp_path), slots=1)
    running = q.submit(_job("a", max_tokens=8))
    waiting = q.submit(_job("b"))
    done = q.submit(_job("c", max_tokens=1))
    cancelled = q.submit(_job("d"))
    assert q.take() is running and q.stepped(running, [4, 4], None) == "continue"
    q.cancel(cancelled.id)
    q.jobs[done.id].state = "succeeded"
    q.store.save(q.jobs[done.id])
    again = JobQueueCore(str(tmp_path), slots=1)  # a "restart": a new object over the same store
    assert again.recovered == 1
    assert again.jobs[running.id].state == "queued" and again.jobs[running.id].generated == [4, 4]
    assert again.jobs[waiting.id].state == "queued" and again.jobs[cancelled.id].state == "cancelled"
    assert again.jobs[done.id].state == "succeeded"
    assert again.take().id == running.id, "the interrupted job keeps its place"
    assert not list((tmp_path / "jobs").glob("*.tmp*")), "writes are temp-then-rename"
    old = JobQueueCore(str(tmp_path), slots=1, retention_s=1e-9)
    assert cancelled.id not in old.jobs and waiting.id in old.jobs, "retention drops finished records only"


def test_deadline_and_cancel(tmp_path):
    q = JobQueueCore(str(tmp_path), slots=1)
    late = q.submit(_job("a", deadline=time.time() - 1))
    running = q.submit(_job("b"))
    assert q.take() is running and q.jobs[late.id].state == "failed" and "deadline" in q.jobs[late.id].error
    q.cancel(running.id)
    assert q.stepped(running, [1], None) == "stopped" and running.state == "cancelled" and running.generated == []


def test_absorb_finishes_on_stop_or_length():
    r = _job(max_tokens=3)
    assert not absorb(r, [1], None) and absorb(r, [2], "stop") and r.finish_reason == "stop"
    r = _job(max_tokens=2)
    assert absorb(r, [1, 2, 3], "length") and r.generated == [1, 2] and r.finish_reason == "length"


# ---- greedy decoding: preempted == uninterrupted, with the real model --------------------------

@pytest.fixture(scope="module")
def served_store(built) -> Path:
    return Path(built[1].root)


def test_greedy_preempted_job_equals_uninterrupted(served_store):
    from imoe_ray.serving.generation import GenerationRequest
    from imoe_ray.serving.model import ServingModel

    model = ServingModel(served_store, threads=1)
    names = [e["name"] for e in json.loads((served_store / "experts" / "index.json").read_text())["experts"]]
    eos = model.tokenizer.eos_token_id
    prompt = [eos] + model.tokenizer("the server sends the request and", add_special_tokens=False)["input_ids"]
    for experts in ({names[0]: 1.0}, {names[0]: 0.6, names[1]: 0.4}):
        whole = model.generate([GenerationRequest(prompt, experts, 24)])[0].token_ids
        record = JobRecord(agent="a", priority=0, prompt_ids=prompt, experts=experts, max_tokens=24)
        done, steps = False, 0
        for size in (1, 5, 3, 7, 8, 8):  # paused after every step; each resume starts from prompt + tokens
            out = model.generate([step_request(record, size)])[0]
            steps += 1
            if absorb(record, out.token_ids, out.finish_reason):
                done = True
                break
            record = JobRecord.model_validate_json(record.model_dump_json())  # as saved and reloaded
        assert done and steps > 2
        assert record.generated == whole, experts


# ---- over HTTP on a real `imoe serve` ---------------------------------------------------------

SETTINGS = ["serve.expert_cpus=0.5", "serve.router_cpus=0.25", "serve.max_loaded_experts=2", "serve.max_replicas=1",
            "jobs.slots=1", "jobs.step_tokens=4", "jobs.max_tokens_limit=64"]


@pytest.fixture(scope="module")
def jobs_server(ray_cluster, served_store, tmp_path_factory):
    import shutil

    store = tmp_path_factory.mktemp("jobs") / "store"
    shutil.copytree(served_store, store, ignore=shutil.ignore_patterns("jobs"))
    log_path = store.parent / "serve.log"
    proc, base = start_imoe_serve(store, ray_cluster["env"], SETTINGS, log_path)
    server = {"url": f"{base}/v1", "store": store, "log": log_path, "proc": proc}
    yield server
    stop_imoe_serve(server["proc"])  # the restart test replaces it


def _wait(url: str, job_id: str, states=("succeeded", "failed", "cancelled"), timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        view = requests.get(f"{url}/jobs/{job_id}", timeout=30).json()
        if view["state"] in states:
            return view
        time.sleep(0.05)
    raise TimeoutError(view)


def test_jobs_over_http_preemption_events_and_errors(ray_session, jobs_server, served_store):
    url = jobs_server["url"]
    expert = json.loads((served_store / "experts" / "index.json").read_text())["experts"][0]["name"]
    body = {"agent": "a", "prompt": "the server sends the request and", "experts": [expert], "max_tokens": 40}
    alone = requests.post(f"{url}/jobs", json=body, timeout=60).json()
    assert alone["state"] == "queued"
    alone = _wait(url, alone["id"])
    assert alone["state"] == "succeeded" and alone["telemetry"]["tokens"] > 0 and alone["telemetry"]["preemptions"] == 0
    # slots=1: a low job runs, a high one arrives, the low one is paused and later resumed
    low = requests.post(f"{url}/jobs", json=body | {"agent": "low", "priority": 0}, timeout=60).json()
    _wait(url, low["id"], states=("running", "succeeded"))
    high = requests.post(f"{url}/jobs", json=body | {"agent": "high", "priority": 9, "max_tokens": 8}, timeout=60).json()
    events = requests.get(f"{url}/jobs/{high['id']}/events", stream=True, timeout=120)
    states = [json.loads(line[6:])["state"] for line in events.iter_lines(decode_unicode=True)
              if line.startswith("data: {")]
    assert states[-1] == "succeeded"  # how many events came before depends on when the stream connected
    high = _wait(url, high["id"])
    assert [h["state"] for h in high["history"]] == ["queued", "running", "succeeded"], high
    low = _wait(url, low["id"])
    assert low["state"] == "succeeded" and low["telemetry"]["preemptions"] >= 1, low
    lived = [h["state"] for h in low["history"]]
    assert lived[:2] == ["queued", "running"] and "preempted" in lived and lived[-1] == "succeeded", lived
    assert low["output"] == alone["output"], "greedy output identical across a preemption"
    listed = requests.get(f"{url}/jobs", params={"agent": "low"}, timeout=30).json()["data"]
    assert low["id"] in [j["id"] for j in listed] and {j["agent"] for j in listed} == {"low"}
    record = json.loads((jobs_server["store"] / "jobs" / f"{low['id']}.json").read_text())
    assert record["state"] == "succeeded" and record["telemetry"]["preemptions"] >= 1
    routed = requests.post(f"{url}/jobs", json={"agent": "r", "messages": [{"role": "user", "content": "numpy arrays"}],
                                                "max_tokens": 4}, timeout=120).json()
    assert _wait(url, routed["id"])["state"] == "succeeded", "routed by the store's router, from chat messages"
    # cancel (slots=1: the second job waits behind the first)
    requests.post(f"{url}/jobs", json=body, timeout=60)
    job = requests.post(f"{url}/jobs", json=body, timeout=60).json()
    cancelled = requests.delete(f"{url}/jobs/{job['id']}", timeout=30).json()
    assert cancelled["state"] == "cancelled" and _wait(url, job["id"])["state"] == "cancelled"
    # bad submissions: OpenAI-shaped 4xx
    for bad, status in ((body | {"colour": "red"}, 400), (body | {"priority": -1}, 400),
                        (body | {"max_tokens": 65}, 400), ({"agent": "a"}, 400),
                        (body | {"experts": ["nope"]}, 404)):
        r = requests.post(f"{url}/jobs", json=bad, timeout=60)
        assert r.status_code == status and r.json()["error"]["message"], (bad, r.text)
    r = requests.get(f"{url}/jobs/job-nothere", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
    # the telemetry as Ray metrics: what the dashboard's Prometheus scrapes from the node
    def exported_all(m: dict[str, float]) -> bool:
        return (m.get("ray_imoe_jobs_submitted", 0) >= 6 and m.get("ray_imoe_job_preemptions", 0) >= 1
                and m.get("ray_imoe_jobs_finished", 0) >= 4 and m.get("ray_imoe_job_queued_ms_count", 0) >= 4)

    exported = _ray_metrics(exported_all)
    assert exported_all(exported), exported


def _ray_metrics(ready, timeout: float = 60) -> dict[str, float]:
    """The `imoe_*` series on the node's Prometheus endpoint, summed over their labels, once `ready`
    holds (Ray exports every few seconds)."""
    import ray

    node = ray.nodes()[0]
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    deadline = time.time() + timeout
    while True:
        totals: dict[str, float] = {}
        for line in requests.get(url, timeout=10).text.splitlines():
            if line.startswith("ray_imoe_"):
                name, value = line.split("{")[0].split(" ")[0], float(line.rsplit(" ", 1)[1])
                name = name.removesuffix("_total")  # Prometheus names a counter's series `<name>_total`
                totals[name] = totals.get(name, 0.0) + value
        if ready(totals) or time.time() > deadline:
            return totals
        time.sleep(1)


def test_jobs_survive_killing_the_job_queue_replica(ray_session, jobs_server, served_store):
    import ray

    url = jobs_server["url"]
    expert = json.loads((served_store / "experts" / "index.json").read_text())["experts"][0]["name"]
    body = {"agent": "k", "prompt": "a matrix of numbers", "experts": [expert], "max_tokens": 48}
    ids = [requests.post(f"{url}/jobs", json=body, timeout=60).json()["id"] for _ in range(2)]
    _wait(url, ids[0], states=("running", "succeeded"))
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "JobQueue" in a["name"]]
    assert replicas, "the JobQueue replica actor"
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    views = [_wait(url, i, timeout=180) for i in ids]
    assert [v["state"] for v in views] == ["succeeded", "succeeded"], views
    assert views[0]["output"] == views[1]["output"], "the same greedy job: the same output, restart or not"
    # the application still answers (asked over HTTP: this process's Serve client may be stale)
    assert requests.get(url.removesuffix("/v1") + "/healthz", timeout=60).status_code == 200


@pytest.mark.slow  # end to end, tens of seconds: `pytest -m slow`
def test_jobs_survive_restarting_the_whole_application(ray_cluster, jobs_server, served_store):
    """The module's `imoe serve` stopped (SIGTERM: the Serve application is deleted) while one job
    runs and others wait, then started again on the same store: the jobs finish with the same
    greedy output as a job never interrupted (no token lost or duplicated). A deadline that passes
    while its job waits fails it, over HTTP too. Runs last: it restarts the module's server."""
    expert = json.loads((served_store / "experts" / "index.json").read_text())["experts"][0]["name"]
    body = {"agent": "restart", "prompt": "the array is sorted and", "experts": [expert], "max_tokens": 48}
    url, store = jobs_server["url"], jobs_server["store"]

    def submit(job: dict) -> str:
        r = requests.post(f"{url}/jobs", json=job, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["id"]

    whole = _wait(url, submit(body))  # uninterrupted
    # slots=1: they run one after another; enough of them that some are still unfinished after the
    # seconds Serve takes to stop (a faster machine once finished 24 before the JobQueue replica stopped)
    ids = [submit(body) for _ in range(60)]
    late = submit(body | {"deadline_s": 0.5})
    _wait(url, ids[0], states=("running", "succeeded"))
    stop_imoe_serve(jobs_server["proc"])
    saved = [json.loads((store / "jobs" / f"{i}.json").read_text())["state"] for i in ids]
    assert saved[-1] in ("queued", "running", "preempted"), saved  # unfinished when the application stopped
    replica_logs = (TEMP_DIR / "session_latest" / "logs" / "serve").glob("replica_*JobQueue*.log")
    assert any("job queue stopped" in p.read_text(errors="replace") for p in replica_logs), \
        "the JobQueue replica stops its jobs when Serve stops it, not when it is killed"
    jobs_server["proc"], base = start_imoe_serve(store, ray_cluster["env"], SETTINGS, jobs_server["log"])
    views = [_wait(f"{base}/v1", i, timeout=180) for i in ids]
    assert [v["state"] for v in views] == ["succeeded"] * len(ids), views
    assert [v["output"] for v in views] == [whole["output"]] * len(ids), "the same greedy output across the restart"
    expired = _wait(f"{base}/v1", late)
    assert expired["state"] == "failed" and "deadline" in expired["error"], expired
