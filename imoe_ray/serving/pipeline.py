"""The request pipeline, before any token is generated: route, retrieve, compress, choose experts
and how to fuse them. Plain Python; the Serve ingress calls it.

Modes:
- `fast`: the router's n-gram fast path alone, the top-1 expert; nothing else.
- `basic`: the full router (fast path → DACT); several categories above t_C are fused.
- `optimized`: `basic` plus retrieval and prompt compression when the deployment has them, and the
  summarizer (when the store has one) instead of the token-level mixture.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Protocol

from imoe_ray.experts.mixture import expert_prior
from imoe_ray.fusion.clarify import ClarifySettings, clarify_route
from imoe_ray.fusion.crosstalk import cross_talk_experts
from imoe_ray.serving.lora_bank import BASE
from imoe_ray.serving.openai_api import ROUTED_MODEL, ApiError, ImoeOptions

SUMMARIZER = "summarizer"


class Retriever(Protocol):
    """Passages (with `.text` and `.citation()`) of the categories' knowledge bases (all when none);
    `embed` is the query's vector, which `retrieve` takes instead of encoding the query itself."""
    def embed(self, query: str): ...
    def retrieve(self, query: str, categories: list[str], k: int, vector=None) -> list: ...


class Compressor(Protocol):
    """[prompt, *passages] shortened (the query's key terms kept): `.question` is the prompt, `.context`
    the passages within `budget_tokens`, `.ratio` tokens before / after."""
    def compress(self, query: str, texts: list[str], budget_tokens: int | None): ...


@dataclass
class Plan:
    model: str
    mode: str
    prompt: str
    experts: dict[str, float]                  # expert → weight in the fusion (one entry: no fusion)
    fusion: str | None = None                  # "mixture" (c-BTM, token level) or "summarizer"
    categories: list[str] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    fallback: str | None = None
    exit_layer: int | None = None
    t_c: float | None = None                   # the effective t_C of this request (adaptive: from its complexity)
    complexity: float | None = None            # the query's complexity score (adaptive t_C only)
    cross_talk: list[str] = field(default_factory=list)  # experts that drafted twice, reading each other (t_CT)
    passages: int = 0
    citations: list[dict] = field(default_factory=list)   # retrieved passages: chunk_id, table, score, ...
    compression_ratio: float | None = None     # prompt tokens before / after compression
    retries: int = 0                           # times a dead replica's request was sent again
    batch_rows: int = 0                        # rows decoded in the same forward passes as this request
    server_ms: float = 0.0                     # the whole request inside the router deployment
    clarify: bool = False                      # may the answer be a clarifying question (request or config)
    clarification: dict | None = None          # {question, options, reason, score} when it is one
    timings_ms: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("route", "retrieval", "compression", "load", "generate", "fuse"), 0.0))

    def only(self, expert: str, prompt: str | None = None) -> Plan:
        """One expert's pass of this plan (a draft, the summarizer's pass): the same timings."""
        return Plan(self.model, self.mode, self.prompt if prompt is None else prompt, {expert: 1.0},
                    timings_ms=self.timings_ms)

    def took(self, part: dict, timing: str = "generate") -> None:
        """What one part decoded by the expert replicas reports: load time, batch width, decoding time."""
        self.timings_ms["load"] = max(self.timings_ms["load"], part["load_ms"])
        self.batch_rows = max(self.batch_rows, part["batch_rows"])
        if timing == "generate":
            self.timings_ms["generate"] = part["generate_ms"]

    def count_retry(self) -> None:
        self.retries += 1

    def imoe(self) -> dict:
        out = asdict(self)
        del out["prompt"], out["model"]
        out["experts"] = list(self.experts)
        out["weights"] = {k: round(v, 4) for k, v in self.experts.items()}
        out["timings_ms"] = {k: round(v, 3) for k, v in self.timings_ms.items()}
        out["server_ms"] = round(self.server_ms, 3)
        del out["clarify"]
        if self.clarification is None:
            del out["clarification"]
        return out


class Planner:
    def __init__(self, router, experts: list[str], mode: str = "basic", top_k: int = 2,
                 retriever: Retriever | None = None, compressor: Compressor | None = None,
                 retrieval_k: int = 4, context_budget: int = 256, cross_talk: bool = False, t_ct: float = 0.3,
                 clarify: ClarifySettings | None = None):
        self.router = router
        self.experts = set(experts)
        self.mode = mode
        self.top_k = top_k
        self.retriever, self.compressor = retriever, compressor
        self.retrieval_k, self.context_budget = retrieval_k, context_budget
        self.cross_talk, self.t_ct = cross_talk, t_ct
        self.clarify = clarify or ClarifySettings()
        self._encoding = ThreadPoolExecutor(max_workers=2, thread_name_prefix="query-encode")

    def models(self) -> list[str]:
        """What `model` may name: the routed mixture, the base model, or one expert."""
        return [ROUTED_MODEL, BASE, *sorted(self.experts)]

    def plan(self, model: str, query: str, prompt: str, options: ImoeOptions) -> Plan:
        mode = options.mode or self.mode
        if model != ROUTED_MODEL and model != BASE and model not in self.experts:
            raise ApiError(404, f"the model {model!r} does not exist; use 'imoe' (routed), 'base', or one of the "
                                f"experts listed at GET /v1/experts", param="model", code="model_not_found")
        # the query's vector does not depend on the route: it is encoded while the router runs
        vector = self._encoding.submit(self.retriever.embed, query) \
            if mode == "optimized" and self.retriever is not None else None
        if model != ROUTED_MODEL:
            plan = Plan(model, mode, prompt, {model: 1.0})
        else:
            plan = self._routed(query, prompt, mode, options)
        plan.clarify = self.clarify.enabled if options.clarify is None else options.clarify
        if mode in ("fast", "optimized"):
            self._add_context(plan, query, retrieve=mode == "optimized", vector=vector)
        if len(plan.experts) > 1:
            plan.fusion = options.fusion or (SUMMARIZER if mode == "optimized" and SUMMARIZER in self.experts
                                             else "mixture")
            if plan.fusion == SUMMARIZER and SUMMARIZER not in self.experts:
                raise ApiError(400, "this store has no summarizer (build it with the `summarizer` stage); "
                                    "use fusion 'mixture'", param="imoe.fusion", code="summarizer_unavailable")
        wanted = self.cross_talk if options.cross_talk is None else options.cross_talk
        if plan.fusion != SUMMARIZER or not wanted:  # cross-talk needs drafts: the summarizer's
            plan.cross_talk = []
        return plan

    def route(self, query: str, mode: str):
        return self.router.route(query, fast_only=(mode == "fast"))

    def _routed(self, query: str, prompt: str, mode: str, options: ImoeOptions) -> Plan:
        started = time.perf_counter()
        route = self.route(query, mode)
        k = options.top_k or self.top_k
        prior = expert_prior(route.all_probabilities, self.router.served_by)
        if options.ensemble:  # asked for: the top-k experts, even where the router would fall back
            chosen = sorted(prior, key=prior.__getitem__, reverse=True)[:k]
        elif route.experts == [BASE]:
            chosen = [BASE]
        else:
            # a fallback to every expert lists them in category order: the most probable come first
            ranked = sorted(route.experts, key=lambda e: -prior.get(e, 0.0)) if route.fallback else route.experts
            chosen = ranked[:1] if mode == "fast" else ranked[:k]
        chosen = [e for e in chosen if e == BASE or e in self.experts] or [BASE]
        weights = {e: max(prior.get(e, 0.0), 1e-6) for e in chosen}
        total = sum(weights.values())
        plan = Plan(ROUTED_MODEL, mode, prompt, {e: w / total for e, w in weights.items()},
                    categories=route.names, probabilities=route.probabilities, fallback=route.fallback,
                    exit_layer=route.exit_layer, t_c=route.t_c, complexity=route.complexity,
                    cross_talk=cross_talk_experts(list(prior), list(prior.values()), chosen, self.t_ct))
        if (options.clarify if options.clarify is not None else self.clarify.enabled) and chosen != [BASE]:
            tie = clarify_route(query, prior, self.clarify)  # a near tie on a short query: ask which is meant
            plan.clarification = tie.to_json() if tie is not None else None
        plan.timings_ms["route"] = (time.perf_counter() - started) * 1000
        return plan

    def _add_context(self, plan: Plan, query: str, retrieve: bool = True, vector: Future | None = None) -> None:
        """Retrieval (`optimized`) and compression (`fast`, `optimized`) slots: filled when the
        deployment was given the components. The retrieval timing is what retrieval adds after
        routing: the rest of the query's encoding, the search and the fusion."""
        passages = []
        if retrieve and self.retriever is not None:
            started = time.perf_counter()
            found = self.retriever.retrieve(query, plan.categories or [e for e in plan.experts if e != BASE],
                                            self.retrieval_k, vector=vector.result() if vector else None)
            plan.timings_ms["retrieval"] = (time.perf_counter() - started) * 1000
            plan.passages, plan.citations = len(found), [p.citation() for p in found]
            passages = [p.text for p in found]
        context = "\n".join(passages)
        if self.compressor is not None:
            started = time.perf_counter()
            out = self.compressor.compress(query, [plan.prompt, *passages], self.context_budget)
            plan.prompt, context, plan.compression_ratio = out.question, out.context, round(out.ratio, 3)
            plan.timings_ms["compression"] = (time.perf_counter() - started) * 1000
        if context:
            plan.prompt = f"{context}\n\n{plan.prompt}"


def chat_prompt(messages: list, tokenizer) -> tuple[str, str]:
    """The prompt text of a chat and the query the router reads (the last user message).
    A tokenizer with a chat template formats the chat; the embedded base LM, trained on plain text,
    continues the conversation's text."""
    query = next(m.text() for m in reversed(messages) if m.role == "user" and m.text().strip())
    turns = [{"role": m.role, "content": m.text()} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True), query
    return "\n\n".join(t["content"] for t in turns if t["content"].strip()), query


def cut_at_stop(text: str, stops: list[str] | None) -> tuple[str, bool]:
    """The text up to the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops or []) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
