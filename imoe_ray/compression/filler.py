"""The baseline compressor: drop filler and stop words only (no model), never the question's key terms."""

from __future__ import annotations

from typing import Callable

from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from imoe_ray.compression.units import WORD, Compressed, key_terms, norm, protected

FILLER = frozenset({"basically", "actually", "really", "just", "simply", "quite", "rather", "very", "please", "kindly",
                    "literally", "essentially", "generally", "certainly", "perhaps", "maybe", "like", "so", "well"})


def drop_filler(text: str, keys: set[str]) -> str:
    kept = [w for w in WORD.findall(text)
            if protected(w, keys) or not (norm(w) in ENGLISH_STOP_WORDS or norm(w) in FILLER)]
    return " ".join(kept)


class FillerCompressor:
    """Stop-word and filler-word removal; its ratio is whatever the text gives."""

    def __init__(self, count: Callable[[list[str]], int]):
        self.count = count

    def reduce(self, question: str, passages: list[str], ratio: float | None = None,
               budget_tokens: int | None = None, keys: set[str] | None = None) -> Compressed:
        keys = key_terms(question) if keys is None else keys
        out_q, out_p = drop_filler(question, keys), [drop_filler(p, keys) for p in passages]
        return Compressed(out_q, out_p, self.count([question, *passages]), self.count([out_q, *out_p]), sorted(keys))
