"""What both compressors share: word units, the question's key terms, and the result."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

WORD = re.compile(r"\S+")
_CORE = re.compile(r"[\W_]+")


def norm(word: str) -> str:
    """A word without punctuation, lower case ("Arrays," → "arrays")."""
    return _CORE.sub("", word.lower())


def key_terms(question: str) -> set[str]:
    """The question's content words (not stop words, not bare punctuation): never dropped."""
    return {w for w in (norm(x) for x in WORD.findall(question)) if len(w) >= 2 and w not in ENGLISH_STOP_WORDS}


def protected(word: str, keys: set[str]) -> bool:
    core = norm(word)
    return bool(core) and (core in keys or any(k in core for k in keys if len(k) >= 4))


@dataclass
class Compressed:
    """A compressed prompt: the question and the passages, with the token counts before and after."""
    question: str
    passages: list[str]
    original_tokens: int
    compressed_tokens: int
    kept_terms: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.original_tokens / max(self.compressed_tokens, 1)

    @property
    def context(self) -> str:
        return "\n".join(p for p in self.passages if p)


def count_tokens(tokenizer) -> Callable[[list[str]], int]:
    """Tokens of some texts under a Hugging Face tokenizer (what the prompt costs the model)."""
    def count(texts: list[str]) -> int:
        texts = [t for t in texts if t]
        return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else 0
    return count
