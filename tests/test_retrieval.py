"""Per-expert knowledge bases (LanceDB): vector, full-text and hybrid search, the relevance floor and
filters, learning from answers under concurrent appends, `imoe kb list|remove`, prompt compression,
and `imoe eval retrieval` through the CLI. All on a copy of the session's built store."""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from imoe_ray.retrieval.knowledge_base import KnowledgeBase, KnowledgeBaseError
from imoe_ray.retrieval.learning import learn, list_learned, remove_learned

IMOE = str(Path(sys.executable).parent / "imoe")


@pytest.fixture(scope="module")
def store_copy(built, tmp_path_factory) -> Path:
    """The knowledge bases, base model and config of the built store, copied: these tests write to them."""
    _, store, _ = built
    root = Path(store.root)
    copy = tmp_path_factory.mktemp("kbstore")
    for part in ("kb", "base", "experts"):
        shutil.copytree(root / part, copy / part)
    shutil.copy(root / "config.yaml", copy / "config.yaml")
    return copy


@pytest.fixture(scope="module")
def kb(store_copy) -> KnowledgeBase:
    from imoe_ray.embedding.encoder import Encoder

    encoder = Encoder(max_tokens=128, device="cpu")
    return KnowledgeBase(store_copy / "kb", lambda texts: encoder.encode(texts), "text")


def _a_chunk(kb: KnowledgeBase) -> tuple[str, str, str]:
    """(table, chunk_id, text) of a long chunk of the first table."""
    t = kb.table(kb.names()[0]).to_arrow()
    i = int(np.argmax([len(x) for x in t.column("text").to_pylist()]))
    return kb.names()[0], t.column("chunk_id")[i].as_py(), t.column("text")[i].as_py()


def test_search_modes_find_the_source_chunk(kb):
    table, chunk_id, text = _a_chunk(kb)
    query = " ".join(text.split()[5:25])
    for mode in ("vector", "text", "hybrid"):
        hits = kb.search(query, k=5, mode=mode)
        assert chunk_id in [p.chunk_id for p in hits], mode
        assert len({p.chunk_id for p in hits}) == len(hits) <= 5
        assert [p.score for p in hits] == sorted([p.score for p in hits], reverse=True)
    one_table = kb.search(query, [table], k=3)
    assert {p.table for p in one_table} == {table} and one_table[0].citation()["chunk_id"]
    assert "text" not in one_table[0].citation()


def test_relevance_floor_and_filters(kb):
    table, chunk_id, text = _a_chunk(kb)
    query = " ".join(text.split()[:20])
    assert kb.search(query, k=5, min_similarity=1.01) == []
    floor = 0.3
    assert all(p.similarity >= floor for p in kb.search(query, k=10, min_similarity=floor))
    only = kb.search(query, k=5, where=f"chunk_id = '{chunk_id}'")
    assert [p.chunk_id for p in only] == [chunk_id]
    assert kb.search(query, k=5, where="source = 'learned'", mode="text") == []  # no learned rows yet: nothing
    with pytest.raises(KnowledgeBaseError):
        kb.search(query, where="chunk_id = 'x' OR")
    with pytest.raises(KnowledgeBaseError):
        kb.search(query, mode="fuzzy")


def _append_in_process(kb_dir: str, table: str, worker: int, dim: int) -> list[str]:
    kb = KnowledgeBase(kb_dir, lambda texts: None)
    rng = np.random.default_rng(worker)
    out = []
    for j in range(3):
        vec = rng.normal(size=dim).astype(np.float32)
        out += learn(kb, f"question {worker}-{j}", f"answer {worker}-{j}", [table], f"req-{worker}-{j}", vector=vec).added
        out += learn(kb, "the shared question", "the shared answer", [table], f"req-{worker}-dup", vector=vec).added
    return out


def test_concurrent_appends_neither_corrupt_nor_duplicate(kb, store_copy):
    table = kb.names()[0]
    before = kb.table(table).count_rows()
    dim = len(kb.table(table).head(1).column("embedding")[0])
    threads = [threading.Thread(target=_append_in_process, args=(str(store_copy / "kb"), table, w, dim))
               for w in range(4)]
    with mp.get_context("spawn").Pool(2) as pool:  # two more writers in other processes, at the same time
        pending = pool.starmap_async(_append_in_process, [(str(store_copy / "kb"), table, w, dim) for w in (4, 5)])
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        pending.get(timeout=300)
    fresh = KnowledgeBase(store_copy / "kb", kb.embed)
    t = fresh.table(table)
    assert t.count_rows() == before + 6 * 3 + 1  # every distinct exchange once, the shared one once
    learned = list_learned(fresh, table)
    assert len(learned) == 19 and len({r["chunk_id"] for r in learned}) == 19
    assert t.count_rows("source = 'corpus'") == before  # corpus rows untouched, provenance filled
    hits = fresh.search("the shared question the shared answer", [table], k=3, mode="text", where="source = 'learned'")
    assert hits and hits[0].source == "learned" and hits[0].text.startswith("Q: the shared question")
    removed = remove_learned(fresh, [r["chunk_id"] for r in learned])
    assert sum(removed.values()) == 19 and t.count_rows() == before


def test_kb_list_and_remove_through_the_cli(kb, store_copy):
    names = kb.names()
    learned = learn(kb, "How are rows learned?", "From answers.", names[:2], "req-cli")
    assert learned.added == names[:2]
    assert learn(kb, "how are rows  learned?", "from answers.", names[:2], "req-cli-2").duplicate == names[:2]
    listed = subprocess.run([IMOE, "kb", "list", "--store", str(store_copy), "--json"], capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert {r["table"] for r in rows} == set(names[:2]) and {r["request_id"] for r in rows} == {"req-cli"}
    bad = subprocess.run([IMOE, "kb", "remove", "--store", str(store_copy), "chunk-1#0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "not a learned row" in bad.stderr
    gone = subprocess.run([IMOE, "kb", "remove", "--store", str(store_copy), learned.chunk_id], capture_output=True, text=True)
    assert gone.returncode == 0, gone.stderr
    assert list_learned(KnowledgeBase(store_copy / "kb", kb.embed)) == []
    assert remove_learned(kb, [learned.chunk_id]) == {learned.chunk_id: 0}


def test_compression_keeps_key_terms_and_reaches_the_ratio(kb, store_copy):
    from imoe_ray.compression.filler import FillerCompressor
    from imoe_ray.compression.selective import SelectiveCompressor
    from imoe_ray.compression.units import norm

    texts = kb.table(kb.names()[0]).to_arrow().column("text").to_pylist()[:4]
    question = "How do I merge two dataframes on a key column?"
    selective = SelectiveCompressor(store_copy / "base", threads=1)
    out = selective.reduce(question, texts, ratio=2.5)
    assert out.ratio >= 2.0 and out.original_tokens == selective.count([question, *texts])
    kept = {norm(w) for w in out.question.split()}
    assert {"merge", "dataframes", "key", "column"} <= kept
    for passage, compressed in zip(texts, out.passages):  # a key term in a passage survives too
        for term in ("merge", "column"):
            if term in {norm(w) for w in passage.split()}:
                assert term in {norm(w) for w in compressed.split()}
    filler = FillerCompressor(selective.count).reduce(question, texts)
    assert 1.0 < filler.ratio < out.ratio and "dataframes" in filler.question
    assert "the" not in filler.question.lower().split()


def test_eval_retrieval_cli_json(built):
    _, store, _ = built
    run = subprocess.run([IMOE, "eval", "retrieval", "--store", str(store.root), "--text-column", "text",
                          "--max-queries", "12", "--compression-queries", "3"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    for mode in ("vector", "text", "hybrid"):
        assert set(result[mode]) == {"p@1", "r@1", "p@5", "r@5", "p@10", "r@10", "mrr@10", "map"}
        assert all(0.0 <= v <= 1.0 for v in result[mode].values())
    assert result["hybrid"]["r@10"] > 0.3
    for key in ("compression", "compression_baseline"):
        assert result[key]["ratio"] > 1.0 and result[key]["r@5_retained"] is not None
    assert result["compression"]["ratio"] >= 2.0
    assert result["encode_ms_per_passage"] > 0
    missing = subprocess.run([IMOE, "eval", "retrieval", "--store", str(store.root), "--heldout", "/nonexistent.jsonl"],
                             capture_output=True, text=True)
    assert missing.returncode == 2
