"""Fusion that obeys every draft by construction: read the drafts, plan the answer, then let the
summarizer fill it in under a copy constraint.

The embedded base LM is too small to learn copying, so nothing here depends on it:
- `read_draft` splits a draft into *directives* (sentences that constrain the answer: "mention X and
  Y", "use 'X'", "at most N words", "do not mention Z") and *content* (everything else);
- `plan_fusion` gathers what every draft requires: the directives' terms and length bounds, and, from
  each content draft after the first, its most specific words (so the answer carries something of
  every expert that wrote text); the content drafts, clipped to the word budget (and before any
  forbidden term), are what the answer copies; required terms that no clipped content contains
  form the answer's head ("X and Y:");
- `CopySteer` is applied at every decoding step of the summarizer: the head's tokens are forced,
  then the next token must continue one of the content drafts where the answer has copied so far
  (or, with a finite `bias`, is pushed that way, and the summarizer may bridge with its own words);
  the answer may end once every required term the copied draft holds is in, where `stop` allows:
  at the word budget (default), at a sentence's end, or at any word's end (the summarizer's choice).
  The summarizer adapter decides which draft to follow, and with `stop` = sentence or model where to
  end; `finish` cuts the text to the length bound, which hard copying never exceeds anyway.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from imoe_ray.fusion.summarizer import ANSWER, candidate_terms, clip_words, has_term

_SENTENCE = re.compile(r"(?<=[.!?;])\s+|\n+")
_NUMBER = r"(\d{1,4}|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|fifteen|twenty|thirty|fifty)"
_NUMBERS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve".split())}
_NUMBERS |= {"fifteen": 15, "twenty": 20, "thirty": 30, "fifty": 50}
_MAX_WORDS = [re.compile(p, re.IGNORECASE) for p in (
    rf"\b(?:at most|no more than|not more than|up to|under|fewer than|less than|maximum of|max(?:imum)?\.?|within|"
    rf"keep it to|limit it to|in)\s+{_NUMBER}\s+words?\b",
    rf"\b{_NUMBER}\s+words?\s+(?:or fewer|or less|at most|max(?:imum)?)\b")]
_MIN_WORDS = [re.compile(p, re.IGNORECASE) for p in (
    rf"\b(?:at least|no fewer than|no less than|not less than|more than|minimum of)\s+{_NUMBER}\s+words?\b",
    rf"\b{_NUMBER}\s+words?\s+(?:or more|at least|min(?:imum)?)\b")]
_REQUIRE = re.compile(r"\b(?:mention|mentions|include|includes|use|uses|name|names|cite|cites|contain|contains|"
                      r"cover|covers|discuss|reference|say|state|add|with the (?:words?|terms?))\b\s+(.+)", re.IGNORECASE)
_FORBID = re.compile(r"^(?:please\s+)?(?:(?:do not|don't|never)\s+(?:mention|use|include|say|write)|"
                     r"avoid(?:\s+(?:mentioning|using|saying|the words?|the terms?))?)\b\s*(.+)", re.IGNORECASE)
_QUOTED = re.compile(r"[\"'`\u201c\u2018]([^\"'`\u201d\u2019]{1,40})[\"'`\u201d\u2019]")
_LIST_SPLIT = re.compile(r"\s*(?:,|\band\b|&|\bas well as\b|\bplus\b)\s*", re.IGNORECASE)
_LEADS = frozenset(("please", "you must", "must", "the answer must", "the answer should", "be sure to",
                    "make sure to", "remember to", "also", "and"))  # what may come before a directive's verb
_FILLER = frozenset("the a an words word terms term both also please it its".split())


def _number(text: str) -> int:
    return int(text) if text.isdigit() else _NUMBERS[text.lower()]


@dataclass
class Directives:
    """What one draft asks of the answer."""
    terms: list[str] = field(default_factory=list)       # words or phrases the answer must contain
    forbidden: list[str] = field(default_factory=list)   # words or phrases it must not contain
    max_words: int | None = None
    min_words: int | None = None

    def __bool__(self) -> bool:
        return bool(self.terms or self.forbidden or self.max_words is not None or self.min_words is not None)


@dataclass
class DraftReading:
    expert: str
    text: str
    content: str             # the draft without its directive sentences
    directives: Directives


def _listed(text: str) -> list[str]:
    """The items of "X, Y and Z" (a list ends at its sentence's end or at a length clause)."""
    text = re.split(r"\b(?:at most|at least|in at|no more|no fewer|in \d+|within)\b", text, flags=re.IGNORECASE)[0]
    out = []
    for item in _LIST_SPLIT.split(text.strip().rstrip(".!?;:")):
        words = [w.strip(".,;:()[]{}'\"`*!?") for w in item.split()]
        words = [w for w in words if w and w.lower() not in _FILLER]
        if 1 <= len(words) <= 3:
            out.append(" ".join(words))
    return out


def read_draft(expert: str, text: str) -> DraftReading:
    """Split a draft into its directives and its content (a directive is a sentence that asks for a
    term, forbids one, or bounds the answer's length; everything else is content)."""
    directives, content = Directives(), []
    for sentence in (s.strip() for s in _SENTENCE.split(text or "")):
        if not sentence:
            continue
        found = False
        for pattern in _MAX_WORDS:
            if m := pattern.search(sentence):
                bound = _number(m.group(1))
                directives.max_words = bound if directives.max_words is None else min(directives.max_words, bound)
                found = True
        for pattern in _MIN_WORDS:
            if m := pattern.search(sentence):
                bound = _number(m.group(1))
                directives.min_words = bound if directives.min_words is None else max(directives.min_words, bound)
                found = True
        if m := _FORBID.match(sentence):
            items = _QUOTED.findall(sentence) or _listed(m.group(1))
            if items:
                directives.forbidden += [t for t in items if t not in directives.forbidden]
                found = True
        elif m := _REQUIRE.search(sentence):
            items = _QUOTED.findall(sentence) or _listed(m.group(1))
            before = sentence[:m.start()].strip().lower().rstrip(",:")
            if items and (not before or found or before.endswith((" and", ",")) or before in _LEADS):
                directives.terms += [t for t in items if t not in directives.terms]
                found = True
        if not found:
            content.append(sentence)
    return DraftReading(expert, text, " ".join(content), directives)


def salient_terms(text: str, exclude: set[str], k: int) -> list[str]:
    """The `k` most specific plain words of a text (longest first, then earliest), none in `exclude`."""
    words = candidate_terms(text, {w.lower() for w in exclude})
    ranked = sorted(range(len(words)), key=lambda i: (-len(words[i]), i))[:k]
    return [words[i] for i in sorted(ranked)]


@dataclass
class FusionPlan:
    """What the fused answer must do, and what it is built from."""
    required: list[str]             # every term some draft requires (directives, then salient words)
    forbidden: list[str]
    max_words: int | None           # the tightest length bound of any draft (None: none stated)
    head: list[str]                 # required terms no clipped source contains: the answer starts with them
    sources: list[str]              # content drafts, clipped to the words left after the head
    readings: list[DraftReading]

    @property
    def head_text(self) -> str:
        return f"{' and '.join(self.head)}:" if self.head else ""

    def to_json(self) -> dict:
        return {"required": self.required, "forbidden": self.forbidden, "max_words": self.max_words,
                "head": self.head, "sources": self.sources}


def _words_of(text: str) -> set[str]:
    return {w.strip(".,;:()[]{}'\"`*!?").lower() for w in text.split()}


def _before_forbidden(text: str, forbidden: list[str]) -> str:
    """The text up to its first forbidden term (a source is copied from its start)."""
    words = text.split()
    for i in range(len(words)):
        if any(has_term(" ".join(words[i:i + len(f.split())]), f) for f in forbidden):
            return " ".join(words[:i])
    return text


def plan_fusion(question: str, drafts: list[tuple[str, str]], answer_words: int = 14,
                salient: int = 1) -> FusionPlan:
    """The plan of one fused answer from the drafts alone: `answer_words` is its length when no draft
    bounds it, `salient` how many specific words of each content draft after the first are required."""
    readings = [read_draft(name, text) for name, text in drafts]
    required: list[str] = []
    forbidden: list[str] = []
    bounds = [r.directives.max_words for r in readings if r.directives.max_words is not None]
    for r in readings:
        required += [t for t in r.directives.terms if t.lower() not in {x.lower() for x in required}]
        forbidden += [t for t in r.directives.forbidden if t not in forbidden]
    contents = [_before_forbidden(r.content, forbidden) for r in readings if r.content.strip()]
    for extra in contents[1:] if salient > 0 else []:
        seen = _words_of(question) | _words_of(contents[0]) | {t.lower() for t in required + forbidden}
        required += salient_terms(extra, seen, salient)
    required = [t for t in required if not any(t.lower() == f.lower() for f in forbidden)]
    max_words = min(bounds) if bounds else None
    budget = max_words if max_words is not None else answer_words
    head = [t for t in required if not any(has_term(clip_words(c, budget), t) for c in contents)]
    head_words = len(f"{' and '.join(head)}:".split()) if head else 0
    left = max(0, budget - head_words)
    sources = [clip_words(c, left) for c in contents] if left else []
    return FusionPlan(required, forbidden, max_words, head, [s for s in sources if s], readings)


def finish(text: str, plan: FusionPlan) -> str:
    """The generated answer cut to the plan's length bound."""
    text = " ".join(text.split())
    return clip_words(text, plan.max_words) if plan.max_words is not None else text


class CopySteer:
    """A per-request decoding constraint (the decoder calls `adjust` on each step's log-probabilities,
    then `advance` with the token it picked): the forced head, then copying from the sources.

    `bias=None` copies by construction (only a source's next token, or the end, can be picked); a
    number is added to the copy candidates' log-probabilities instead, so the model may insert its own
    tokens, after which copying resumes where it left off."""

    def __init__(self, forced: list[int], sources: list[list[int]], stop_ids: list[int],
                 ends: list[list[int]] | None = None, bias: float | None = None):
        self.forced, self.sources, self.stop_ids = list(forced), [list(s) for s in sources], list(stop_ids)
        # per source, after how many copied tokens the answer may end (word ends past the required terms)
        self.ends = [set(e) for e in ends] if ends is not None else [set(range(len(s) + 1)) for s in self.sources]
        self.bias = bias
        self._emitted = 0
        self._pointers: set[tuple[int, int]] = {(s, 0) for s in range(len(self.sources))}

    @property
    def forcing(self) -> bool:
        return self._emitted < len(self.forced)

    def candidates(self) -> tuple[set[int], bool]:
        """The tokens that continue a source, and whether the answer may end now."""
        if self.forcing:
            return {self.forced[self._emitted]}, False
        tokens = {self.sources[s][p] for s, p in self._pointers if p < len(self.sources[s])}
        may_end = not self.sources or any(p in self.ends[s] for s, p in self._pointers) or not self._pointers
        return tokens, may_end or not tokens

    def adjust(self, logprobs: torch.Tensor) -> torch.Tensor:
        """This step's log-probabilities under the constraint (renormalised)."""
        tokens, may_end = self.candidates()
        if not self.forcing and not self.sources:
            return logprobs  # nothing to copy: the summarizer writes the rest itself
        vocab = logprobs.shape[-1]
        ids = torch.tensor(sorted(t for t in tokens if 0 <= t < vocab), dtype=torch.long)
        stops = torch.tensor([t for t in self.stop_ids if 0 <= t < vocab], dtype=torch.long)
        if self.bias is None or self.forcing:
            out = torch.full_like(logprobs, -math.inf)
            out[ids] = logprobs[ids]
            if may_end and len(stops):
                out[stops] = logprobs[stops]
            if not torch.isfinite(out).any():  # every allowed token had probability 0: take them evenly
                out[ids] = 0.0
        else:
            out = logprobs.clone()
            out[ids] += self.bias
            if len(stops):  # the end is a candidate like the copy tokens once allowed
                out[stops] = out[stops] + self.bias if may_end else -math.inf
        return torch.log_softmax(out, dim=-1)

    def advance(self, token: int) -> None:
        if self.forcing:
            self._emitted += 1
            return
        moved = {(s, p + 1) for s, p in self._pointers if p < len(self.sources[s]) and self.sources[s][p] == token}
        if moved:
            self._pointers = moved
        # a token of the model's own (soft copying): the pointers stay, copying resumes there


STOPS = ("budget", "sentence", "model")


def _ends(tokenizer, ids: list[int], terms: list[str], stop: str = "budget") -> list[int]:
    """After how many of a source's tokens the answer may end: `budget`: only at the end of the
    (clipped) source; `sentence`: also at a sentence's end; `model`: at any word's end (where the
    summarizer ends it); never before every required term the source holds has been copied."""
    if stop not in STOPS:
        raise ValueError(f"stop must be one of {STOPS}, not {stop!r}")
    text = tokenizer.decode(ids)
    need = max((m.end() for t in terms if (m := _term_re(t).search(text))), default=0)
    out = []
    for p in range(1, len(ids) + 1):
        current = tokenizer.decode(ids[:p])
        word_end = p == len(ids) or tokenizer.decode(ids[:p + 1])[len(current):][:1].isspace()
        allowed = p == len(ids) or (stop == "model" and word_end) or \
            (stop == "sentence" and word_end and current.rstrip().endswith((".", "!", "?")))
        if allowed and len(current) >= need:
            out.append(p)
    return out


def _term_re(term: str) -> re.Pattern:
    return re.compile(rf"(?<![A-Za-z0-9_]){re.escape(term)}(?![A-Za-z0-9_])", re.IGNORECASE)


def make_steer(plan: FusionPlan, tokenizer, stop_ids: list[int], bias: float | None = None,
               stop: str = "budget") -> CopySteer:
    """The decoding constraint that realises a plan with this tokenizer (the answer follows the
    prompt's `Answer:` after a space, as the summarizer was trained); `stop`: where it may end (`_ends`)."""
    forced = tokenizer(" " + plan.head_text, add_special_tokens=False)["input_ids"] if plan.head else []
    sources = [tokenizer(" " + s, add_special_tokens=False)["input_ids"] for s in plan.sources]
    return CopySteer(forced, sources, stop_ids, [_ends(tokenizer, s, plan.required, stop) for s in sources], bias)


def max_answer_tokens(steer: CopySteer, slack: int = 8) -> int:
    """Enough new tokens for the head and the longest source (and a few bridge tokens when soft)."""
    longest = max((len(s) for s in steer.sources), default=0)
    return len(steer.forced) + longest + (slack if steer.bias is not None or not steer.sources else 1)


__all__ = ["ANSWER", "CopySteer", "Directives", "DraftReading", "FusionPlan", "finish", "make_steer",
           "max_answer_tokens", "plan_fusion", "read_draft", "salient_terms"]
