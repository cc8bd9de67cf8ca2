"""Training text for the base model and each expert, and the token blocks the train loop reads."""

from __future__ import annotations

import numpy as np

IGNORE = -100  # label of padding: no loss


def token_blocks(texts: list[str], tokenizer, seq_len: int, min_tail: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Pack the texts (each followed by EOS) into blocks of `seq_len` tokens: (input_ids, labels).

    A final partial block of at least `min_tail` tokens is kept, padded with labels set to IGNORE.
    """
    ids: list[int] = []
    for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    n_full, tail = divmod(len(ids), seq_len)
    flat = np.asarray(ids, dtype=np.int64)
    inputs = flat[: n_full * seq_len].reshape(n_full, seq_len)
    labels = inputs.copy()
    if tail >= min_tail or n_full == 0 and tail:
        pad = seq_len - tail
        last = np.concatenate([flat[n_full * seq_len:], np.full(pad, tokenizer.pad_token_id)])
        last_labels = np.concatenate([flat[n_full * seq_len:], np.full(pad, IGNORE)])
        inputs, labels = np.vstack([inputs, last]), np.vstack([labels, last_labels])
    return inputs, labels


def count_tokens(labels: np.ndarray) -> int:
    return int((labels != IGNORE).sum())
