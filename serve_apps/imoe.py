"""The IMoE-Ray Serve application: a router ingress (OpenAI-compatible HTTP) over autoscaled
expert replicas that hold the base model and load LoRA experts on demand.

    serve run serve_apps.imoe:app store=DIR [config=FILE] [set=serve.port=8001,serve.mode=fast]
    serve deploy serve_apps/serve_config.yaml      # edit its args (store=...) first; on a running cluster
    imoe serve --store DIR --write-config my.yaml && serve deploy my.yaml   # the same, written for a store

`serve build` cannot make this config: it passes no arguments to an application builder (Ray 2.60
rejects a builder function: "Expected 'serve_apps.imoe:app' to be an Application"); a deploy
config instead names the builder and its `args`, which the cluster passes to it.

    HTTP ─> Router (FastAPI ingress: validate, route, retrieve, compress, plan)
              └─> Experts replicas (autoscaled; an LRU of at most serve.max_loaded_experts adapters;
                  @serve.batch + continuous decoding of mixed-adapter batches) ─> tokens ─> fusion ─> OpenAI-shaped response

The deployments are thin: the work is in `imoe_ray.serving` (plain Python).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import AsyncIterator

import ray
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from ray.util import metrics

from imoe_ray.config import Config, store_config
from imoe_ray.fusion.clarify import ClarifySettings
from imoe_ray.fusion.fuser import Fuser
from imoe_ray.serving import openai_api as oa
from imoe_ray.serving.batcher import ContinuousBatcher, Ticket
from imoe_ray.serving.auth import Authenticate, Caller, KeyRing, caller_of, check_keys_in_this_process
from imoe_ray.serving.generation import GenerationRequest
from imoe_ray.serving.limits import (BodyLimit, TokenBudget, check_prompt_tokens, check_request, internal_error,
                                     limit_bodies_in_this_process)
from imoe_ray.serving.lora_bank import BASE
from imoe_ray.packaging.hot import ExpertsWatcher
from imoe_ray.serving.model import ServingModel, installed_experts, stop_token_ids
from imoe_ray.serving.pipeline import SUMMARIZER, Plan, Planner, chat_prompt, cut_at_stop
from imoe_ray.store import Store
from imoe_ray.store.layout import EXPERTS_INDEX
from imoe_ray.store.mirror import StoreMirror
from imoe_ray.store.store import is_uri
from serve_apps.job_queue import JobQueue, add_job_routes

log = logging.getLogger("ray.serve")
STREAM_EVERY_S = 0.03          # how often a streaming request is handed its new tokens
_REPLICA_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


# ---- expert replicas -------------------------------------------------------------------------
def _rows(requests: list[GenerationRequest]) -> int:
    return sum(len(r.experts) for r in requests)


@serve.deployment(name="Experts")
class Experts:
    """The base model and a bank of resident experts, decoded with continuous batching: a request
    joins the batch already decoding at its next step (`imoe_ray.serving.batcher`), whatever its
    expert, so a short or urgent request never waits for a long batch to end. Arrivals at the same
    moment are taken in together by `@serve.batch` and prefilled in one forward pass."""

    def __init__(self, store: str, config: dict):
        full = Config.model_validate(config)
        cfg = full.serve
        self.capacity = cfg.max_loaded_experts
        self.mirror = StoreMirror(store, full.cache_dir)  # the store itself, or this node's copy of a URI store
        # the bank's own LRU holds at most `max_loaded_experts` adapters; a request mixing more decodes
        # pass by pass within it (strict mode, `serve.max_loaded_experts: 1`)
        self.model = ServingModel(self.mirror.root, capacity=cfg.max_loaded_experts,
                                  threads=cfg.threads or _replica_cpus())
        self.model.bank.on_evict = lambda name: self.evictions.inc(tags={"expert": name})
        self._enqueue.set_max_batch_size(cfg.max_batch_size)
        self._enqueue.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self.batcher = ContinuousBatcher(self.model.decode_batch(), max_rows=cfg.max_batch_size,
                                         capacity=cfg.max_loaded_experts, load=self._load)
        self.loads = metrics.Counter("imoe_adapter_loads", "adapters loaded into a replica", tag_keys=("expert",))
        self.evictions = metrics.Counter("imoe_adapter_evictions", "adapters evicted from a replica",
                                         tag_keys=("expert",))
        self.load_ms = metrics.Histogram("imoe_adapter_load_ms", "adapter load latency (ms)",
                                         boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000])
        self.batch_rows = metrics.Histogram("imoe_batch_rows", "rows decoded together", boundaries=[1, 2, 4, 8, 16, 32, 64])
        self.queue = metrics.Gauge("imoe_queue_depth", "requests waiting or running", tag_keys=("deployment",))
        self.pending = 0

    async def _load(self, name: str) -> None:
        await asyncio.to_thread(self.mirror.refresh)  # an expert installed or replaced in the store since
        ms = await asyncio.to_thread(self.model.ensure, name)
        if ms:
            self.loads.inc(tags={"expert": name})
            self.load_ms.observe(ms)

    async def surprisal(self, texts: list[str]) -> list[tuple[list[tuple[int, int]], list[float]]]:
        """Per text: token offsets and each token's surprisal under this replica's base model (the
        Router's selective compressor scores with it instead of holding a second copy)."""
        out = await asyncio.to_thread(lambda: self.scorer().surprisal(texts))
        return [(offsets, values.tolist()) for offsets, values in out]

    def scorer(self):
        from imoe_ray.compression.selective import SelectiveCompressor

        if getattr(self, "_scorer", None) is None:
            self._scorer = SelectiveCompressor(self.model.root / "base", model=self.model.model,
                                               tokenizer=self.model.tokenizer, guard=self.model.bank.use)
        return self._scorer

    async def generate(self, job: dict) -> dict:
        """One request decoded to the end: {"tokens", "finish_reason", "load_ms", "generate_ms", "batch_rows"}."""
        return [part async for part in self._parts(job, every_s=None)][-1]  # one part: the whole answer

    async def stream(self, job: dict) -> AsyncIterator[dict]:
        """The same as a stream of parts, new tokens every ~30 ms (called with stream=True)."""
        async for part in self._parts(job, every_s=STREAM_EVERY_S):
            yield part

    async def _parts(self, job: dict, every_s: float | None) -> AsyncIterator[dict]:
        self._pending(+1)
        try:
            ticket = await self._enqueue(GenerationRequest(**job["request"]))
            async for part in self.batcher.parts(ticket, every_s):
                if part.finish_reason is not None:
                    self.batch_rows.observe(part.batch_rows)
                yield {"tokens": part.tokens, "finish_reason": part.finish_reason, "load_ms": part.load_ms,
                       "generate_ms": part.generate_ms, "queued_ms": part.queued_ms, "batch_rows": part.batch_rows,
                       "logprobs": part.logprobs}
        finally:
            self._pending(-1)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0, batch_size_fn=_rows)
    async def _enqueue(self, requests: list[GenerationRequest]) -> list[Ticket]:
        """Requests that arrived together join the decoding batch together (one prefill pass)."""
        return [self.batcher.submit(r) for r in requests]

    def _pending(self, delta: int) -> None:
        self.pending += delta
        self.queue.set(self.pending, tags={"deployment": "Experts"})

    def resident(self) -> list[str]:
        return list(self.model.bank.resident)


def _replica_cpus() -> int:
    try:
        return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    except Exception:
        return 1


# ---- the router ingress ----------------------------------------------------------------------
api = FastAPI(title="IMoE-Ray", description="A served mixture of independently trained experts (OpenAI-compatible).")


api.add_middleware(BodyLimit, max_bytes=Config().serve.max_body_bytes)  # the Router sets its config's
api.add_middleware(Authenticate)  # outermost: an unknown caller is refused before its body is read


@api.exception_handler(oa.ApiError)
async def _api_error(request: Request, exc: oa.ApiError) -> JSONResponse:
    return _error_response(exc)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    return _error_response(_as_api_error(exc))


def _error_response(error: oa.ApiError) -> JSONResponse:
    retry = {"Retry-After": "1"} if error.status in (429, 503) else None
    return JSONResponse(error.body(), status_code=error.status, headers=retry)


def _as_api_error(exc: BaseException) -> oa.ApiError:
    """Any failure as an OpenAI-shaped error: a dead replica is a 503 to retry, a full queue a 429,
    anything else a 500 with a request id (its stack trace goes to the log, not to the client)."""
    if isinstance(exc, oa.ApiError):
        return exc
    if isinstance(exc, BackPressureError):
        return oa.ApiError(429, "the server is at capacity; retry shortly", code="rate_limit_exceeded",
                           kind="rate_limit_error")
    if isinstance(exc, _REPLICA_GONE):
        return oa.ApiError(503, f"an expert replica is unavailable ({type(exc).__name__}); retry",
                           code="replica_unavailable")
    return internal_error(exc)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    if first.get("type") == "json_invalid":
        message, where = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": "), None
    else:
        message = f"{where or 'body'}: {first.get('msg', 'invalid request')}"
    return JSONResponse(oa.ApiError(400, message, param=where or None, code="invalid_request").body(), status_code=400)


# Defined before the ingress: `serve.ingress` serializes the FastAPI app when the class is defined.
async def _once(part: dict) -> AsyncIterator[dict]:
    yield part


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


add_job_routes(api)  # /v1/jobs: forwarded to the JobQueue deployment (serve_apps/job_queue.py)

# The web console: static files shipped with this package (no build step, nothing from a CDN).
CONSOLE_FILES = {"index.html": "text/html", "console.js": "text/javascript", "console.css": "text/css"}


@api.get("/", include_in_schema=False)
async def console_page() -> Response:
    return _console_file("index.html")


@api.get("/console/{name}", include_in_schema=False)
async def console_asset(name: str) -> Response:
    if name not in CONSOLE_FILES:
        raise oa.ApiError(404, f"no console file {name!r}", code="not_found")
    return _console_file(name)


def _console_file(name: str) -> Response:
    from importlib.resources import files

    return Response((files("serve_apps") / "console" / name).read_bytes(), media_type=CONSOLE_FILES[name],
                    headers={"Cache-Control": "no-cache"})


def _caller(request: Request) -> Caller:
    """Who sent a request: its API key (set by the `Authenticate` middleware), or the client address
    on a server without keys. A FastAPI dependency; `Request` is named in the body too, so that the
    deployment class, pickled by value with the globals its code uses, still resolves the annotation."""
    return caller_of(request) if isinstance(request, Request) else Caller(None)


@serve.deployment(name="Router")
@serve.ingress(api)
class Router:
    def __init__(self, experts: DeploymentHandle, store: str, config: dict, jobs: DeploymentHandle | None = None):
        from transformers import AutoTokenizer

        from imoe_ray.routing.stage import load_router
        from imoe_ray.store import Store

        cfg = Config.model_validate(config)
        self.settings = cfg.serve
        limit_bodies_in_this_process(cfg.serve.max_body_bytes)     # the BodyLimit and Authenticate middlewares
        check_keys_in_this_process(KeyRing(Store(store, create=False)))
        self.mirror = StoreMirror(store, cfg.cache_dir)
        self.store = self.mirror.root  # files read by path: the store, or this node's copy of a URI store
        self.experts = experts
        self._stream_handle = experts.stream.options(stream=True)
        self.tokenizer = AutoTokenizer.from_pretrained(self.store / "base")
        self.context = int(json.loads((self.store / "base" / "config.json").read_text()).get("max_position_embeddings", 2048))
        self.budget = TokenBudget(self.context, cfg.serve.max_tokens, cfg.serve.max_tokens_limit)
        self.installed = installed_experts(self.store)
        from imoe_ray.retrieval.serving import build_components

        self.stop_ids = stop_token_ids(self.store / "base", self.tokenizer)
        self.embedding = cfg.embedding
        self._encoders: dict[str, object] = {}

        def scorer(texts: list[str]):  # the selective compressor's LM: the expert replicas' base, not a copy here
            return experts.surprisal.remote(texts).result()

        retriever, compressor, self.learner = build_components(store, cfg, threads=None, scorer=scorer,
                                                               local_root=self.store)
        self.planner = Planner(load_router(Store(store), cfg), list(self.installed), self.settings.mode,
                               self.settings.top_k or cfg.experts.top_k, retriever, compressor,
                               cfg.retrieval.k, max(16, min(256, self.context // 4)), ClarifySettings.from_config(cfg.serve))
        self.fuser = Fuser(cfg.fusion, ClarifySettings.from_config(cfg.serve), self.tokenizer, self.stop_ids)
        self._learning: set[asyncio.Task] = set()
        self._watch = ExpertsWatcher(self.store)  # experts installed or removed while running join / drain
        self.requests = metrics.Counter("imoe_requests", "requests per expert", tag_keys=("expert", "mode"))
        self.route_ms = metrics.Histogram("imoe_routing_latency_ms", "routing latency (ms)",
                                          boundaries=[0.1, 0.5, 1, 2, 5, 10, 20, 50, 100, 200])
        self.queue = metrics.Gauge("imoe_queue_depth", "requests waiting or running", tag_keys=("deployment",))
        self.ttft_ms = metrics.Histogram("imoe_ttft_ms", "time to first token on the HTTP path (ms)", tag_keys=("mode",),
                                         boundaries=[10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000])
        self.tokens_per_s = metrics.Histogram("imoe_tokens_per_s", "completion tokens per second of decoding, per request",
                                              boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000])
        self.tokens = metrics.Counter("imoe_completion_tokens", "completion tokens, per expert that took part",
                                      tag_keys=("expert",))
        self.in_flight = 0

    # ---- endpoints ----
    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "experts": len(self.installed), "mode": self.settings.mode}

    @api.get("/v1/experts")
    async def list_experts(self) -> dict:
        self._refresh()
        index = json.loads((self.store / "experts" / "index.json").read_text())
        rows = []
        for e in index["experts"]:
            manifest = _read_json(self.store / "experts" / e["name"] / "manifest.json")
            rows.append({"name": e["name"], "categories": e.get("categories", [e["name"]]), "rows": e.get("rows"),
                         "keywords": manifest.get("routing", {}).get("keywords", []),
                         "adapter": manifest.get("adapter", {}), "training": manifest.get("training", {})})
        extra = [n for n in self.installed if n not in {r["name"] for r in rows}]
        return {"object": "list", "data": rows, "other_adapters": extra, "aliases": index.get("aliases", {})}

    @api.get("/v1/models")
    async def list_models(self) -> dict:
        self._refresh()
        return {"object": "list", "data": self._models()}

    @api.get("/v1/models/{model_id:path}")
    async def get_model(self, model_id: str) -> dict:
        self._refresh()
        for m in self._models():
            if m["id"] == model_id:
                return m
        raise oa.ApiError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")

    def _models(self) -> list[dict]:
        """vLLM's model cards: `root` the base model, `parent` what an adapter is trained on, the context
        length; embedding models carry "task": "embed"."""
        created = int(self.store.joinpath("experts", "index.json").stat().st_mtime) \
            if self.store.joinpath("experts", "index.json").exists() else 0
        root = str(self.store / "base")
        cards = [{"id": m, "object": "model", "created": created, "owned_by": "imoe-ray", "root": root,
                  "parent": None if m in (oa.ROUTED_MODEL, BASE) else BASE, "max_model_len": self.context,
                  "task": "generate"} for m in self.planner.models()]
        cards += [{"id": m, "object": "model", "created": created, "owned_by": "imoe-ray", "root": path,
                   "parent": None, "max_model_len": None, "task": "embed"} for m, path in self._embedding_models().items()
                  if m != oa.ROUTED_MODEL]
        return cards

    def _embedding_models(self) -> dict[str, str]:
        """Names `/v1/embeddings` takes → encoder: "imoe" and the encoder's own name (the store's
        encoder), "imoe-moe" (the sparse-MoE encoder, when the store has one)."""
        out = {oa.ROUTED_MODEL: self.embedding.encoder, self.embedding.encoder: self.embedding.encoder}
        moe = self.store / "encoders" / "moe"
        if moe.is_dir():
            out[oa.ROUTED_MODEL + "-moe"] = str(moe)
        return out

    @api.post("/v1/embeddings")
    async def embeddings(self, body: oa.EmbeddingRequest) -> dict:
        import base64

        models = self._embedding_models()
        if body.model not in models:
            raise oa.ApiError(404, f"The model `{body.model}` does not exist; embedding models: {', '.join(models)}",
                              param="model", code="model_not_found")
        encoder = await asyncio.to_thread(self._encoder, models[body.model])
        if body.dimensions is not None and body.dimensions != encoder.dim:
            raise oa.ApiError(400, f"dimensions: this encoder gives {encoder.dim}-dimensional vectors",
                              param="dimensions", code="invalid_value")
        vectors = await asyncio.to_thread(encoder.encode, body.input)
        tokens = sum(len(ids) for ids in encoder.tokenizer(body.input, truncation=True,
                                                           max_length=encoder.max_tokens)["input_ids"])
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if body.encoding_format == "base64"
                 else v.astype(float).tolist()} for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": body.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def _encoder(self, name: str):
        from imoe_ray.embedding.encoder import Encoder

        if name not in self._encoders:
            self._encoders[name] = Encoder(name, max_tokens=self.embedding.max_tokens, device="cpu")
        return self._encoders[name]

    @api.post("/v1/route")
    async def route(self, body: oa.RouteRequest) -> dict:
        self._refresh()
        route = await asyncio.to_thread(self.planner.route, body.text, body.mode or self.settings.mode)
        self.route_ms.observe(route.latency_ms)
        return route.to_json()

    @api.post("/v1/chat/completions")
    async def chat(self, body: oa.ChatRequest, caller: Caller = Depends(_caller)):
        check_request(body, self.settings)
        self._admit()
        try:  # the chat template and the tokenizer run off the event loop: streams go on meanwhile
            prompt, query = await asyncio.to_thread(chat_prompt, body.messages, self.tokenizer)
        except ValueError as e:
            self._queue(-1)
            raise oa.ApiError(400, str(e), param="messages") from None
        except BaseException:
            self._queue(-1)
            raise
        return await self._complete(body, prompt, query, chat=True, caller=caller)

    @api.post("/v1/completions")
    async def completions(self, body: oa.CompletionRequest, caller: Caller = Depends(_caller)):
        check_request(body, self.settings)
        self._admit()
        return await self._complete(body, body.prompt, body.prompt, chat=False, caller=caller)

    # ---- the pipeline ----
    async def _complete(self, body, prompt: str, query: str, chat: bool, caller: Caller):
        """An admitted request (counted in flight by `_admit`) to its answer, or to its stream (which
        ends the count when it ends)."""
        arrived = time.perf_counter()
        try:
            self._refresh()
            prompt_tokens = await asyncio.to_thread(self._count_tokens, prompt)
            check_prompt_tokens(prompt_tokens, self.context, "messages" if chat else "prompt")
            plan = await asyncio.to_thread(self.planner.plan, body.model, query, prompt, body.imoe)
            if plan.fusion != SUMMARIZER and len(plan.experts) > self.settings.max_batch_size:
                raise oa.ApiError(400, f"this request mixes {len(plan.experts)} experts, one batch row each; the "
                                       f"server decodes at most {self.settings.max_batch_size} rows together "
                                       f"(serve.max_batch_size): ask for a smaller imoe.top_k",
                                  param="imoe.top_k", code="invalid_value")
        except BaseException:
            self._queue(-1)
            raise
        self.route_ms.observe(plan.timings_ms["route"])
        for expert in plan.experts:
            self.requests.inc(tags={"expert": expert, "mode": plan.mode})
        if body.stream:
            return StreamingResponse(self._stream(body, plan, chat, query, caller, arrived),
                                     media_type="text/event-stream")
        try:
            text, finish, prompt_tokens, completion_tokens, logprobs = await self._answer(body, plan)
        finally:
            self._queue(-1)
        plan.server_ms = (time.perf_counter() - arrived) * 1000
        self._observe(plan, completion_tokens, first_token_ms=plan.server_ms)
        asked = body.logprob_count()
        if chat:
            response = oa.chat_response(body.model, text, finish, prompt_tokens, completion_tokens, plan.imoe(),
                                        oa.chat_logprobs(logprobs, self._token_text) if asked is not None else None)
        else:
            echo = query if body.echo else ""
            response = oa.completion_response(
                body.model, echo + text, finish, prompt_tokens, completion_tokens, plan.imoe(),
                oa.completion_logprobs(logprobs, self._token_text) if asked is not None else None)
        self._learn(query, text, plan, response["id"], caller)
        return response

    def _refresh(self) -> None:
        self.mirror.refresh()
        installed = self._watch.refresh(self.planner)
        if installed is not None:
            self.installed = installed

    def _learn(self, question: str, answer: str, plan: Plan, request_id: str, caller: Caller) -> None:
        """Learning from answers (`optimized`): queued in the background, after the response, with the
        caller's identity (its API key's name, or its address on a server without keys); never for a
        key created with --no-learn."""
        experts = [e for e in plan.experts if e not in (BASE, SUMMARIZER)]
        if self.learner is None or plan.mode != "optimized" or not experts or not answer.strip() or not caller.learn \
                or plan.clarification:  # a clarifying question is no answer to learn
            return
        task = asyncio.create_task(asyncio.to_thread(self.learner.learn, question, answer, experts, request_id,
                                                     caller.name))
        self._learning.add(task)
        task.add_done_callback(lambda t: self._learning.discard(t) or (
            not t.cancelled() and t.exception() and log.warning("learning from request %s failed: %r", request_id,
                                                                t.exception())))

    async def _answer(self, body, plan: Plan) -> tuple[str, str, int, int]:
        if plan.fusion == SUMMARIZER or plan.clarification:
            return await self._summarize(body, plan)
        ids, limit = await asyncio.to_thread(self._tokens, plan.prompt, body)
        tokens, finish, logprobs = [], "length", []
        async for part in self._generate(plan, ids, limit, body, stream=False):
            tokens += part["tokens"]
            logprobs += part.get("logprobs", [])
            finish = part["finish_reason"] or finish
        text, kept, finish = self._returned(tokens, finish, body.stop)
        return text, finish, len(ids), kept, logprobs[:kept]

    def _returned(self, tokens: list[int], finish: str, stops: list[str]) -> tuple[str, int, str]:
        """The text up to the first stop string, how many tokens it took (the token a stop string
        begins in counts when part of it is returned), and the OpenAI finish reason."""
        full = self.tokenizer.decode(tokens)
        text, stopped = cut_at_stop(full, stops)
        if not stopped:
            return text, len(tokens), "stop" if finish == "stop_string" else finish
        kept = next(n for n in range(len(tokens) + 1) if len(self.tokenizer.decode(tokens[:n])) >= len(text))
        return text, kept, "stop"

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    async def _summarize(self, body, plan: Plan) -> tuple[str, str, int, int]:
        """Each expert drafts (the drafts decode in one batch), then the summarizer grounds them in one answer
        (`imoe_ray.fusion.fuser`: plan and copy, or a clarifying question)."""
        if len(plan.experts) > self.settings.max_batch_size:
            raise oa.ApiError(400, f"this request drafts with {len(plan.experts)} experts; the server takes at most "
                                   f"{self.settings.max_batch_size} (serve.max_batch_size): ask for a smaller imoe.top_k",
                              param="imoe.top_k", code="invalid_value")
        ids, limit = await asyncio.to_thread(self._tokens, plan.prompt, body)
        if not plan.clarification:  # not a near tie on a short query (the planner's rule): the experts draft
            drafts = await asyncio.gather(*[self._draft(name, ids, limit, body, plan) for name in plan.experts])
            started = time.perf_counter()
            fusion = self.fuser.prepare(plan.prompt, list(zip(plan.experts, drafts)), plan.clarify)
            plan.clarification = fusion.clarification.to_json() if fusion.clarification else None  # drafts disagree
        if plan.clarification:  # the answer is the clarifying question
            question = plan.clarification["question"]
            return question, "stop", len(ids), self._count_tokens(question) - 1, []
        fused_ids, fused_limit = await asyncio.to_thread(self._tokens, fusion.prompt, body, True)
        single = Plan(plan.model, plan.mode, fusion.prompt, {SUMMARIZER: 1.0}, timings_ms=plan.timings_ms)
        tokens, finish = [], "length"
        async for part in self._generate(single, fused_ids, min(fused_limit, fusion.max_new_tokens or fused_limit), body,
                                         stream=False, timing="fuse", steer=fusion.steer):
            tokens += part["tokens"]
            finish = part["finish_reason"] or finish
        plan.timings_ms["fuse"] = (time.perf_counter() - started) * 1000
        text, kept, finish = self._returned(tokens, finish, body.stop)
        return fusion.finish(text), finish, len(ids), kept, []

    async def _draft(self, name: str, ids: list[int], limit: int, body, plan: Plan) -> str:
        one = Plan(plan.model, plan.mode, plan.prompt, {name: 1.0}, timings_ms=plan.timings_ms)
        tokens, finish = [], "length"
        async for part in self._generate(one, ids, limit, body, stream=False):
            tokens += part["tokens"]
            finish = part["finish_reason"] or finish
        return self._returned(tokens, finish, body.stop)[0]

    async def _stream(self, body, plan: Plan, chat: bool, query: str, caller: Caller,
                      arrived: float) -> AsyncIterator[str]:
        chunk_id = oa.new_id("chatcmpl" if chat else "cmpl")
        first_token_ms = None
        make = oa.chat_chunk if chat else oa.completion_chunk
        try:
            if plan.fusion == SUMMARIZER or plan.clarification:  # the fused answer exists only at the end
                text, finish, prompt_tokens, kept, _ = await self._summarize(body, plan)
                self._observe(plan, kept, first_token_ms=(time.perf_counter() - arrived) * 1000)
                first = {"role": "assistant", "content": text} if chat else text
                yield _sse(make(chunk_id, body.model, first, None, imoe=plan.imoe()))
                yield _sse(make(chunk_id, body.model, {} if chat else "", finish, imoe=plan.imoe()))
                if body.include_usage():
                    yield _sse(oa.usage_chunk(chunk_id, body.model, chat, prompt_tokens, kept))
                yield "data: [DONE]\n\n"
                self._learn(query, text, plan, chunk_id, caller)
                return
            ids, limit = await asyncio.to_thread(self._tokens, plan.prompt, body)
            if chat:
                yield _sse(make(chunk_id, body.model, {"role": "assistant", "content": ""}, imoe=plan.imoe()))
            elif body.echo:
                yield _sse(make(chunk_id, body.model, query))
            tokens, sent, finish, logprobs, sent_logprobs = [], "", "length", [], 0
            asked = body.logprob_count()
            async for part in self._generate(plan, ids, limit, body, stream=True):
                tokens += part["tokens"]
                logprobs += part.get("logprobs", [])
                finish = part["finish_reason"] or finish
                text, stopped = cut_at_stop(self.tokenizer.decode(tokens), body.stop)
                if text.endswith("\ufffd") and not part["finish_reason"] and not stopped:
                    continue  # half of a multi-byte character: wait for the rest
                if len(text) > len(sent):
                    delta = text[len(sent):]
                    extra = {}
                    if asked is not None:
                        _, kept, _ = self._returned(tokens, finish, body.stop)
                        new = logprobs[sent_logprobs:kept]
                        sent_logprobs = kept
                        extra = {"logprobs": oa.chat_logprobs(new, self._token_text) if chat
                                 else oa.completion_logprobs(new, self._token_text, len(sent))}
                    sent = text
                    if first_token_ms is None:
                        first_token_ms = (time.perf_counter() - arrived) * 1000
                    chunk = make(chunk_id, body.model, {"content": delta} if chat else delta)
                    chunk["choices"][0].update(extra)
                    yield _sse(chunk)
                if stopped:
                    break
            _, kept, finish = self._returned(tokens, finish, body.stop)
            self._observe(plan, kept, first_token_ms)
            yield _sse(make(chunk_id, body.model, {} if chat else "", finish, imoe=plan.imoe()))
            if body.include_usage():
                yield _sse(oa.usage_chunk(chunk_id, body.model, chat, len(ids), kept))
            yield "data: [DONE]\n\n"
            self._learn(query, sent, plan, chunk_id, caller)  # what the client received, once it has all of it
        except Exception as e:  # after the first byte the status is sent: an error event, then the end
            yield _sse(_as_api_error(e).body())
            yield "data: [DONE]\n\n"
        finally:
            self._queue(-1)

    async def _generate(self, plan: Plan, ids: list[int], limit: int, body, stream: bool,
                        timing: str = "generate", steer=None) -> AsyncIterator[dict]:
        """The expert replicas' token stream for one request; retried on another replica while a dead
        one is replaced, as long as nothing was handed to the client yet."""
        job = {"request": {"prompt_ids": ids, "experts": plan.experts, "max_new_tokens": limit,
                           "temperature": body.temperature, "top_p": body.top_p, "stop_ids": self.stop_ids,
                           "seed": body.seed, "stop": tuple(body.stop), "logit_bias": body.logit_bias,
                           "logprobs": body.logprob_count(), "steer": steer},
               "stream": stream}
        deadline = time.monotonic() + self.settings.retry_s
        while True:
            received = False
            try:
                if stream:
                    parts = self._stream_handle.remote(job)
                else:
                    parts = _once(await self.experts.generate.remote(job))
                async for part in parts:
                    received = True
                    plan.timings_ms["load"] = max(plan.timings_ms["load"], part["load_ms"])
                    plan.batch_rows = max(plan.batch_rows, part["batch_rows"])
                    if timing == "generate":
                        plan.timings_ms["generate"] = part["generate_ms"]
                    yield part
                return
            except BackPressureError as e:  # the expert replicas' queues are full: the client retries, at once told so
                raise _as_api_error(e) from None
            except _REPLICA_GONE as e:
                if received or time.monotonic() > deadline:
                    raise oa.ApiError(503, f"an expert replica died during the request: {type(e).__name__}; retry",
                                      code="replica_unavailable") from None
                log.warning("expert replica gone (%s); retrying the request", type(e).__name__)
                plan.retries += 1
                await asyncio.sleep(0.5)

    def _count_tokens(self, text: str) -> int:
        return 1 + len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _tokens(self, prompt: str, body, truncate: bool = False) -> tuple[list[int], int]:
        """The prompt's token ids and the completion length (`limits.TokenBudget`)."""
        return self.budget.encode(self.tokenizer, prompt, body.max_completion_tokens or body.max_tokens, truncate)

    def _observe(self, plan: Plan, completion_tokens: int, first_token_ms: float | None) -> None:
        """The HTTP path's metrics of one answered request (a whole answer's first token is its end)."""
        if first_token_ms is not None:
            self.ttft_ms.observe(first_token_ms, tags={"mode": plan.mode})
        seconds = plan.timings_ms["generate"] / 1000
        if completion_tokens and seconds > 0:
            self.tokens_per_s.observe(completion_tokens / seconds)
        if completion_tokens > 0:  # a Ray counter takes positive increments only
            for expert in plan.experts:
                self.tokens.inc(completion_tokens, tags={"expert": expert})

    def _admit(self) -> None:
        """Backpressure: past `max_ongoing_requests + max_queued_requests` requests in flight, a 429
        now; else the request counts as in flight until its answer or stream ends."""
        bound = self.settings.max_ongoing_requests + self.settings.max_queued_requests
        if self.in_flight >= bound:
            raise oa.ApiError(429, f"the server is at capacity ({bound} requests in flight); retry shortly",
                              code="rate_limit_exceeded", kind="rate_limit_error")
        self._queue(+1)

    def _queue(self, delta: int) -> None:
        self.in_flight += delta
        self.queue.set(self.in_flight, tags={"deployment": "Router"})


# ---- the application -------------------------------------------------------------------------
# No per-request access log lines: at a few ms of CPU per request they are a real share of the
# Serve path's overhead on a small machine (errors and warnings are still logged).
_LOGGING = {"enable_access_log": False}

def _check_servable(store: str) -> None:
    if not is_uri(store):
        installed_experts(store)
    elif not Store(store, create=False).is_file(*EXPERTS_INDEX):
        raise FileNotFoundError(f"{store} has no trained experts (experts/index.json): run "
                                f"`imoe build --store {store} --until experts` first")


def _resources(cfg: Config) -> dict:
    return {"resources": dict(cfg.ray.resources)} if cfg.ray.resources else {}


def build_app(store: str, config: str | None = None, overrides: list[str] | None = None):
    """The bound application for a store (what `serve run`, `serve build` and `imoe serve` deploy)."""
    cfg = store_config(store, config, overrides)
    store_dir = store.rstrip("/") if is_uri(store) else str(Path(store).resolve())
    _check_servable(store_dir)  # a store without experts fails here, with the command that builds them
    s = cfg.serve
    gpus = s.expert_gpus
    if gpus is None:
        gpus = 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    experts = Experts.options(
        ray_actor_options={"num_cpus": s.expert_cpus, "num_gpus": gpus} | _resources(cfg),
        autoscaling_config={"min_replicas": s.min_replicas, "initial_replicas": max(1, s.min_replicas),
                            "max_replicas": s.max_replicas, "target_ongoing_requests": s.target_ongoing_requests,
                            "upscale_delay_s": s.upscale_delay_s, "downscale_delay_s": s.downscale_delay_s},
        max_ongoing_requests=s.max_ongoing_requests, max_queued_requests=s.max_queued_requests,
        graceful_shutdown_wait_loop_s=1.0, graceful_shutdown_timeout_s=10.0, logging_config=_LOGGING,
    ).bind(store_dir, cfg.model_dump(mode="json"))
    # the Router takes in far more than it admits: a request past its own bound gets a JSON 429 at once
    # (`Router._admit`) instead of waiting in the proxy's queue or getting the proxy's plain-text 503
    return Router.options(ray_actor_options={"num_cpus": s.router_cpus} | _resources(cfg),
                          max_ongoing_requests=max(1024, 4 * (s.max_ongoing_requests + s.max_queued_requests)),
                          graceful_shutdown_wait_loop_s=1.0, graceful_shutdown_timeout_s=10.0,
                          logging_config=_LOGGING).bind(
        experts, store_dir, cfg.model_dump(mode="json"),
        jobs=JobQueue.options(ray_actor_options={"num_cpus": 0} | _resources(cfg), logging_config=_LOGGING).bind(
            experts, store_dir, cfg.model_dump(mode="json")))


def app(args: dict[str, str]):
    """Application builder: `serve run serve_apps.imoe:app store=DIR [config=FILE] [set=a.b=1,c.d=2]
    [insecure=true]`. A deployed application answers on every node's address: a store without API keys
    is refused unless `insecure` says it may be open."""
    from imoe_ray.serving.auth import load_keys

    if "store" not in args:
        raise ValueError("serve_apps.imoe:app needs store=DIR (a store built through the experts stage)")
    insecure = str(args.get("insecure", "")).lower() in ("true", "1", "yes")
    if not insecure and not load_keys(Store(args["store"], create=False)).keys:
        raise ValueError(f"serve_apps.imoe:app: {args['store']} has no API keys and a deployed application answers "
                         f"on every node's address: create one (imoe api-keys create NAME --store {args['store']}) "
                         "or set args.insecure: true")
    overrides = [o for o in str(args.get("set", "")).split(",") if o.strip()]
    return build_app(args["store"], args.get("config"), overrides)


def start(store: str, config: str | None = None, overrides: list[str] | None = None, port: int | None = None,
          host: str | None = None, ready_timeout_s: float = 600.0) -> str:
    """Start Serve on this Ray cluster with the application, wait until GET /healthz answers 200,
    and return the API's base URL (`imoe serve` and `imoe quickstart` use it)."""
    import requests

    cfg = store_config(store, config, overrides)
    host, port = host or cfg.serve.host, port or cfg.serve.port
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": cfg.serve.request_timeout_s})
    serve.run(build_app(store, config, overrides), name="imoe", route_prefix="/", blocking=False)
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{base}/healthz", timeout=5).status_code == 200:
                return f"{base}/v1"
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the application did not answer {base}/healthz within {ready_timeout_s:.0f}s (see `serve status`)")


def deploy_config(store: str, config: str | None = None, overrides: list[str] | None = None) -> dict:
    """The `serve deploy` config of the application, made the way `serve build` makes it (Ray's own
    build and schema code), with the builder's import path and its args so that the cluster binds
    the application to the store itself."""
    from ray._common.network_utils import get_all_interfaces_ip
    from ray.serve._private.build_app import build_app as ray_build_app
    from ray.serve.deployment import deployment_to_schema
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    cfg = store_config(store, config, overrides)
    built = ray_build_app(build_app(store, config, overrides), name="imoe")
    args = {"store": store if is_uri(store) else str(Path(store).resolve())} | (
        {"config": str(Path(config).resolve())} if config else {})
    if overrides:
        args["set"] = ",".join(overrides)
    application = ServeApplicationSchema(
        name="imoe", route_prefix="/", import_path="serve_apps.imoe:app", args=args, runtime_env={},
        deployments=[deployment_to_schema(d) for d in built.deployments]).model_dump(exclude_unset=True)
    if cfg.serve.expert_gpus is None:  # decided on the cluster, where the builder sees its GPUs
        for d in application["deployments"]:
            d.get("ray_actor_options", {}).pop("num_gpus", None)
    out = {"proxy_location": "EveryNode",
           "http_options": {"host": get_all_interfaces_ip(), "port": cfg.serve.port,
                            "request_timeout_s": cfg.serve.request_timeout_s},
           "applications": [application]}
    ServeDeploySchema.model_validate(out)
    return out
