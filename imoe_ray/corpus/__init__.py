"""The corpus: reading any supported source, chunking by encoder tokens (`chunking`), and the sample corpus."""

from imoe_ray.corpus.readers import CorpusError, read_corpus_dataset, read_corpus_table

__all__ = ["CorpusError", "read_corpus_dataset", "read_corpus_table"]
