"""Reading every corpus format, chunking by encoder tokens, and the sample corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imoe_ray.corpus import CorpusError, read_corpus_table
from imoe_ray.corpus.readers import inspect_corpus
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
    cluster = plan_actors(EmbeddingConfig(), {"CPU": 4})
    assert cluster.concurrency == 3, "one CPU stays free for the tasks that feed the pool"


# ------------------------------------------------------------------ the corpus read where it lies, on Ray Data

def _ingest(corpus: str, store: Path, *overrides: str, **settings) -> tuple[dict, pa.Table]:
    """The ingest stage on the session's cluster: (its metrics, the chunks it wrote)."""
    from imoe_ray.config import load_config
    from imoe_ray.corpus import stage
    from imoe_ray.store import Store

    cfg = load_config(None, list(overrides), store=str(store), corpus__path=corpus, **settings)
    metrics = stage.run(Store(cfg.store), cfg, False, report=lambda m: None)
    return metrics, pq.read_table(store / "corpus" / "chunks")


def _mixed_directory(root: Path) -> Path:
    """JSON lines, Parquet in a subfolder and a text file; one text repeats."""
    (root / "sub").mkdir(parents=True)
    repeated = [{"id": 90 + k, "text": "repeated text", "domain": "r", "score": float(k), "tags": [str(k)]} for k in (0, 1)]
    write_jsonl(root / "a.jsonl", ROWS[:1] + repeated[:1] + ROWS[1:4] + repeated[1:])
    pq.write_table(pa.Table.from_pylist(ROWS[4:]), root / "sub" / "b.parquet")
    long = " ".join(f"paragraph {i} explains how streaming readers work." for i in range(80))
    (root / "c.txt").write_text(long)
    (root / ".hidden.jsonl").write_text("not read\n")
    return root


def test_a_mixed_directory_streams_to_the_same_chunks_as_the_table_reader(ray_session, tmp_path):
    corpus = _mixed_directory(tmp_path / "corpus")
    metrics, chunks = _ingest(str(corpus), tmp_path / "store", "corpus.id_column=null", corpus__chunk_tokens=64,
                              corpus__chunk_overlap=8)
    expected = chunk_table(read_corpus_table(corpus, id_column=None), chunk_tokens=64, overlap=8)
    # Files of one kind keep their order; the kinds are interleaved block by block (deterministically).
    assert sorted(chunks.to_pylist(), key=str) == sorted(expected.to_pylist(), key=str)
    assert chunks.schema == expected.schema
    assert metrics["documents"] == 9 and metrics["chunks"] == expected.num_rows > 9
    ids = chunks.filter(pa.compute.equal(chunks.column("chunk_index"), 0)).column("id").to_pylist()
    assert len(set(ids)) == 9
    repeats = chunks.filter(pa.compute.equal(chunks.column("text"), "repeated text"))
    assert [(r["original_id"], r["id"][16:]) for r in repeats.to_pylist()] == [(90, ""), (91, "-1")]
    assert chunks.column("source_file").to_pylist().count("c.txt") == metrics["chunks"] - 8


def test_a_parquet_corpus_through_a_file_uri(ray_session, tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    metrics, chunks = _ingest(path.as_uri(), tmp_path / "store")
    assert chunks.equals(chunk_table(read_corpus_table(path)))
    assert metrics["columns"] == ["id", "text", "domain", "score", "tags"]
    assert chunks.column("id").to_pylist() == [str(r["id"]) for r in ROWS]


def test_chunks_are_unchanged_and_deterministic(ray_session, small_corpus, tmp_path):
    """The streaming ingest writes exactly what chunking the whole table in one process gives."""
    _, first = _ingest(str(small_corpus), tmp_path / "one")
    _, second = _ingest(str(small_corpus), tmp_path / "two")
    assert first.equals(chunk_table(read_corpus_table(small_corpus)))
    assert first.equals(second)


def test_the_fingerprint_comes_from_the_listing(tmp_path):
    import os

    from imoe_ray.config import load_config
    from imoe_ray.corpus.stage import corpus_fingerprint

    corpus = _mixed_directory(tmp_path / "corpus")
    local = load_config(None, [], corpus__path=str(corpus))
    uri = load_config(None, [], corpus__path=corpus.as_uri())
    before = corpus_fingerprint(local), corpus_fingerprint(uri)
    assert before == (corpus_fingerprint(local), corpus_fingerprint(uri)) and before[0] != before[1]
    os.utime(corpus / "c.txt", ns=(1, 1))
    assert corpus_fingerprint(local) != before[0] and corpus_fingerprint(uri) != before[1]


def test_bad_rows_beyond_the_first_file_are_one_clear_error_and_nothing_is_written(ray_session, tmp_path):
    from imoe_ray.corpus.readers import PEEK_BYTES

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", ROWS)
    (corpus / "b.jsonl").write_text('{"id": 100, "text": "fine"}\n{"id": 101, "text": \n')
    store = tmp_path / "store"
    with pytest.raises(CorpusError, match="cannot read corpus") as bad_json:
        _ingest(str(corpus), store)
    assert "\n" not in str(bad_json.value)
    (corpus / "b.jsonl").write_text('{"id": 1, "text": "a second document with id 1"}\n')
    with pytest.raises(CorpusError, match="id column 'id' has duplicates, e.g. '1'"):
        _ingest(str(corpus), store)
    big = tmp_path / "big.jsonl"  # a duplicate id past what the driver peeks at
    write_jsonl(big, [{"id": i, "text": "x" * 200} for i in range(PEEK_BYTES // 200 + 10)] + [{"id": 3, "text": "y"}])
    with pytest.raises(CorpusError, match="duplicates, e.g. '3'"):
        _ingest(str(big), store)
    assert not (store / "corpus" / "chunks").exists() and list((store / "corpus").iterdir()) == []


@pytest.mark.parametrize("corpus, needle", [
    ("{tmp}/missing.jsonl", "corpus not found"),
    ("nosuchscheme://bucket/corpus.jsonl", "unknown URI scheme 'nosuchscheme'"),
    ("{tmp}/nocol.jsonl", "text column 'text' not in"),
    ("{tmp}/bad.jsonl", "bad.jsonl:3: not valid JSON"),
    ("{tmp}/dup.jsonl", "has duplicates, e.g. '7'"),
])
def test_bad_corpora_fail_before_ray_starts(tmp_path, corpus, needle):
    """The build is pointed at a Ray address where nothing listens: the corpus error must come first."""
    import os
    import subprocess
    import sys

    from tests.conftest import free_port

    (tmp_path / "nocol.jsonl").write_text('{"id": 1, "body": "no text here"}\n')
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"\n' + '{"text": "d"}\n' * 50000)
    (tmp_path / "dup.jsonl").write_text('{"id": 7, "text": "a"}\n{"id": 7, "text": "b"}\n')
    store = tmp_path / "store"
    env = dict(os.environ, RAY_ADDRESS=f"127.0.0.1:{free_port()}", COLUMNS="400")  # a long tmp path is not wrapped
    out = subprocess.run([sys.executable, "-m", "imoe_ray.cli", "build", "--corpus", corpus.format(tmp=tmp_path),
                          "--store", str(store), "--until", "ingest"], env=env, capture_output=True, text=True)
    assert out.returncode == 2 and needle in " ".join(out.stderr.split()), out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not (store / "corpus").exists()


def test_pools_are_sized_from_the_cluster():
    from imoe_ray.corpus.stage import chunk_plan

    assert chunk_plan({"CPU": 16.0, "GPU": 2.0}) == (15, 1.0)
    assert chunk_plan({"CPU": 2.0}) == (1, 1.0) and chunk_plan({"CPU": 1.0}) == (1, 0.5)


@pytest.fixture(scope="module")
def seaweed_s3(s3):
    """The session's real S3 server (SeaweedFS, `conftest.s3`): (the AWS_* variables, a pyarrow filesystem)."""
    return s3.env(), s3.filesystem()


def test_a_corpus_on_s3_is_listed_checked_and_read_where_it_lies(seaweed_s3, tmp_path, monkeypatch):
    """The driver's side on a real S3 server: listing, peek, fingerprint, errors. (The stage on Ray
    workers reading from S3 is covered by the cluster tests on the shared S3 fixture.)"""
    import pyarrow.fs as pafs

    from imoe_ray.config import load_config
    from imoe_ray.corpus.stage import corpus_fingerprint

    env, fs = seaweed_s3
    local = _mixed_directory(tmp_path / "corpus")
    fs.create_dir("corpora")
    pafs.copy_files(str(local), "corpora/mixed", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    uri = "s3://corpora/mixed"
    plan = inspect_corpus(uri, id_column=None)
    assert [f.relative for f in plan.source.files] == ["a.jsonl", "c.txt", "sub/b.parquet"]
    expected = read_corpus_table(local, id_column=None)
    assert plan.columns == expected.column_names
    assert read_corpus_table(uri, id_column=None).equals(expected)
    cfg = load_config(None, [], corpus__path=uri)
    first = corpus_fingerprint(cfg)
    assert first == corpus_fingerprint(cfg)
    with fs.open_output_stream("corpora/mixed/d.jsonl") as out:
        out.write(b'{"text": "one more document"}\n')
    assert corpus_fingerprint(cfg) != first
    with pytest.raises(CorpusError, match="corpus not found: s3://corpora/missing.jsonl"):
        inspect_corpus("s3://corpora/missing.jsonl")
    with fs.open_output_stream("corpora/bad.jsonl") as out:
        out.write(b'{"text": "a"}\n{"text": \n')
    with pytest.raises(CorpusError, match="bad.jsonl:2: not valid JSON"):
        inspect_corpus("s3://corpora/bad.jsonl")
