"""The served summarizer fusion, in one object the Serve router calls: given the experts' drafts, either
a clarifying question (`clarify.py`) or the summarizer's prompt with the copy constraint that makes
its answer obey every draft (`constrained.py`), and the finishing of the generated text."""

from __future__ import annotations

from dataclasses import dataclass

from imoe_ray.config import FusionConfig
from imoe_ray.fusion.clarify import Clarification, ClarifySettings, clarify_drafts
from imoe_ray.fusion.constrained import CopySteer, FusionPlan, finish, make_steer, max_answer_tokens, plan_fusion
from imoe_ray.fusion.summarizer import summarizer_prompt


@dataclass
class Fusion:
    """One request's fusion: the summarizer's prompt, its decoding constraint (None: free, as trained)
    and new-token limit, or instead a clarifying question."""
    prompt: str = ""
    steer: CopySteer | None = None
    max_new_tokens: int | None = None
    plan: FusionPlan | None = None
    clarification: Clarification | None = None

    def finish(self, text: str) -> str:
        return finish(text, self.plan) if self.plan is not None else text


class Fuser:
    def __init__(self, settings: FusionConfig, clarify: ClarifySettings, tokenizer, stop_ids: list[int]):
        self.settings, self.clarify = settings, clarify
        self.tokenizer, self.stop_ids = tokenizer, list(stop_ids)

    def prepare(self, question: str, drafts: list[tuple[str, str]], clarify: bool = False) -> Fusion:
        """The fusion of these drafts (`clarify`: ask a question instead when they disagree)."""
        if clarify and (asked := clarify_drafts(drafts, self.clarify)) is not None:
            return Fusion(clarification=asked)
        prompt = summarizer_prompt(question, drafts)
        if not self.settings.constrained:
            return Fusion(prompt)
        plan = plan_fusion(question, drafts, self.settings.answer_words, self.settings.salient_terms)
        steer = make_steer(plan, self.tokenizer, self.stop_ids, self.settings.copy_bias, self.settings.stop)
        return Fusion(prompt, steer, max_answer_tokens(steer), plan)
