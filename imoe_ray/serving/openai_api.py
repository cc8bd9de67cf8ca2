"""The OpenAI-compatible request and response shapes, validated with pydantic.

Fields OpenAI clients send that do not change what this server does (user, metadata, penalties at
their neutral value, ...) are accepted and ignored; a value that asks for something the server
cannot honour (n > 1, logprobs, tools) is a 400 with the parameter named, never silently dropped.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
    ensemble: bool = Field(False, description="mix the router's top-k experts even when one would do")
    top_k: int | None = Field(None, ge=1, le=64)
    fusion: Literal["mixture", "summarizer"] | None = Field(None, description="how several experts are fused")


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = None
    logprobs: bool | int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    imoe: ImoeOptions = ImoeOptions()

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @model_validator(mode="after")
    def _supported(self):
        if self.n != 1:
            raise ValueError("n > 1 is not supported; send separate requests")
        if self.logprobs:
            raise ValueError("logprobs are not supported")
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported (leave them at 0)")
        for name in ("tools", "functions", "response_format"):
            value = (self.model_extra or {}).get(name)
            if value and not (name == "response_format" and value == {"type": "text"}):
                raise ValueError(f"{name} is not supported")
        return self

    def limit(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


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

    @model_validator(mode="after")
    def _has_user_text(self):
        if not any(m.role == "user" and m.text().strip() for m in self.messages):
            raise ValueError("messages need at least one user message with text")
        return self


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        prompts = [v] if isinstance(v, str) else v
        if len(prompts) != 1:
            raise ValueError("send one prompt per request")
        if not prompts[0].strip():
            raise ValueError("the prompt is empty")
        return prompts[0]

    @model_validator(mode="after")
    def _no_suffix(self):
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self


class RouteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1)
    mode: Literal["basic", "fast", "optimized"] | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int, imoe: dict) -> dict:
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion_tokens), "imoe": imoe}


def completion_response(model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int,
                        imoe: dict) -> dict:
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion_tokens), "imoe": imoe}


def chat_chunk(chunk_id: str, model: str, delta: dict, finish: str | None = None, **extra: Any) -> dict:
    return {"id": chunk_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}


def completion_chunk(chunk_id: str, model: str, text: str, finish: str | None = None, **extra: Any) -> dict:
    return {"id": chunk_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], **extra}
