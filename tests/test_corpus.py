"""Reading every corpus format, chunking by encoder tokens, and the sample corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imoe_ray.corpus import CorpusError, read_corpus_table
from imoe_ray.corpus.chunking import Chunker, chunk_table, window_starts
from imoe_ray.corpus.sample import build_sample_corpus

ROWS = [{"id": i, "text": f"document number {i} about topic {i % 3}", "domain": f"d{i % 3}", "score": i * 0.5,
         "tags": ["a", str(i)]} for i in range(6)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_keeps_every_column_and_type(tmp_path):
    t = read_corpus_table(write_jsonl(tmp_path / "c.jsonl", ROWS))
    assert t.column_names[0] == "id" and t.column("id").to_pylist() == [str(i) for i in range(6)]
    assert t.column("domain").to_pylist() == [r["domain"] for r in ROWS]
    assert pa.types.is_floating(t.schema.field("score").type) and pa.types.is_list(t.schema.field("tags").type)


def test_parquet_txt_directory_and_hf(tmp_path):
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "c.parquet")
    assert read_corpus_table(tmp_path / "c.parquet").num_rows == 6
    (tmp_path / "one.txt").write_text("first paragraph\n\nsecond paragraph\n")
    assert read_corpus_table(tmp_path / "one.txt").column("text").to_pylist() == ["first paragraph", "second paragraph"]
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("alpha document\n\nstill alpha")
    (d / "sub" / "b.txt").write_text("beta document")
    t = read_corpus_table(d)
    assert t.column("text").to_pylist() == ["alpha document\n\nstill alpha", "beta document"]
    assert t.column("source_file").to_pylist() == ["a.txt", "sub/b.txt"]
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "hf"))
    hf = read_corpus_table(tmp_path / "hf")
    assert hf.num_rows == 6 and hf.column("domain").to_pylist() == [r["domain"] for r in ROWS]


def test_generated_ids_are_stable_and_unique(tmp_path):
    rows = [{"text": "same"}, {"text": "same"}, {"text": "other"}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    a, b = read_corpus_table(path, id_column=None), read_corpus_table(path)
    assert a.column("id").to_pylist() == b.column("id").to_pylist()
    assert len(set(a.column("id").to_pylist())) == 3


@pytest.mark.parametrize("content, kwargs, needle", [
    (b"", {}, "empty"),
    (b'{"text": ""}\n{"text": "  "}\n', {}, "empty"),
    (b'{"body": "x"}\n', {}, "text column 'text'"),
    (b'{"text": "x"}\n{"text": \n', {}, "c.jsonl:2"),
    (b'{"text": "ok"}\n{"text": "\xff\xfe"}\n', {}, "undecodable"),
    (b'{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n', {}, "duplicates"),
    (b'{"text": "a"}\n', {"id_column": "doc"}, "id column 'doc'"),
    (b'{"text": 5}\n', {}, "not text"),
])
def test_bad_corpora_get_clear_errors(tmp_path, content, kwargs, needle):
    path = tmp_path / "c.jsonl"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=needle):
        read_corpus_table(path, **kwargs)


def test_missing_and_unsupported(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        read_corpus_table(tmp_path / "missing.jsonl")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.csv").write_text("a,b")
    with pytest.raises(CorpusError, match="no corpus files"):
        read_corpus_table(tmp_path / "d")


def test_window_starts_cover_everything():
    assert window_starts(10, 20, 15) == [0]
    starts = window_starts(100, 30, 25)
    assert starts[0] == 0 and starts[-1] == 70 and all(b - a <= 25 for a, b in zip(starts, starts[1:]))


def test_chunks_are_exact_substrings_within_the_encoder_limit():
    long = " ".join(f"sentence {i} talks about gradients and tensors." for i in range(120))
    table = pa.table({"id": ["short", "long"], "text": ["a short text", long], "domain": ["x", "y"]})
    chunker = Chunker(chunk_tokens=64, overlap=16)
    chunks = chunker(table)
    assert chunks.column_names[:5] == ["chunk_id", "id", "chunk_index", "text", "n_tokens"]
    rows = chunks.to_pylist()
    assert rows[0]["text"] == "a short text" and rows[0]["chunk_id"] == "short#0"
    long_rows = [r for r in rows if r["id"] == "long"]
    assert len(long_rows) > 5 and all(r["domain"] == "y" for r in long_rows)
    for r in long_rows:
        assert r["text"] in long
        assert len(chunker.tokenizer(r["text"])["input_ids"]) <= 64  # special tokens included
    first, second = long_rows[0]["text"], long_rows[1]["text"]
    assert first[-20:] in second  # neighbours overlap
    assert chunk_table(table, chunk_tokens=64, overlap=16).equals(chunks)


def test_sample_corpus_is_real_multi_domain_text(tmp_path):
    a = build_sample_corpus(tmp_path / "a.jsonl", per_domain=8, seed=3)
    b = build_sample_corpus(tmp_path / "b.jsonl", per_domain=8, seed=3)
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    rows = [json.loads(l) for l in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len({r["domain"] for r in rows}) >= 10 and a["rows"] == len(rows) == b["rows"]
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert 80 <= len(r["text"].split()) <= 160
        assert ">>>" not in r["text"] and "imoe" not in r["source"]
    p = build_sample_corpus(tmp_path / "c.parquet", per_domain=2)
    assert pq.read_table(p["path"]).num_rows == p["rows"]


def test_actor_plan_uses_gpus_when_present():
    from imoe_ray.config import EmbeddingConfig
    from imoe_ray.embedding.ray_embed import plan_actors

    gpu = plan_actors(EmbeddingConfig(), {"CPU": 16, "GPU": 4})
    assert (gpu.concurrency, gpu.num_gpus) == (4, 1)
    cpu = plan_actors(EmbeddingConfig(), {"CPU": 2})
    assert cpu.num_gpus == 0 and cpu.concurrency == 2 and cpu.num_threads == 1
