"""The job submission shape (`POST /v1/jobs`), validated with pydantic: unknown fields are refused."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from imoe_ray.serving.openai_api import ROUTED_MODEL, Message


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    agent: str = Field(min_length=1, max_length=128, description="who submits: fairness and limits are per agent")
    priority: int = Field(0, ge=0, description="higher runs first; a higher one preempts a lower running job")
    prompt: str | None = None
    messages: list[Message] | None = None
    model: str = Field(ROUTED_MODEL, min_length=1, description="'imoe' (routed), 'base', or one expert")
    experts: list[str] | None = Field(None, min_length=1, description="experts to mix (equal weights); default: routed")
    mode: Literal["basic", "fast", "optimized"] | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2, description="0 (the default for jobs): greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    deadline_s: float | None = Field(None, gt=0, description="seconds from submission within which the job must finish")

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("the prompt is empty")
        if self.messages is not None and not any(m.role == "user" and m.text().strip() for m in self.messages):
            raise ValueError("messages need at least one user message with text")
        return self
