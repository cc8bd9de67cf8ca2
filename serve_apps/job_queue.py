"""The JobQueue deployment (one replica: it owns the schedule) and the `/v1/jobs` routes that the
Router ingress serves on the same port and forwards here.

Each of `jobs.slots` workers takes the next job and runs it step by step (`jobs.step_tokens` tokens
per `Experts.generate` call, from prompt + the tokens so far); between steps the job's record is
saved and the scheduler may pause it for a job that outranks it. A job that outranks a running one
while every slot is busy starts at once in an extra slot, and the victim yields at its next step
boundary, so an urgent job's first token does not wait for anyone's step to end.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import AsyncIterator

from fastapi import FastAPI, Header, Request
from fastapi.responses import StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.util import metrics

from imoe_ray.config import Config
from imoe_ray.job_queue.api import JobRequest
from imoe_ray.job_queue.preemption import decoded_by, step_request
from imoe_ray.job_queue.queue import FINISHED, JobQueueCore
from imoe_ray.job_queue.records import JobRecord
from imoe_ray.serving import openai_api as oa
from imoe_ray.serving.auth import ApiKey, agent_of, caller_of, owns
from imoe_ray.serving.generation import GenerationRequest
from imoe_ray.serving.limits import TokenBudget
from imoe_ray.serving.model_experts import ModelRefusal, ModelRequest
from imoe_ray.serving.requests import RequestPath, experts_call, one_part

log = logging.getLogger("ray.serve")


@serve.deployment(name="JobQueue", num_replicas=1, max_ongoing_requests=1000)
class JobQueue:
    async def __init__(self, experts: DeploymentHandle, store: str, config: dict):
        from transformers import AutoTokenizer

        from imoe_ray.experts.whole_model import model_experts
        from imoe_ray.serving.model import installed_experts, stop_token_ids

        cfg = Config.model_validate(config)
        self.cfg, self.store_dir, self.settings, self.experts = cfg, store, cfg.jobs, experts
        from imoe_ray.store.mirror import StoreMirror

        self.mirror = StoreMirror(store, cfg.cache_dir)
        root = self.mirror.root  # files read by path; job records go to the store itself
        self.tokenizer = AutoTokenizer.from_pretrained(root / "base")
        self.context = int(json.loads((root / "base" / "config.json").read_text()).get("max_position_embeddings", 2048))
        self.installed = set(installed_experts(root))
        self.whole_models = model_experts(root)           # name → HF directory: they decode a job alone
        self._model_tokenizers: dict[str, object] = {}
        self._planner = None  # the router, loaded with the first job that asks to be routed
        self.path = RequestPath(self.tokenizer, self.context, cfg.serve, stop_token_ids(root / "base", self.tokenizer),
                                budget=TokenBudget(self.context, cfg.jobs.max_tokens, cfg.jobs.max_tokens_limit))
        self.core = JobQueueCore(store, self.settings.slots, self.settings.per_agent_limit,
                                 self.settings.retention_s, decode=self._decode)
        self.submitted = metrics.Counter("imoe_jobs_submitted", "jobs submitted", tag_keys=("priority",))
        self.finished = metrics.Counter("imoe_jobs_finished", "jobs finished, by final state", tag_keys=("state",))
        self.depth = metrics.Gauge("imoe_jobs_waiting", "jobs queued or preempted, per priority", tag_keys=("priority",))
        self.running = metrics.Gauge("imoe_jobs_running", "jobs generating")
        self.preemptions = metrics.Counter("imoe_job_preemptions", "jobs paused for a higher-priority one")
        self.queued_ms = metrics.Histogram("imoe_job_queued_ms", "time a job waited before it (re)started (ms)",
                                           boundaries=[1, 5, 10, 50, 100, 500, 1000, 5000, 30000, 120000])
        self.wake = asyncio.Event()
        self.stopping = False
        self.workers = [asyncio.create_task(self._worker()) for _ in range(self.settings.slots)]
        self._extra: set[asyncio.Task] = set()
        self._gauges()
        if self.core.recovered:
            log.info("job queue: %d interrupted jobs requeued", self.core.recovered)

    async def __del__(self) -> None:
        """Serve is stopping this replica: take no new job and stop the running ones now, not when the
        replica is killed. Every job stays saved as it was after its last step; the queue requeues the
        interrupted ones when it starts again on this store."""
        self.stopping = True
        tasks = [*self.workers, *self._extra]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        log.info("job queue stopped: %d unfinished jobs saved for the next start", self.core.unfinished())

    # ---- the API (called by the Router's /v1/jobs routes) ----
    async def submit(self, body: dict, key: ApiKey | None = None, idempotency_key: str | None = None) -> dict:
        """A new job for the caller (`key`: its API key, None on a server without keys); a repeated
        `idempotency_key` of the same agent returns the job it created."""
        if self.stopping:
            e = oa.ApiError(503, "the job queue is shutting down; retry once the application is back", code="stopping")
            return {"status": e.status, "error": e.body()}
        try:
            request = JobRequest.model_validate(body)
            agent = agent_of(key, request.agent)
            if idempotency_key is not None:
                for r in self.core.jobs.values():
                    if r.idempotency_key == idempotency_key and r.agent == agent:
                        return {"id": r.id, "state": r.state}
            self._check_quota(key, agent)
            await asyncio.to_thread(self._follow_experts)
            record = await asyncio.to_thread(self._record, request, key, agent)
        except oa.ApiError as e:
            return {"status": e.status, "error": e.body()}
        record.idempotency_key = idempotency_key
        self.core.submit(record)
        self.submitted.inc(tags={"priority": str(record.priority)})
        self._schedule()
        return {"id": record.id, "state": record.state}

    def _check_quota(self, key: ApiKey | None, agent: str) -> None:
        if self.core.unfinished() >= self.settings.max_queued:
            raise oa.ApiError(429, f"the job queue is full ({self.settings.max_queued} unfinished jobs); retry later",
                              code="queue_full", kind="rate_limit_error")
        quota = self.settings.max_queued_per_key
        if quota is not None:
            mine = sum(1 for r in self.core.jobs.values() if not r.finished and
                       (owns(key, r.agent) if key is not None else r.agent == agent))
            if mine >= quota:
                raise oa.ApiError(429, f"{key.name if key else agent!r} has {mine} unfinished jobs, its quota "
                                       "(jobs.max_queued_per_key); retry once some finish",
                                  code="quota_exceeded", kind="rate_limit_error")

    def _follow_experts(self) -> None:
        """Experts installed or removed since the last job: a new router view with the new set."""
        from imoe_ray.experts.whole_model import model_experts
        from imoe_ray.serving.model import installed_experts

        if self.mirror.refresh():
            installed = set(installed_experts(self.mirror.root))
            if installed != self.installed:
                self.installed, self._planner = installed, None
                self.whole_models, self._model_tokenizers = model_experts(self.mirror.root), {}

    async def get(self, job_id: str, key: ApiKey | None = None) -> dict | None:
        """The job's view, or None when there is none or it is another key's (the caller learns nothing)."""
        record = self.core.jobs.get(job_id)
        return self.core.view(job_id) if record is not None and owns(key, record.agent) else None

    async def list(self, agent: str | None = None, state: str | None = None, key: ApiKey | None = None) -> list[dict]:
        return [view for view in self.core.list(agent, state) if owns(key, view["agent"])]

    async def cancel(self, job_id: str, key: ApiKey | None = None) -> dict | None:
        record = self.core.jobs.get(job_id)
        if record is None or not owns(key, record.agent):
            return None
        record = self.core.cancel(job_id)
        if record is not None and record.state == "cancelled":
            self.finished.inc(tags={"state": "cancelled"})
            self._schedule()
        return None if record is None else self.core.view(job_id)

    # ---- submissions ----
    def _record(self, body: JobRequest, key: ApiKey | None, agent: str) -> JobRecord:
        """The job's record, checked and routed on the request path the HTTP endpoints use."""
        from imoe_ray.serving.openai_api import ImoeOptions

        s = self.settings
        if body.priority > s.max_priority:
            raise oa.ApiError(400, f"priority is {body.priority}; priorities run from 0 to {s.max_priority}",
                              param="priority", code="invalid_value")
        if key is not None and key.max_priority is not None and body.priority > key.max_priority:
            raise oa.ApiError(403, f"priority is {body.priority}; key {key.name!r} may use at most {key.max_priority}",
                              param="priority", code="priority_not_allowed", kind="permission_error")
        if body.experts and len(body.experts) > s.max_experts:
            raise oa.ApiError(400, f"experts: {len(body.experts)} named; a job may mix at most {s.max_experts} "
                                   "(jobs.max_experts)", param="experts", code="invalid_value")
        self.path.check(body)
        prompt = self.path.prompt(body)
        if body.experts:
            unknown = [e for e in body.experts if e != "base" and e not in self.installed]
            if unknown:
                raise oa.ApiError(404, f"no expert named {unknown[0]!r}; see GET /v1/experts", param="experts",
                                  code="model_not_found")
            whole = [e for e in body.experts if e in self.whole_models]
            if whole and len(body.experts) > 1:
                raise oa.ApiError(400, f"experts: {whole[0]!r} is a whole model, which decodes a job alone (its "
                                       "vocabulary is its own); name it alone, or mix adapter experts only",
                                  param="experts", code="invalid_value")
            experts, text = {e: 1.0 / len(body.experts) for e in body.experts}, prompt.text
        else:
            plan = self.path.plan(self._plan(), body.model, prompt, ImoeOptions(mode=body.mode, fusion="mixture"))
            experts, text = plan.experts, plan.prompt
        model, experts = decoded_by(experts, self.whole_models)
        if model is not None:
            ids, limit = self._model_prompt(model, text, body.max_tokens, prompt.param)
            stop_ids: list[int] = []   # the expert's own end tokens stop it on the replica
        else:
            ids, limit = self.path.encode(text, body.max_tokens, param=prompt.param)
            stop_ids = list(self.path.stop_ids)
        return JobRecord(agent=agent, priority=body.priority, prompt_ids=ids, experts=experts, model=model,
                         max_tokens=limit,
                         temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                         stop_ids=stop_ids,
                         deadline=None if body.deadline_s is None else time.time() + body.deadline_s)

    def _model_tokenizer(self, name: str):
        if name not in self._model_tokenizers:
            from transformers import AutoTokenizer

            self._model_tokenizers[name] = AutoTokenizer.from_pretrained(self.whole_models[name])
        return self._model_tokenizers[name]

    def _model_prompt(self, name: str, text: str, asked: int | None, param: str) -> tuple[list[int], int]:
        """A whole-model job's prompt ids in the expert's own vocabulary and its completion length,
        within that model's context."""
        from imoe_ray.serving.model_experts import prompt_ids

        tokenizer = self._model_tokenizer(name)
        config = json.loads((self.whole_models[name] / "config.json").read_text())
        context = int(config.get("max_position_embeddings") or config.get("n_positions") or 2048)
        ids = prompt_ids(tokenizer, text)
        limit = asked or min(self.settings.max_tokens, max(1, context - len(ids)))
        if len(ids) + limit > context:
            raise oa.ApiError(400, f"{name}'s maximum context length is {context} tokens. However, you requested "
                                   f"{len(ids) + limit} tokens ({len(ids)} in the prompt, {limit} for the completion). "
                                   "Please reduce the prompt or max_tokens.", param=param, code="context_length_exceeded")
        return ids, limit

    def _decode(self, record: JobRecord) -> str:
        if record.model is None:
            return self.tokenizer.decode(record.generated)
        return self._model_tokenizer(record.model).decode(record.generated, skip_special_tokens=True)

    def _plan(self):
        if self._planner is None:
            from imoe_ray.routing.stage import load_router
            from imoe_ray.serving.pipeline import Planner
            from imoe_ray.store import Store

            cfg = self.cfg
            self._planner = Planner(load_router(Store(self.store_dir), cfg), sorted(self.installed), cfg.serve.mode,
                                    cfg.serve.top_k or cfg.experts.top_k)
        return self._planner

    # ---- the slots ----
    def _schedule(self) -> None:
        """Wake the workers; start an urgent job in an extra slot when it outranks a running one."""
        if self.stopping:
            return
        urgent = self.core.urgent()
        if urgent is not None:
            task = asyncio.create_task(self._run(urgent))
            self._extra.add(task)
            task.add_done_callback(self._extra.discard)
        self.wake.set()
        self._gauges()

    async def _worker(self) -> None:
        while True:
            record = self.core.take()
            if record is None:
                self.wake.clear()
                record = self.core.take()
            if record is None:
                try:
                    await asyncio.wait_for(self.wake.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass
                continue
            await self._run(record)

    async def _run(self, record: JobRecord) -> None:
        self.queued_ms.observe(record.telemetry.queued_ms)
        self._gauges()
        try:
            while True:
                step = 1 if not record.generated else self.settings.step_tokens  # the first token comes fast
                out = await self._step(step_request(record, step))
                outcome = self.core.stepped(record, out["tokens"], out["finish_reason"])
                if outcome == "preempted":
                    self.preemptions.inc()
                if outcome != "continue":
                    if record.state in ("succeeded", "failed"):  # cancellations are counted by cancel()
                        self.finished.inc(tags={"state": record.state})
                    return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bad expert, an unexpected error: the job fails, the queue goes on
            log.warning("job %s failed: %r", record.id, e)
            self.core.failed(record, f"{type(e).__name__}: {e}")
            self.finished.inc(tags={"state": "failed"})
        finally:
            self._schedule()

    async def _step(self, request: GenerationRequest | ModelRequest) -> dict:
        """One generation step on the expert replicas, on the request path's retry policy: sent again
        while a dead replica is replaced (nothing of a failed step was kept, so nothing is duplicated),
        waiting its turn while the replicas' queues are full; the whole step within `jobs.step_timeout_s`."""
        async def whole() -> dict:
            if isinstance(request, ModelRequest):
                return await self._model_step(request)
            parts = experts_call(lambda: one_part(self.experts.generate.remote(request)), self.cfg.serve.retry_s,
                                 on_backpressure="wait")
            return [part async for part in parts][-1]

        try:
            return await asyncio.wait_for(whole(), self.settings.step_timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError(f"a generation step took longer than {self.settings.step_timeout_s} s "
                               "(jobs.step_timeout_s)") from None

    async def _model_step(self, request: ModelRequest) -> dict:
        """A whole-model job's step on the replicas' whole-model pool, on the same retry policy."""
        async def call():
            yield await self.experts.generate_model.remote(request)

        out = [part async for part in experts_call(call, self.cfg.serve.retry_s, on_backpressure="wait")][-1]
        if isinstance(out, ModelRefusal):
            raise RuntimeError(f"{request.name}: {out.error}")
        return {"tokens": out.tokens, "finish_reason": out.finish_reason}

    def _gauges(self) -> None:
        waiting: dict[int, int] = {}
        for r in self.core.waiting():
            waiting[r.priority] = waiting.get(r.priority, 0) + 1
        for priority in set(waiting) | self._seen_priorities():
            self.depth.set(waiting.get(priority, 0), tags={"priority": str(priority)})
        self.running.set(len(self.core.running()))

    def _seen_priorities(self) -> set[int]:
        seen = getattr(self, "_priorities", set())
        seen |= {r.priority for r in self.core.jobs.values() if not r.finished}
        self._priorities = seen
        return seen


# ---- the routes on the Router ingress (plain functions: they reach the JobQueue by its handle) ----
_handle: dict[str, DeploymentHandle] = {}


def _jobs() -> DeploymentHandle:
    if "h" not in _handle:
        _handle["h"] = serve.get_deployment_handle("JobQueue", serve.get_replica_context().app_name)
    return _handle["h"]


def _not_found(job_id: str) -> oa.ApiError:
    return oa.ApiError(404, f"no job {job_id!r}", param="id", code="job_not_found")


def _found(view: dict | None, job_id: str) -> dict:
    """The JobQueue's answer about a job, or a 404 when it has no such job."""
    if view is None:
        raise _not_found(job_id)
    return view


def add_job_routes(api: FastAPI) -> None:
    """POST/GET /v1/jobs, GET/DELETE /v1/jobs/{id}, GET /v1/jobs/{id}/events (server-sent events)."""

    @api.post("/v1/jobs")
    async def submit_job(body: JobRequest, request: Request,
                         idempotency_key: str | None = Header(None, max_length=256)) -> dict:
        out = await _jobs().submit.remote(body.model_dump(mode="json", exclude_unset=True), _key(request),
                                          idempotency_key)
        if "error" in out:
            e = out["error"]["error"]
            raise oa.ApiError(out["status"], e["message"], param=e["param"], code=e["code"], kind=e["type"])
        return out

    @api.get("/v1/jobs")
    async def list_jobs(request: Request, agent: str | None = None, state: str | None = None) -> dict:
        return {"object": "list", "data": await _jobs().list.remote(agent, state, _key(request))}

    @api.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str, request: Request) -> dict:
        return _found(await _jobs().get.remote(job_id, _key(request)), job_id)

    @api.delete("/v1/jobs/{job_id}")
    async def cancel_job(job_id: str, request: Request) -> dict:
        return _found(await _jobs().cancel.remote(job_id, _key(request)), job_id)

    @api.get("/v1/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request):
        key = _key(request)
        first = await _jobs().get.remote(job_id, key)
        if first is None:
            raise _not_found(job_id)
        return StreamingResponse(_events(job_id, first, key), media_type="text/event-stream")


def _key(request: Request) -> ApiKey | None:
    return caller_of(request).key


async def _events(job_id: str, view: dict, key: ApiKey | None, every_s: float = 0.05) -> AsyncIterator[str]:
    """An event whenever the job's state or token count changes; the last one is its final state."""
    last = None
    while True:
        seen = (view["state"], view["tokens"])
        if seen != last:
            last = seen
            yield f"event: {view['state']}\ndata: {json.dumps(view)}\n\n"
        if view["state"] in FINISHED:
            yield "data: [DONE]\n\n"
            return
        await asyncio.sleep(every_s)
        view = await _jobs().get.remote(job_id, key) or view
