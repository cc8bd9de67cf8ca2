"""The one request path of the HTTP endpoints (the Router) and the job queue (the JobQueue): what a
request may ask, its prompt, its route, its token budget, the generation request the expert
replicas decode, retries while a dead replica is replaced, and the draft → summarize fusion.

    body ─► check          counts and lengths against the config (limits.check_request)     400
         ─► prompt         the chat template, or the prompt (blocking: run it in a thread)
         ─► plan           prompt tokens vs the context, then route, retrieve, compress      400
                           (Planner); a mixture wider than a decoding batch is refused
         ─► encode         prompt ids + completion length within the context (TokenBudget)   400
         ─► generation     the GenerationRequest the Experts replicas decode
         ─► (summarizer)   drafts, one cross-talk round (t_CT) when asked, the summarizer's answer
         ─► experts_call   sent again on another replica while a dead one is replaced, as
                           long as nothing was received; a full queue is 429 (or waited out)

Plain Python over a tokenizer and a Planner: the deployments call it and stay thin, and it runs in
tests without Ray. Each method raises `ApiError` (OpenAI-shaped, naming the parameter) on bad input.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Literal

from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from imoe_ray.config import ServeConfig
from imoe_ray.fusion.fuser import Fuser, Fusion
from imoe_ray.fusion.summarizer import summarizer_prompt
from imoe_ray.serving.generation import GenerationRequest, Steer
from imoe_ray.serving.limits import TokenBudget, check_prompt_tokens, check_request
from imoe_ray.serving.openai_api import ApiError, ImoeOptions
from imoe_ray.serving.pipeline import SUMMARIZER, Plan, Planner, chat_prompt, cut_at_stop

log = logging.getLogger(__name__)
REPLICA_GONE = (RayActorError, ActorUnavailableError)
RETRY_PAUSE_S = 0.5
# how a deployment has the expert replicas decode one request (the plan counts retries)
Decode = Callable[[GenerationRequest, Plan], AsyncIterator[dict]]


@dataclass(frozen=True)
class Prompt:
    text: str        # what the model reads: the chat template applied, or the completion prompt
    query: str       # what routing and retrieval read: the last user turn, or the prompt
    param: str       # the parameter an error about it names: "messages" or "prompt"


@dataclass(frozen=True)
class Sampling:
    """How the tokens are chosen, as the request asked (already validated by its pydantic model)."""
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None

    @classmethod
    def of(cls, body) -> Sampling:
        """From a chat or completion request, or a job (which has no stop strings, bias or logprobs)."""
        count = getattr(body, "logprob_count", None)
        return cls(temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                   stop=tuple(getattr(body, "stop", None) or ()), logit_bias=getattr(body, "logit_bias", None),
                   logprobs=count() if count is not None else None)


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list


class RequestPath:
    """One server's request path: its tokenizer, model context, limits and stop tokens."""

    def __init__(self, tokenizer, context: int, settings: ServeConfig, stop_ids: tuple[int, ...],
                 budget: TokenBudget | None = None, fuser: Fuser | None = None):
        self.tokenizer, self.context, self.settings = tokenizer, context, settings
        self.stop_ids = tuple(stop_ids)
        self.fuser = fuser  # the summarizer's plan-and-copy fusion (None: the summarizer decodes freely)
        self.budget = budget or TokenBudget(context, settings.max_tokens, settings.max_tokens_limit)

    # ---- before any work ----
    def check(self, body) -> None:
        """Counts and lengths, before any work."""
        check_request(body, self.settings, self.budget.max_tokens_limit)

    def prompt(self, body) -> Prompt:
        """The prompt of a chat (its template) or a completion. Blocking: call it off the event loop."""
        messages = getattr(body, "messages", None)
        if messages is None:
            return Prompt(body.prompt, body.prompt, "prompt")
        try:
            text, query = chat_prompt(messages, self.tokenizer)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        return Prompt(text, query, "messages")

    def count_tokens(self, text: str) -> int:
        return 1 + len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def plan(self, planner: Planner, model: str, prompt: Prompt, options: ImoeOptions) -> Plan:
        """Route (retrieve, compress) a prompt that fits the context. Blocking: call it off the event loop."""
        check_prompt_tokens(self.count_tokens(prompt.text), self.context, prompt.param)
        plan = planner.plan(model, prompt.query, prompt.text, options)
        self.check_width(len(plan.experts), drafts=plan.fusion == SUMMARIZER)
        return plan

    def check_width(self, experts: int, drafts: bool = False) -> None:
        """A mixture decodes one batch row per expert, and summarizer drafts decode in one batch:
        neither may be wider than a batch."""
        if experts > self.settings.max_batch_size:
            what = "drafts with" if drafts else "mixes"
            raise ApiError(400, f"this request {what} {experts} experts, one batch row each; the server decodes at "
                                f"most {self.settings.max_batch_size} rows together (serve.max_batch_size): ask "
                                "for a smaller imoe.top_k", param="imoe.top_k", code="invalid_value")

    def encode(self, text: str, asked: int | None, truncate: bool = False,
               param: str = "messages") -> tuple[list[int], int]:
        """The prompt's token ids and the completion length (`limits.TokenBudget`). Blocking."""
        return self.budget.encode(self.tokenizer, text, asked, truncate, param=param)

    # ---- decoding ----
    def generation(self, experts: dict[str, float], ids: list[int], limit: int, sampling: Sampling,
                   steer: Steer | None = None) -> GenerationRequest:
        return GenerationRequest(prompt_ids=ids, experts=dict(experts), max_new_tokens=limit,
                                 temperature=sampling.temperature, top_p=sampling.top_p, stop_ids=self.stop_ids,
                                 seed=sampling.seed, stop=sampling.stop, logit_bias=sampling.logit_bias,
                                 logprobs=sampling.logprobs, steer=steer)

    def returned(self, tokens: list[int], finish: str, stops: tuple[str, ...] | list[str]) -> tuple[str, int, str]:
        """The text up to the first stop string, how many tokens it took (the token a stop string
        begins in counts when part of it is returned), and the OpenAI finish reason."""
        text, stopped = cut_at_stop(self.tokenizer.decode(tokens), list(stops))
        if not stopped:
            return text, len(tokens), "stop" if finish == "stop_string" else finish
        kept = next(n for n in range(len(tokens) + 1) if len(self.tokenizer.decode(tokens[:n])) >= len(text))
        return text, kept, "stop"

    async def answer(self, plan: Plan, ids: list[int], limit: int, sampling: Sampling, decode: Decode,
                     timing: str = "generate", steer: Steer | None = None) -> Answer:
        """One decoded answer, cut at its stop strings; the parts' timings go to the plan."""
        tokens: list[int] = []
        logprobs: list = []
        finish = "length"
        async for part in decode(self.generation(plan.experts, ids, limit, sampling, steer), plan):
            plan.took(part, timing)
            tokens += part["tokens"]
            logprobs += part.get("logprobs") or []
            finish = part["finish_reason"] or finish
        text, kept, finish = self.returned(tokens, finish, sampling.stop)
        return Answer(text, finish, len(ids), kept, logprobs[:kept])

    async def summarize(self, plan: Plan, ids: list[int], limit: int, sampling: Sampling, decode: Decode) -> Answer:
        """Each expert drafts (the drafts decode in one batch), then the summarizer grounds them in one
        answer; a near tie on a short query (the planner's rule) is answered with its clarifying question."""
        self.check_width(len(plan.experts), drafts=True)
        if plan.clarification:
            return self.clarifying(plan, len(ids))
        drafts = await asyncio.gather(*[self.answer(plan.only(name), ids, limit, sampling, decode)
                                        for name in plan.experts])
        texts = {name: d.text for name, d in zip(plan.experts, drafts)}
        if plan.cross_talk:
            texts = await self.cross_talk(plan, texts, limit, sampling, decode)
        return await self.fuse(plan, list(texts.items()), len(ids), limit, sampling, decode)

    async def cross_talk(self, plan: Plan, drafts: dict[str, str], limit: int, sampling: Sampling,
                         decode: Decode) -> dict[str, str]:
        """t_CT: one more round in which each strongly selected expert drafts again with the others'
        drafts in context (`fusion/crosstalk.py`); the other experts keep their first draft."""
        from imoe_ray.fusion.crosstalk import cross_talk_round

        async def redraft(name: str, prompt: str) -> str:
            ids, k = await asyncio.to_thread(self.encode, prompt, limit, True)
            return (await self.answer(plan.only(name, prompt), ids, k, sampling, decode)).text

        return await cross_talk_round(plan.prompt, drafts, plan.cross_talk, self.tokenizer,
                                      self.settings.cross_talk_tokens, redraft)

    async def fuse(self, plan: Plan, drafts: list[tuple[str, str]], prompt_tokens: int, limit: int,
                   sampling: Sampling, decode: Decode) -> Answer:
        """The summarizer's answer grounded in the experts' drafts (text: the experts may be whole
        models), planned and copied from them (`fusion/fuser.py`); or, when asked and the drafts
        disagree, a clarifying question."""
        started = time.perf_counter()
        fusion = self.fuser.prepare(plan.prompt, drafts, plan.clarify) if self.fuser is not None \
            else Fusion(summarizer_prompt(plan.prompt, drafts))
        if fusion.clarification is not None:
            plan.clarification = fusion.clarification.to_json()
            return self.clarifying(plan, prompt_tokens)
        fused_ids, fused_limit = await asyncio.to_thread(self.encode, fusion.prompt, limit, True)
        if fusion.max_new_tokens:
            fused_limit = min(fused_limit, fusion.max_new_tokens)
        answer = await self.answer(plan.only(SUMMARIZER, fusion.prompt), fused_ids, fused_limit, sampling, decode,
                                   "fuse", steer=fusion.steer)
        plan.timings_ms["fuse"] = (time.perf_counter() - started) * 1000
        return Answer(fusion.finish(answer.text), answer.finish_reason, prompt_tokens, answer.completion_tokens, [])

    def clarifying(self, plan: Plan, prompt_tokens: int) -> Answer:
        """The answer that is the plan's clarifying question (`imoe.clarification`)."""
        assert plan.clarification is not None
        question = plan.clarification["question"]
        return Answer(question, "stop", prompt_tokens, self.count_tokens(question) - 1, [])


async def experts_call(send: Callable[[], AsyncIterator[dict]], retry_s: float,
                       on_backpressure: Literal["refuse", "wait"] = "refuse",
                       on_retry: Callable[[BaseException], None] | None = None) -> AsyncIterator[dict]:
    """The parts of one call to the expert replicas. A dead replica: the call is sent again (Serve
    routes it to a live one) while nothing was received and within `retry_s`, else a 503. Full
    queues: a 429 at once (`refuse`, a client waits on the answer), or the call waits its turn
    within `retry_s` (`wait`, a background job)."""
    deadline = time.monotonic() + retry_s
    while True:
        received = False
        try:
            async for part in send():
                received = True
                yield part
            return
        except BackPressureError:
            if on_backpressure == "refuse" or time.monotonic() > deadline:
                raise ApiError(429, "the expert replicas are at capacity; retry shortly", code="rate_limit_exceeded",
                               kind="rate_limit_error") from None
        except REPLICA_GONE as e:
            if received or time.monotonic() > deadline:
                raise ApiError(503, f"an expert replica died during the request: {type(e).__name__}; retry",
                               code="replica_unavailable") from None
            log.warning("expert replica gone (%s); sending the request again", type(e).__name__)
            if on_retry is not None:
                on_retry(e)
        await asyncio.sleep(RETRY_PAUSE_S)


async def one_part(call: Awaitable[dict]) -> AsyncIterator[dict]:
    """A whole answer (`Experts.generate`) as a stream of one part."""
    yield await call
