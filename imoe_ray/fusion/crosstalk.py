"""Cross-talk (t_CT): experts whose categories are all strongly selected read each other before fusion.

    route: categories c_1..c_n above t_C, probabilities p_i
    strong = the experts of the categories with p_i >= t_CT        (at least two, else no cross-talk)
    round 1: every expert of the plan drafts from the prompt        (as without cross-talk)
    round 2: each strong expert drafts again, the other strong experts' first drafts in context
             ([name] draft lines before the prompt, together at most `budget_tokens` tokens)
    fusion:  the summarizer reads the second-round drafts (the weaker experts keep their first one)

One round only, so the cost is bounded: one more draft per strong expert, each prompt longer by at
most `budget_tokens`. Cross-talk needs drafts, so it applies where the summarizer fuses them.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Protocol

from imoe_ray.store.layout import BASE


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


def cross_talk_experts(categories: list[str], probabilities: list[float], experts: list[str], t_ct: float,
                       served_by: dict[str, str] | None = None) -> list[str]:
    """The plan's experts whose categories' probability reaches `t_ct`, most probable first, when at
    least two distinct experts do (a category folded into another adds to the expert serving it);
    [] otherwise."""
    served_by = served_by or {}
    prior: dict[str, float] = {}
    for category, p in zip(categories, probabilities):
        expert = served_by.get(category, category)
        prior[expert] = prior.get(expert, 0.0) + p
    strong = sorted((e for e, p in prior.items() if p >= t_ct and e in experts and e != BASE),
                    key=lambda e: -prior[e])
    return strong if len(strong) >= 2 else []


def clip_tokens(text: str, n: int, tokenizer: Tokenizer) -> str:
    """The text's first `n` tokens (whitespace collapsed); the text itself when it is shorter."""
    text = " ".join(text.split())
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) <= n:
        return text
    return tokenizer.decode(ids[:max(0, n)], skip_special_tokens=True).strip()


def cross_talk_prompt(prompt: str, others: list[tuple[str, str]], tokenizer: Tokenizer, budget_tokens: int) -> str:
    """One expert's second-round prompt: the other experts' drafts as `[name] draft` lines, together
    within `budget_tokens` tokens of `tokenizer` (each draft gets an equal share), then the prompt."""
    if not others:
        return prompt
    share = max(1, budget_tokens // len(others))
    while share > 0:  # tokens of the joined lines may differ from their sum: shrink until they fit
        block = _context(others, share, tokenizer)
        if len(tokenizer.encode(block, add_special_tokens=False)) <= budget_tokens:
            return f"{block}\n\n{prompt}" if block else prompt
        share -= 1
    return prompt


def _context(others: list[tuple[str, str]], share: int, tokenizer: Tokenizer) -> str:
    lines = []
    for name, draft in others:
        head = f"[{name}] "
        room = share - len(tokenizer.encode(head, add_special_tokens=False))
        text = clip_tokens(draft, room, tokenizer) if room > 0 else ""
        if text:
            lines.append(head + text)
    return "\n".join(lines)


def second_round(prompt: str, drafts: dict[str, str], strong: list[str], tokenizer: Tokenizer,
                 budget_tokens: int) -> dict[str, str]:
    """Each strong expert's second-round prompt (expert → prompt), reading the other strong experts'
    first drafts."""
    return {name: cross_talk_prompt(prompt, [(o, drafts[o]) for o in strong if o != name and o in drafts],
                                    tokenizer, budget_tokens)
            for name in strong if name in drafts}


async def cross_talk_round(prompt: str, drafts: dict[str, str], strong: list[str], tokenizer: Tokenizer,
                           budget_tokens: int, redraft: Callable[[str, str], Awaitable[str]]) -> dict[str, str]:
    """The drafts after one round of cross-talk: every strong expert drafts again, together, from its
    second-round prompt (`redraft(expert, prompt)` decodes one draft); the others keep their first."""
    prompts = second_round(prompt, drafts, strong, tokenizer, budget_tokens)
    again = await asyncio.gather(*[redraft(name, p) for name, p in prompts.items()])
    return {**drafts, **dict(zip(prompts, again))}
