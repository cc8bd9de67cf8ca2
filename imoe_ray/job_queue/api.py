"""The job submission shape (`POST /v1/jobs`), validated with pydantic: unknown fields are refused."""

from __future__ import annotations

from typing import Literal

import math

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from imoe_ray.serving.openai_api import ROUTED_MODEL, Message, Seed, Temperature

MAX_EXPERTS = 64          # a hard ceiling; jobs.max_experts (config) is usually lower
MAX_MESSAGES = 1024


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    agent: str | None = Field(None, min_length=1, max_length=128,
                              description="who submits: fairness and limits are per agent; with API keys, a sub-agent "
                                          "inside the key's namespace (the key's name when not given)")
    priority: int = Field(0, ge=0, description="higher runs first; a higher one preempts a lower running job")
    prompt: str | None = None
    messages: list[Message] | None = Field(None, max_length=MAX_MESSAGES)
    model: str = Field(ROUTED_MODEL, min_length=1, max_length=256, description="'imoe' (routed), 'base', or one expert")
    experts: list[str] | None = Field(None, min_length=1, max_length=MAX_EXPERTS,
                                      description="experts to mix (equal weights); default: routed")
    mode: Literal["basic", "fast", "optimized"] | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: Temperature = 0.0  # jobs decode greedily unless asked
    top_p: float = Field(1.0, gt=0, le=1)
    seed: Seed | None = None
    deadline_s: float | None = Field(None, gt=0, le=365 * 86400,
                                     description="seconds from submission within which the job must finish")

    @field_validator("deadline_s")
    @classmethod
    def _finite(cls, v):
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number of seconds")
        return v

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("the prompt is empty")
        if self.messages is not None and not any(m.role == "user" and m.text().strip() for m in self.messages):
            raise ValueError("messages need at least one user message with text")
        return self
