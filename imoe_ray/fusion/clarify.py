"""When to answer with a clarifying question instead of an answer, and which question.

Two measurable signals:
- **the drafts disagree**: the mean pairwise Jensen-Shannon divergence (base 2: 0 when two drafts use
  the same words in the same proportions, 1 when they share none) of the drafts' content-word
  distributions exceeds a threshold, or their directives contradict each other (a term one draft
  requires and another forbids; a minimum length above another's maximum);
- **the route is a near tie on a short query**: the router's two most probable experts differ by at
  most a margin and the query has at most a few words, so the question itself does not say which
  reading is meant.

Either way the answer is a question that names the candidate interpretations (`Clarification`), and
the response carries it as `imoe.clarification = {question, options}`.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass

from imoe_ray.fusion.constrained import DraftReading, read_draft
from imoe_ray.fusion.summarizer import STOP_WORDS, clip_words

_TOKEN = re.compile(r"[a-z0-9_]+")
BASE = "base"


@dataclass
class ClarifySettings:
    """The rule's thresholds (`serve.clarify*` in the config)."""
    enabled: bool = False
    divergence: float = 0.9
    tie_margin: float = 0.1
    query_words: int = 6

    @classmethod
    def from_config(cls, serve) -> "ClarifySettings":
        return cls(serve.clarify, serve.clarify_divergence, serve.clarify_tie_margin, serve.clarify_query_words)


@dataclass
class Clarification:
    question: str
    options: list[str]
    reason: str          # "drafts_disagree", "contradictory_directives" or "near_tie"
    score: float         # the divergence, or the probability gap of the tie

    def to_json(self) -> dict:
        return asdict(self)


def content_words(text: str) -> Counter:
    """The words of a text that carry content (no stop words, none shorter than four letters)."""
    return Counter(w for w in _TOKEN.findall(text.lower()) if len(w) > 3 and w not in STOP_WORDS)


def js_divergence(a: Counter, b: Counter) -> float:
    """Jensen-Shannon divergence, base 2, of two word-count distributions (0 ≤ JSD ≤ 1)."""
    na, nb = sum(a.values()), sum(b.values())
    if not na or not nb:
        return 0.0
    total = 0.0
    for w in set(a) | set(b):
        p, q = a[w] / na, b[w] / nb
        m = (p + q) / 2
        total += (p * math.log2(p / m) if p else 0.0) + (q * math.log2(q / m) if q else 0.0)
    return max(0.0, min(1.0, total / 2))


def draft_divergence(contents: list[str]) -> float:
    """Mean pairwise JSD of the contents that have words (0 with fewer than two)."""
    counts = [c for c in (content_words(t) for t in contents) if c]
    pairs = list(itertools.combinations(counts, 2))
    return sum(js_divergence(a, b) for a, b in pairs) / len(pairs) if pairs else 0.0


def contradictions(readings: list[DraftReading]) -> list[str]:
    """The directives that cannot all hold, one line each."""
    out = []
    for a, b in itertools.permutations(readings, 2):
        for term in a.directives.terms:
            if any(term.lower() == f.lower() for f in b.directives.forbidden):
                out.append(f"{a.expert} asks to mention {term}, {b.expert} asks not to")
        lo, hi = a.directives.min_words, b.directives.max_words
        if lo is not None and hi is not None and lo > hi:
            out.append(f"{a.expert} asks for at least {lo} words, {b.expert} for at most {hi}")
    return out


def clarify_drafts(drafts: list[tuple[str, str]], settings: ClarifySettings) -> Clarification | None:
    """A clarifying question when the experts' drafts disagree beyond `settings.divergence` or their
    directives contradict each other; None otherwise."""
    readings = [read_draft(name, text) for name, text in drafts]
    conflicts = contradictions(readings)
    if conflicts:
        return Clarification("The experts' instructions contradict each other: " + "; ".join(conflicts)
                             + ". Which should the answer follow?", conflicts, "contradictory_directives", 1.0)
    with_content = [r for r in readings if content_words(r.content)]
    divergence = draft_divergence([r.content for r in with_content])
    if len(with_content) < 2 or divergence <= settings.divergence:
        return None
    options = [f"{r.expert}: {clip_words(' '.join(r.content.split()), 12)}" for r in with_content]
    names = " or ".join(r.expert for r in with_content)
    return Clarification(f"Your question can be read in different ways ({names}). Which one do you mean?",
                         options, "drafts_disagree", round(divergence, 4))


def clarify_route(query: str, prior: dict[str, float], settings: ClarifySettings) -> Clarification | None:
    """A clarifying question when the two most probable experts (`prior`: expert → probability) are
    within `settings.tie_margin` of each other on a query of at most `settings.query_words` words."""
    ranked = sorted(((p, e) for e, p in prior.items() if e != BASE), key=lambda pe: (-pe[0], pe[1]))
    if len(ranked) < 2 or len(query.split()) > settings.query_words:
        return None
    (p1, first), (p2, second) = ranked[:2]
    gap = p1 - p2
    if p1 <= 0 or gap > settings.tie_margin:
        return None
    tied = [e for p, e in ranked if p1 - p <= settings.tie_margin]
    return Clarification(f"Do you mean {' or '.join(tied)}? Your question fits {len(tied)} topics about equally "
                         f"well; say which one, or add a few words.", tied, "near_tie", round(gap, 4))
