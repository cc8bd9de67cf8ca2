"""What a request may ask for, checked before any expensive work (tokenisation, routing, retrieval,
compression, decoding), and the one error shape every failure is answered with.

    HTTP ──► Admission (429 past the bound of requests in flight, before anything is read)
         ──► BodyLimit (413 past serve.max_body_bytes, before the JSON is parsed)
         ──► pydantic (types, ranges: temperature 0 or [1e-3, 2], seed a signed 64-bit integer)
         ──► check_request (counts and lengths from the config: messages, prompt characters,
             stop strings, max_tokens)
         ──► tokenise off the event loop ──► check_prompt_tokens (the model's context)
         ──► route, retrieve, compress, decode

Every non-2xx answer is OpenAI's `{"error": {"message", "type", "param", "code"}}`; an error that is
not an `ApiError` becomes a 500 carrying a request id (logged with the stack trace, never sent).
Plain Python and ASGI: the Serve ingress (`serve_apps/imoe.py`) installs it.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from typing import Callable

from imoe_ray.config import ServeConfig
from imoe_ray.serving.openai_api import ApiError

log = logging.getLogger(__name__)


def check_request(body, settings: ServeConfig, max_tokens_limit: int | None = None) -> None:
    """Counts and lengths of a chat or completion request, or a job, against the server's limits (400
    naming the parameter). `max_tokens_limit`: the endpoint's own (a job's), else `settings.max_tokens_limit`."""
    limit = settings.max_tokens_limit if max_tokens_limit is None else max_tokens_limit
    messages = getattr(body, "messages", None)
    if messages is not None and len(messages) > settings.max_messages:
        raise ApiError(400, f"messages: {len(messages)} messages; this server takes at most {settings.max_messages}",
                       param="messages", code="invalid_value")
    chars = sum(len(m.text()) for m in messages) if messages is not None else len(body.prompt)
    if chars > settings.max_prompt_chars:
        param = "messages" if messages is not None else "prompt"
        raise ApiError(400, f"{param}: the prompt has {chars} characters; this server takes at most "
                            f"{settings.max_prompt_chars}", param=param, code="context_length_exceeded")
    for stop in getattr(body, "stop", None) or ():
        if len(stop) > settings.max_stop_chars:
            raise ApiError(400, f"stop: a stop string of {len(stop)} characters; at most {settings.max_stop_chars}",
                           param="stop", code="invalid_value")
    longer = getattr(body, "max_completion_tokens", None)
    asked = longer or body.max_tokens
    if asked is not None and asked > limit:
        param = "max_completion_tokens" if longer else "max_tokens"
        raise ApiError(400, f"{param} is {asked}; this server allows at most {limit}",
                       param=param, code="invalid_value")


def check_prompt_tokens(prompt_tokens: int, context: int, param: str) -> None:
    """A prompt that alone fills the model's context is refused before routing, retrieval or compression."""
    if prompt_tokens >= context:
        raise ApiError(400, f"This model's maximum context length is {context} tokens. However, your prompt has "
                            f"{prompt_tokens} tokens. Please reduce the prompt.", param=param,
                       code="context_length_exceeded")


@dataclass(frozen=True)
class TokenBudget:
    """Prompt tokens + completion tokens within the model's context, the completion within the
    server's limit: the one check the chat/completions endpoints and the job queue share."""
    context: int
    default_max_tokens: int
    max_tokens_limit: int

    def check_asked(self, asked: int | None) -> None:
        """A completion length over the server's limit is refused (before any work, when called first)."""
        if asked is not None and asked > self.max_tokens_limit:
            raise ApiError(400, f"max_tokens is {asked}; this server allows at most {self.max_tokens_limit}",
                           param="max_tokens", code="invalid_value")

    def encode(self, tokenizer, prompt: str, asked: int | None, truncate: bool = False,
               param: str = "messages") -> tuple[list[int], int]:
        """The prompt's token ids (after the EOS the models were trained with) and the completion
        length; `truncate` drops the prompt's oldest tokens (after the EOS) to fit instead of refusing."""
        self.check_asked(asked)
        ids = [tokenizer.eos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        limit = asked or min(self.default_max_tokens, max(1, self.context - len(ids)))
        if truncate and len(ids) + limit > self.context:
            ids = ids[:1] + ids[len(ids) + limit - self.context + 1:]
        if len(ids) + limit > self.context:
            raise ApiError(400, f"This model's maximum context length is {self.context} tokens. However, you requested "
                                f"{len(ids) + limit} tokens ({len(ids)} in the prompt, {limit} for the completion). "
                                f"Please reduce the prompt or max_tokens.", param=param, code="context_length_exceeded")
        return ids, limit


def internal_error(exc: BaseException) -> ApiError:
    """An unexpected failure, answered as OpenAI does; the request id ties the answer to the log line."""
    request_id = uuid.uuid4().hex[:16]
    log.error("request %s failed: %r", request_id, exc, exc_info=exc)
    return ApiError(500, f"internal error (request id {request_id}); the server log has the details",
                    code="internal_error")


_PROCESS_LIMIT: dict[str, int] = {}


def limit_bodies_in_this_process(max_bytes: int) -> None:
    """The body limit `BodyLimit` applies in this process when the application's state sets none (a
    Serve replica: its ASGI app is built after the deployment's constructor runs)."""
    _PROCESS_LIMIT["bytes"] = max_bytes


class BodyLimit:
    """ASGI middleware: a request body over the limit is answered 413 at once, whether it declares
    its length or streams it in chunks; the body is read (up to the limit, never past it) before the
    application sees the request, then handed on unchanged. The limit is the application's
    `state.max_body_bytes`, else the process's (`limit_bodies_in_this_process`), else `max_bytes`."""

    def __init__(self, app, max_bytes: int):
        self.app, self.default_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        state = getattr(scope.get("app"), "state", None)
        limit = getattr(state, "max_body_bytes", None) or _PROCESS_LIMIT.get("bytes") or self.default_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._too_large(send, limit)
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > limit:
                return await self._too_large(send, limit)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send, limit: int) -> None:
        body = json.dumps(ApiError(413, f"the request body is larger than this server's limit of {limit} "
                                        "bytes (serve.max_body_bytes)", code="request_too_large").body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class InFlight:
    """The requests a process is working on, against its bound (`Admission`); `on_change` sees the
    count (a gauge)."""

    def __init__(self) -> None:
        self.count = 0
        self.bound: int | None = None
        self.on_change: Callable[[int], None] | None = None

    def add(self, delta: int) -> None:
        self.count += delta
        if self.on_change is not None:
            self.on_change(self.count)


IN_FLIGHT = InFlight()
WORK_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/route")


def admit_in_this_process(bound: int, on_change: Callable[[int], None] | None = None) -> None:
    """The bound `Admission` applies in this process (a Serve replica sets it in its constructor)."""
    IN_FLIGHT.bound, IN_FLIGHT.on_change = bound, on_change


class Admission:
    """ASGI middleware, outermost: past the bound of requests in flight on the paths that do work, a
    request is answered 429 with Retry-After at once, before its body is read, its caller checked or
    anything parsed, so a burst is turned away at the cost of a few microseconds each instead of
    queueing behind the work. A request counts until its answer (or its stream) ends. The bound is
    the process's (`admit_in_this_process`), else `bound`."""

    def __init__(self, app, bound: int, paths: tuple[str, ...] = WORK_PATHS):
        self.app, self.default_bound, self.paths = app, bound, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") not in self.paths:
            return await self.app(scope, receive, send)
        bound = IN_FLIGHT.bound or self.default_bound
        if IN_FLIGHT.count >= bound:
            return await _at_capacity(send, bound)
        IN_FLIGHT.add(+1)
        try:
            await self.app(scope, receive, send)
        finally:
            IN_FLIGHT.add(-1)


async def _at_capacity(send, bound: int) -> None:
    body = json.dumps(ApiError(429, f"the server is at capacity ({bound} requests in flight); retry shortly",
                               code="rate_limit_exceeded", kind="rate_limit_error").body()).encode()
    await send({"type": "http.response.start", "status": 429,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"retry-after", b"1")]})
    await send({"type": "http.response.body", "body": body})
