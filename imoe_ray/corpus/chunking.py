"""Chunking by encoder tokens with overlap; every chunk is an exact substring of its document.

The window leaves room for the encoder's special tokens, so the encoder never truncates a chunk.
The last window of a long document is aligned to the document's end (it overlaps its neighbour
more), so there are no tiny trailing chunks.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from transformers import AutoTokenizer

from imoe_ray.config import DEFAULT_ENCODER
from imoe_ray.embedding.encoder import resolve_encoder_path


def window_starts(n_tokens: int, window: int, stride: int) -> list[int]:
    """Token offsets at which chunks start: every `stride`, the last one aligned to the end."""
    if n_tokens <= window:
        return [0]
    starts = list(range(0, n_tokens - window, stride))
    starts.append(n_tokens - window)
    return starts


class Chunker:
    """Splits documents into chunks; usable directly or as a Ray Data `map_batches` class."""

    def __init__(self, encoder: str = DEFAULT_ENCODER, text_column: str = "text", chunk_tokens: int = 256,
                 overlap: int = 32, min_chunk_tokens: int = 8):
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_encoder_path(encoder))
        self.tokenizer.model_max_length = 1 << 30  # we split long texts ourselves; silence the length warning
        self.text_column = text_column
        self.window = max(min_chunk_tokens, chunk_tokens - self.tokenizer.num_special_tokens_to_add(pair=False))
        self.stride = max(1, self.window - overlap)

    def spans(self, text: str, offsets: list[tuple[int, int]]) -> list[tuple[str, int]]:
        """(chunk text, token count) for one document."""
        n = len(offsets)
        if n <= self.window:
            return [(text, n)]
        out = []
        for start in window_starts(n, self.window, self.stride):
            end = min(n, start + self.window)
            out.append((text[offsets[start][0]:offsets[end - 1][1]], end - start))
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column(self.text_column).to_pylist()
        encoded = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True,
                                 return_attention_mask=False, return_token_type_ids=False)
        rows, chunk_texts, counts, index = [], [], [], []
        for row, (text, offsets) in enumerate(zip(texts, encoded["offset_mapping"])):
            for k, (chunk, n) in enumerate(self.spans(text, offsets)):
                rows.append(row)
                chunk_texts.append(chunk)
                counts.append(n)
                index.append(k)
        taken = batch.take(pa.array(np.asarray(rows, dtype=np.int64)))
        ids = taken.column("id").to_pylist()
        others = [c for c in batch.column_names if c not in ("id", self.text_column)]
        return pa.table({
            "chunk_id": pa.array([f"{i}#{k}" for i, k in zip(ids, index)], pa.string()),
            "id": taken.column("id"),
            "chunk_index": pa.array(index, pa.int32()),
            self.text_column: pa.array(chunk_texts, pa.string()),
            "n_tokens": pa.array(counts, pa.int32()),
            **{c: taken.column(c) for c in others},
        })


def chunk_table(table: pa.Table, encoder: str = DEFAULT_ENCODER, text_column: str = "text", chunk_tokens: int = 256,
                overlap: int = 32, min_chunk_tokens: int = 8) -> pa.Table:
    """Chunk a whole table in this process (the library form of the ingest stage)."""
    return Chunker(encoder, text_column, chunk_tokens, overlap, min_chunk_tokens)(table)
