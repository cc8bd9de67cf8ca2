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
from imoe_ray.serving.limits import Admission, BodyLimit, admit_in_this_process, internal_error, limit_bodies_in_this_process
from imoe_ray.serving.lora_bank import BASE
from imoe_ray.packaging.hot import ExpertsWatcher
from imoe_ray.serving.model import ServingModel, installed_experts, stop_token_ids
from imoe_ray.experts.whole_model import model_experts
from imoe_ray.serving.model_experts import ModelAnswer, ModelRefusal, ModelRequest, check_budget, replica_models
from imoe_ray.serving.pipeline import SUMMARIZER, Plan, Planner, cut_at_stop
from imoe_ray.serving.requests import REPLICA_GONE, Answer, Decode, RequestPath, Sampling, experts_call, one_part
from imoe_ray.store import Store
from imoe_ray.store.layout import EXPERTS_INDEX
from imoe_ray.store.mirror import StoreMirror
from imoe_ray.store.store import is_uri
from serve_apps.job_queue import JobQueue, add_job_routes

log = logging.getLogger("ray.serve")
STREAM_EVERY_S = 0.03          # how often a streaming request is handed its new tokens


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
        self.whole = replica_models(self.mirror.root, self.model, cfg.memory_budget_mb)  # whole-model experts, byte budget
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
        await asyncio.to_thread(self.whole.pool.fit)  # a new adapter counts in serve.memory_budget_mb too
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

    async def generate(self, request: GenerationRequest) -> dict:
        """One request decoded to the end: {"tokens", "finish_reason", "load_ms", "generate_ms", "batch_rows"}."""
        return [part async for part in self._parts(request, every_s=None)][-1]  # one part: the whole answer

    async def stream(self, request: GenerationRequest) -> AsyncIterator[dict]:
        """The same as a stream of parts, new tokens every ~30 ms (called with stream=True)."""
        async for part in self._parts(request, every_s=STREAM_EVERY_S):
            yield part

    async def _parts(self, request: GenerationRequest, every_s: float | None) -> AsyncIterator[dict]:
        self._pending(+1)
        try:
            ticket = await self._enqueue(request)
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

    def most_resident(self) -> int:
        """The most adapters this replica ever held at once (strict mode: 1)."""
        return self.model.bank.most_resident

    # ---- whole-model experts (`imoe experts add-model`; imoe_ray/serving/model_experts.py) ----
    async def generate_model(self, request: ModelRequest) -> ModelAnswer | ModelRefusal:
        """A whole-model expert's answer, decoded with its own tokenizer; loaded (and others evicted)
        under serve.memory_budget_mb first."""
        await asyncio.to_thread(self.mirror.refresh)
        return await asyncio.to_thread(self.whole.serve, request)

    def residency(self) -> dict:
        """What this replica holds, in MB: base and adapters, whole models, the budget."""
        return self.whole.snapshot() | {"adapters": list(self.model.bank.resident)}


def _replica_cpus() -> int:
    try:
        return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    except Exception:
        return 1


# ---- the router ingress ----------------------------------------------------------------------
api = FastAPI(title="IMoE-Ray", description="A served mixture of independently trained experts (OpenAI-compatible).")


api.add_middleware(BodyLimit, max_bytes=Config().serve.max_body_bytes)  # the Router sets its config's
api.add_middleware(Authenticate)  # an unknown caller is refused before its body is read
# outermost: past the bound of requests in flight, a 429 before anything is read (the Router sets its config's)
api.add_middleware(Admission, bound=Config().serve.max_ongoing_requests + Config().serve.max_queued_requests)


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
    if isinstance(exc, REPLICA_GONE):
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
        self.installed = installed_experts(self.store)
        self.whole_models = set(model_experts(self.store))  # experts that are whole models, not adapters
        from imoe_ray.retrieval.serving import build_components

        stop_ids = stop_token_ids(self.store / "base", self.tokenizer)
        self.clarify = ClarifySettings.from_config(cfg.serve)
        self.path = RequestPath(self.tokenizer, self.context, cfg.serve, stop_ids,
                                fuser=Fuser(cfg.fusion, self.clarify, self.tokenizer, list(stop_ids)))
        self.embedding = cfg.embedding
        self._encoders: dict[str, object] = {}

        def scorer(texts: list[str]):  # the selective compressor's LM: the expert replicas' base, not a copy here
            return experts.surprisal.remote(texts).result()

        retriever, compressor, self.learner = build_components(store, cfg, threads=None, scorer=scorer,
                                                               local_root=self.store)
        self.planner = Planner(load_router(Store(store), cfg), list(self.installed), self.settings.mode,
                               self.settings.top_k or cfg.experts.top_k, retriever, compressor,
                               cfg.retrieval.k, max(16, min(256, self.context // 4)),
                               cross_talk=cfg.serve.cross_talk, t_ct=cfg.serve.t_ct, clarify=self.clarify)
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
        admit_in_this_process(cfg.serve.max_ongoing_requests + cfg.serve.max_queued_requests, self._in_flight)

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
                         "adapter": manifest.get("adapter", {}), "training": manifest.get("training", {}),
                         **self._whole_model_fields(e["name"], manifest)})
        extra = [n for n in self.installed if n not in {r["name"] for r in rows}]
        return {"object": "list", "data": rows, "other_adapters": extra, "aliases": index.get("aliases", {}),
                **await self._residency()}

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
        for card in cards:
            if card["id"] in self.whole_models:  # its own model: no parent, its own directory and context
                card |= {"root": str(self.store / "experts" / card["id"] / "model"), "parent": None,
                         "max_model_len": _read_json(self.store / "experts" / card["id"] / "model" / "config.json")
                         .get("max_position_embeddings")}
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
        return await self._complete(body, chat=True, caller=caller)

    @api.post("/v1/completions")
    async def completions(self, body: oa.CompletionRequest, caller: Caller = Depends(_caller)):
        return await self._complete(body, chat=False, caller=caller)

    # ---- the pipeline (its steps: `imoe_ray.serving.requests.RequestPath`) ----
    async def _complete(self, body, chat: bool, caller: Caller):
        """A request (counted in flight by the `Admission` middleware) to its answer, or to its stream."""
        arrived = time.perf_counter()
        self.path.check(body)
        self._refresh()
        # the chat template, the tokenizer and the router run off the event loop: streams go on meanwhile
        prompt = await asyncio.to_thread(self.path.prompt, body)
        plan = await asyncio.to_thread(self.path.plan, self.planner, body.model, prompt, body.imoe)
        self.route_ms.observe(plan.timings_ms["route"])
        for expert in plan.experts:
            self.requests.inc(tags={"expert": expert, "mode": plan.mode})
        sampling = Sampling.of(body)
        if body.stream:
            return StreamingResponse(self._stream(body, plan, sampling, chat, prompt.query, caller, arrived),
                                     media_type="text/event-stream")
        answer = await self._answer(body, plan, sampling)
        plan.server_ms = (time.perf_counter() - arrived) * 1000
        self._observe(plan, answer.completion_tokens, first_token_ms=plan.server_ms)
        logprobs = answer.logprobs if body.logprob_count() is not None else None
        if chat:
            response = oa.chat_response(body.model, answer.text, answer.finish_reason, answer.prompt_tokens,
                                        answer.completion_tokens, plan.imoe(),
                                        None if logprobs is None else oa.chat_logprobs(logprobs, self._token_text))
        else:
            response = oa.completion_response(
                body.model, (prompt.query if body.echo else "") + answer.text, answer.finish_reason,
                answer.prompt_tokens, answer.completion_tokens, plan.imoe(),
                None if logprobs is None else oa.completion_logprobs(logprobs, self._token_text))
        self._learn(prompt.query, answer.text, plan, response["id"], caller)
        return response

    async def _answer(self, body, plan: Plan, sampling: Sampling) -> Answer:
        if self.whole_models.intersection(plan.experts):
            return await self._answer_whole(body, plan, sampling)
        ids, limit = await asyncio.to_thread(self.path.encode, plan.prompt, body.max_completion_tokens or body.max_tokens)
        decode = self._decoder(stream=False)
        if plan.fusion == SUMMARIZER or plan.clarification:
            return await self.path.summarize(plan, ids, limit, sampling, decode)
        return await self.path.answer(plan, ids, limit, sampling, decode)

    def _decoder(self, stream: bool) -> Decode:
        """How this ingress has the expert replicas decode one request: streamed or whole, sent again
        on a live replica while a dead one is replaced."""
        def decode(request: GenerationRequest, plan: Plan) -> AsyncIterator[dict]:
            if stream:
                send = lambda: self._stream_handle.remote(request)
            else:
                send = lambda: one_part(self.experts.generate.remote(request))
            return experts_call(send, self.settings.retry_s, on_retry=lambda e: plan.count_retry())
        return decode

    def _refresh(self) -> None:
        self.mirror.refresh()
        installed = self._watch.refresh(self.planner)
        if installed is not None:
            self.installed = installed
            self.whole_models = set(model_experts(self.store))

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

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    async def _stream(self, body, plan: Plan, sampling: Sampling, chat: bool, query: str, caller: Caller,
                      arrived: float) -> AsyncIterator[str]:
        chunk_id = oa.new_id("chatcmpl" if chat else "cmpl")
        first_token_ms = None
        make = oa.chat_chunk if chat else oa.completion_chunk
        try:
            if plan.fusion == SUMMARIZER or plan.clarification or self.whole_models.intersection(plan.experts):
                # the fused (or whole-model) answer exists only at the end
                answer = await self._answer(body, plan, sampling)
                self._observe(plan, answer.completion_tokens, first_token_ms=(time.perf_counter() - arrived) * 1000)
                first = {"role": "assistant", "content": answer.text} if chat else answer.text
                yield _sse(make(chunk_id, body.model, first, None, imoe=plan.imoe()))
                yield _sse(make(chunk_id, body.model, {} if chat else "", answer.finish_reason, imoe=plan.imoe()))
                if body.include_usage():
                    yield _sse(oa.usage_chunk(chunk_id, body.model, chat, answer.prompt_tokens,
                                              answer.completion_tokens))
                yield "data: [DONE]\n\n"
                self._learn(query, answer.text, plan, chunk_id, caller)
                return
            ids, limit = await asyncio.to_thread(self.path.encode, plan.prompt,
                                                 body.max_completion_tokens or body.max_tokens)
            if chat:
                yield _sse(make(chunk_id, body.model, {"role": "assistant", "content": ""}, imoe=plan.imoe()))
            elif body.echo:
                yield _sse(make(chunk_id, body.model, query))
            tokens, sent, finish, logprobs, sent_logprobs = [], "", "length", [], 0
            asked = body.logprob_count()
            async for part in self._decoder(stream=True)(self.path.generation(plan.experts, ids, limit, sampling), plan):
                plan.took(part)
                tokens += part["tokens"]
                logprobs += part.get("logprobs") or []
                finish = part["finish_reason"] or finish
                text, stopped = cut_at_stop(self.tokenizer.decode(tokens), body.stop)
                if text.endswith("\ufffd") and not part["finish_reason"] and not stopped:
                    continue  # half of a multi-byte character: wait for the rest
                if len(text) > len(sent):
                    delta = text[len(sent):]
                    extra = {}
                    if asked is not None:
                        _, kept, _ = self.path.returned(tokens, finish, body.stop)
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
            _, kept, finish = self.path.returned(tokens, finish, body.stop)
            self._observe(plan, kept, first_token_ms)
            yield _sse(make(chunk_id, body.model, {} if chat else "", finish, imoe=plan.imoe()))
            if body.include_usage():
                yield _sse(oa.usage_chunk(chunk_id, body.model, chat, len(ids), kept))
            yield "data: [DONE]\n\n"
            self._learn(query, sent, plan, chunk_id, caller)  # what the client received, once it has all of it
        except Exception as e:  # after the first byte the status is sent: an error event, then the end
            yield _sse(_as_api_error(e).body())
            yield "data: [DONE]\n\n"

    # ---- whole-model experts (`imoe experts add-model`) ----
    def _whole_model_fields(self, name: str, manifest: dict) -> dict:
        if name not in self.whole_models:
            return {"kind": "adapter"}
        return {"kind": "model", "model": {k: v for k, v in manifest.get("model", {}).items() if k != "files"}}

    async def _residency(self) -> dict:
        """One expert replica's resident bytes (`resident_mb`, `budget_mb`, the whole models it holds)."""
        try:
            return await self.experts.residency.remote()
        except Exception as e:  # the list still answers while a replica is replaced
            log.warning("residency of the expert replicas unavailable: %r", e)
            return {"resident_mb": None}

    async def _answer_whole(self, body, plan: Plan, sampling: Sampling) -> Answer:
        """A plan naming whole-model experts: each expert answers in turn (a whole model decodes with its
        own tokenizer, loaded under the replica's byte budget), most probable first; several answers are
        fused at text level by the summarizer, or, in a store without one, the most probable expert's
        answer is returned (`imoe.fusion`: "summarizer" or "top")."""
        ids, limit = await asyncio.to_thread(self.path.encode, plan.prompt, body.max_completion_tokens or body.max_tokens)
        plan.timings_ms["generate"] = 0.0
        decode = self._decoder(stream=False)
        drafts, last = [], None
        for name in sorted(plan.experts, key=lambda e: -plan.experts[e]):
            if name in self.whole_models:
                last = await self._whole_draft(name, limit, body, plan)
                drafts.append((name, last.text))
            else:
                spent = plan.timings_ms["generate"]   # an adapter's draft sets the request's generate time to its own
                drafts.append((name, (await self.path.answer(plan.only(name), ids, limit, sampling, decode)).text))
                plan.timings_ms["generate"] += spent
        if len(drafts) == 1 and last is not None:   # the one draft is a whole model's
            text, stopped = cut_at_stop(last.text, body.stop)
            finish = "stop" if stopped else last.finish_reason
            tokens = self.path.count_tokens(text) - 1 if stopped else last.completion_tokens
            return Answer(text, finish, len(ids), tokens, [])
        if SUMMARIZER not in self.installed:
            plan.fusion = "top"
            text, _ = cut_at_stop(drafts[0][1], body.stop)
            return Answer(text, "stop", len(ids), self.path.count_tokens(text) - 1, [])
        plan.fusion = SUMMARIZER
        return await self.path.fuse(plan, drafts, len(ids), limit, sampling, decode)

    async def _whole_draft(self, name: str, limit: int, body, plan: Plan) -> ModelAnswer:
        """One whole-model expert's answer; its load and decoding times add to the request's."""
        request = ModelRequest(name, limit, prompt=plan.prompt, temperature=body.temperature or 0.0,
                               top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed)
        try:
            out = await self.experts.generate_model.remote(request)
        except BackPressureError as e:
            raise _as_api_error(e) from None
        if isinstance(out, ModelRefusal):
            raise oa.ApiError(out.status, out.error, param="model", code=out.code)
        plan.timings_ms["load"] += out.load_ms
        plan.timings_ms["generate"] += out.generate_ms
        return out

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

    def _in_flight(self, count: int) -> None:
        self.queue.set(count, tags={"deployment": "Router"})


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
    if not is_uri(store_dir):
        # a byte budget below the base model and its resident adapters: refused here
        check_budget(store_dir, cfg.serve.memory_budget_mb, cfg.serve.max_loaded_experts)
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
    # (the `Admission` middleware) instead of waiting in the proxy's queue or getting the proxy's plain-text 503
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
