"""The corpus: reading any supported source, chunking by encoder tokens, and the sample corpus."""

from imoe_ray.corpus.chunking import Chunker, chunk_table
from imoe_ray.corpus.readers import CorpusError, read_corpus_dataset, read_corpus_table

__all__ = ["Chunker", "CorpusError", "chunk_table", "read_corpus_dataset", "read_corpus_table"]
