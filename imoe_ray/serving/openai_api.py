"""The OpenAI-compatible request and response shapes, validated with pydantic.

Fields OpenAI clients send that do not change what this server does (user, metadata, penalties at
their neutral value, ...) are accepted and ignored; a value that asks for something the server
cannot honour (n > 1, best_of > 1, tools, a suffix, penalties) is a 400 with the parameter named,
never silently dropped. `logit_bias`, `logprobs`/`top_logprobs`, `echo`, `stop` and
`stream_options.include_usage` are implemented.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from imoe_ray.serving.generation import MIN_TEMPERATURE, SEED_MAX, SEED_MIN


def _sampling_temperature(v: float) -> float:
    if 0 < v < MIN_TEMPERATURE:  # logprobs / temperature would overflow to inf, the probabilities to NaN
        raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}")
    return v


# What sampling takes, for requests and jobs alike.
Temperature = Annotated[float, Field(ge=0, le=2, description="0 (greedy) or within [0.001, 2]"),
                        AfterValidator(_sampling_temperature)]
Seed = Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX, description="a signed 64-bit integer")]

ROUTED_MODEL = "imoe"


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class ImoeOptions(BaseModel):
    """The request's `imoe` object (with the openai client: `extra_body={"imoe": {...}}`)."""
    model_config = ConfigDict(extra="forbid")
    mode: Literal["basic", "fast", "optimized"] | None = None
    ensemble: bool | int = Field(False, description="mix the router's top-k experts even when one would do; a "
                                                    "number N: its top N (the same as top_k: N)")
    top_k: int | None = Field(None, ge=1, le=64)
    fusion: Literal["mixture", "summarizer"] | None = Field(None, description="how several experts are fused")
    cross_talk: bool | None = Field(None, description="strongly selected experts read each other's drafts before "
                                                      "the summarizer fuses them (t_CT); null: serve.cross_talk")
    clarify: bool | None = Field(None, description="answer with a clarifying question (imoe.clarification) when "
                                 "the experts disagree or the route is a near tie; null: the server's serve.clarify")

    @model_validator(mode="after")
    def _ensemble_of_n(self):
        if isinstance(self.ensemble, bool):
            return self
        if not 1 <= self.ensemble <= 64:
            raise ValueError(f"ensemble: true, false, or a number of experts from 1 to 64, not {self.ensemble}")
        if self.top_k is not None and self.top_k != self.ensemble:
            raise ValueError(f"ensemble asks for {self.ensemble} experts and top_k for {self.top_k}: give one")
        self.top_k, self.ensemble = self.ensemble, True
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(BaseModel):
    """What both endpoints take. Every parameter that changes the answer is honoured or refused with
    a 400 naming it (`param`); only those with no effect on this server (user, metadata, store,
    service_tier, parallel_tool_calls, ...) are accepted and ignored, as vLLM does with unknown fields."""
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: Temperature = 1.0
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1, description="one choice per request (send several requests for more)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: Seed | None = None
    presence_penalty: float = Field(0.0, ge=0, le=0, description="not supported: leave at 0")
    frequency_penalty: float = Field(0.0, ge=0, le=0, description="not supported: leave at 0")
    logit_bias: dict[int, float] | None = None
    tools: list[Any] | None = Field(None, max_length=0, description="tool calling is not supported")
    functions: list[Any] | None = Field(None, max_length=0, description="function calling is not supported")
    tool_choice: Literal["none"] | None = None
    function_call: Literal["none"] | None = None
    response_format: dict[str, Any] | None = None
    imoe: ImoeOptions = ImoeOptions()

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v and any(not -100 <= b <= 100 for b in v.values()):
            raise ValueError("logit_bias values must lie within [-100, 100]")
        if v and any(t < 0 for t in v):
            raise ValueError("logit_bias keys are token ids (non-negative integers)")
        return v

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v):
        if v and v != {"type": "text"}:
            raise ValueError("only response_format {'type': 'text'} is supported")
        return v

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, v, info: ValidationInfo):
        if v is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return v

    def limit(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            parts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts are supported")
                parts.append(part["text"])
            return "\n".join(parts)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v, info: ValidationInfo):
        if v and not info.data.get("logprobs"):
            raise ValueError("needs logprobs set to true")
        return v

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @model_validator(mode="after")
    def _has_user_text(self):
        if not any(m.role == "user" and m.text().strip() for m in self.messages):
            raise ValueError("messages need at least one user message with text")
        return self


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = Field(None, max_length=0, description="insertion (suffix) is not supported")
    best_of: int | None = Field(None, ge=1, le=1, description="one candidate per request")
    logprobs: int | None = Field(None, ge=0, le=5)

    @model_validator(mode="after")
    def _echo_without_logprobs(self):
        if self.echo and self.logprobs is not None:
            raise ValueError("echo: the prompt's log-probabilities are not computed; use echo or logprobs, not both")
        return self

    def logprob_count(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        prompts = [v] if isinstance(v, str) else v
        if len(prompts) != 1:
            raise ValueError("send one prompt per request")
        if not prompts[0].strip():
            raise ValueError("the prompt is empty")
        return prompts[0]



class RouteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1)
    mode: Literal["basic", "fast", "optimized"] | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int, imoe: dict,
                  logprobs: dict | None = None) -> dict:
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                         "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion_tokens), "imoe": imoe}


def completion_response(model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int,
                        imoe: dict, logprobs: dict | None = None) -> dict:
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion_tokens), "imoe": imoe}


def chat_chunk(chunk_id: str, model: str, delta: dict, finish: str | None = None, **extra: Any) -> dict:
    return {"id": chunk_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}


def completion_chunk(chunk_id: str, model: str, text: str, finish: str | None = None, **extra: Any) -> dict:
    return {"id": chunk_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], **extra}


def usage_chunk(chunk_id: str, model: str, chat: bool, prompt_tokens: int, completion_tokens: int) -> dict:
    """The extra last chunk of a stream asked with stream_options.include_usage: no choices, the usage."""
    return {"id": chunk_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_logprobs(entries: list[dict], token_text) -> dict:
    """OpenAI's chat `logprobs` object from per-token {"token", "logprob", "top"} entries."""
    def one(token: int, logprob: float) -> dict:
        text = token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [one(e["token"], e["logprob"]) | {"top_logprobs": [one(t, lp) for t, lp in e["top"]]}
                        for e in entries]}


def completion_logprobs(entries: list[dict], token_text, offset: int = 0) -> dict:
    """The legacy completions `logprobs` object (tokens, token_logprobs, top_logprobs, text_offset)."""
    tokens = [token_text(e["token"]) for e in entries]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{token_text(t): lp for t, lp in e["top"]} for e in entries], "text_offset": offsets}


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)

    @field_validator("input")
    @classmethod
    def _texts(cls, v):
        texts = [v] if isinstance(v, str) else v
        if not texts:
            raise ValueError("input is empty")
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("token-id input is not supported; send strings")
        if any(not t for t in texts):
            raise ValueError("input strings must be non-empty")
        if len(texts) > 2048:
            raise ValueError("at most 2048 inputs per request")
        return texts
