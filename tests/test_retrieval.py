"""Per-expert knowledge bases (LanceDB): vector, full-text and hybrid search, the relevance floor and
filters, learning from answers under concurrent appends, `imoe kb list|remove`, prompt compression,
and `imoe eval retrieval` through the CLI. All on a copy of the session's built store."""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from cli_run import imoe

from imoe_ray.config import RetrievalConfig
from imoe_ray.retrieval.fusion import Fusion, calibrate, configured, fuse
from imoe_ray.retrieval.knowledge_base import KnowledgeBase, KnowledgeBaseError, Passage
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
    assert one_table[0].citation()["text"] == one_table[0].text  # citations carry the passage


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
    listed = imoe("kb", "list", "--store", store_copy, "--json")
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert {r["table"] for r in rows} == set(names[:2]) and {r["request_id"] for r in rows} == {"req-cli"}
    bad = imoe("kb", "remove", "--store", store_copy, "chunk-1#0")
    assert bad.returncode == 2 and "not a learned row" in bad.stderr
    gone = imoe("kb", "remove", "--store", store_copy, learned.chunk_id)
    assert gone.returncode == 0, gone.stderr
    assert list_learned(KnowledgeBase(store_copy / "kb", kb.embed)) == []
    assert remove_learned(kb, [learned.chunk_id]) == {learned.chunk_id: 0}


def test_an_expert_installed_later_learns_into_a_table_of_its_own(kb, store_copy):
    """A packaged expert has no knowledge base: its first learned answer creates its table, which
    vector, full-text and hybrid search then find; names that are not safe file names are refused."""
    before = kb.names()
    assert learn(kb, "q", "a", ["../escape"], "req-bad", create=True).added == []
    assert kb.names() == before and not (store_copy / "escape.lance").exists()
    learned = learn(kb, "How do late experts remember?", "In a table made for them.", ["late-expert"], "req-late",
                    create=True)
    try:
        assert learned.added == ["late-expert"] and kb.names() == sorted(before + ["late-expert"])
        for mode in ("vector", "text", "hybrid"):
            hits = kb.search("how do late experts remember", ["late-expert"], k=3, mode=mode)
            assert [h.chunk_id for h in hits] == [learned.chunk_id] and hits[0].source == "learned", mode
        assert [r["table"] for r in list_learned(kb)] == ["late-expert"]
    finally:
        kb.db.drop_table("late-expert")
        kb._tables.pop("late-expert", None)


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


def _passages(ranked: list[tuple[str, float]]) -> list[Passage]:
    return [Passage(cid, cid, cid, "t", score, 0.5) for cid, score in ranked]


def test_score_fusion_weights_and_calibration():
    """Hybrid fusion: max-normalised scores summed with the weight; a passage missing from a list
    gets that list's floor; calibration picks the weight that ranks the relevant chunks best."""
    by_vector = _passages([("a", 0.9), ("b", 0.8), ("c", 0.3)])
    by_text = _passages([("c", 12.0), ("d", 9.0), ("e", 3.0)])
    assert [p.chunk_id for p in fuse(by_vector, by_text, Fusion("score", 1.0))][:3] == ["a", "b", "c"]
    assert [p.chunk_id for p in fuse(by_vector, by_text, Fusion("score", 0.0))][:2] == ["c", "d"]
    fused = fuse(by_vector, by_text, Fusion("score", 0.5), depth=3)
    assert fused[0].chunk_id == "c" and fused[0].score == pytest.approx(0.5 * 0.3 / 0.9 + 0.5 * 1.0)
    assert {p.chunk_id: p.score for p in fused}["a"] == pytest.approx(0.5 * 1.0 + 0.5 * 0.25)  # text floor 3/12
    unfilled = fuse(by_vector, by_text, Fusion("score", 0.5), depth=4)  # lists ran out: missing scores 0
    assert {p.chunk_id: p.score for p in unfilled}["a"] == pytest.approx(0.5 * 1.0)
    assert [p.chunk_id for p in fuse(by_vector, by_text, Fusion("rrf", 0.5, rrf_k=1))][0] in {"a", "c"}
    # text is right when the query has the words (2 of 3 queries), the vector list otherwise: a mix wins
    cases = [(_passages([("x", 0.9), ("rel1", 0.85)]), _passages([("rel1", 9.0), ("x", 1.0)])),
             (_passages([("y", 0.9), ("rel2", 0.88)]), _passages([("rel2", 5.0)])),
             (_passages([("rel3", 0.9), ("z", 0.5)]), _passages([("z", 3.0), ("rel3", 2.9)]))]
    relevant = [{"rel1"}, {"rel2"}, {"rel3"}]
    fusion = calibrate(cases, relevant, "score", source="unit")
    c = fusion.calibration
    assert c["text_only_mrr@10"] == pytest.approx(5 / 6, abs=1e-3) and c["vector_only_mrr@10"] == pytest.approx(2 / 3, abs=1e-3)
    assert 0.0 < fusion.vector_weight < 1.0 and c["mrr@10"][str(fusion.vector_weight)] == pytest.approx(1.0)
    assert configured(fusion, RetrievalConfig(vector_weight=0.9)).vector_weight == 0.9
    assert configured(fusion, RetrievalConfig(fusion="rrf")).vector_weight == 0.5  # tuned for another method


def test_eval_retrieval_cli_json(built, tmp_path):
    _, store, _ = built
    run = imoe("eval", "retrieval", "--store", store.root, "--text-column", "text",
               "--max-queries", "12", "--compression-queries", "3", "-o", tmp_path / "r.json")
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert json.loads((tmp_path / "r.json").read_text()) == result and (tmp_path / "r.png").stat().st_size > 10_000
    for mode in ("vector", "text", "hybrid"):
        assert set(result[mode]) == {"p@1", "r@1", "p@5", "r@5", "p@10", "r@10", "mrr@10", "map"}
        assert all(0.0 <= v <= 1.0 for v in result[mode].values())
    assert result["hybrid"]["r@10"] > 0.3
    for key in ("compression", "compression_baseline"):
        assert result[key]["ratio"] > 1.0 and result[key]["r@5_retained"] is not None
    assert result["compression"]["ratio"] >= 2.0
    assert result["encode_ms_per_passage"] > 0
    calibrated = json.loads((Path(store.root) / "kb" / "fusion.json").read_text())  # written by the shard stage
    assert calibrated["calibration"]["queries"] > 0 and "calib" in calibrated["calibration"]["source"]
    assert result["fusion"]["vector_weight"] == calibrated["vector_weight"]
    missing = imoe("eval", "retrieval", "--store", store.root, "--heldout", "/nonexistent.jsonl")
    assert missing.returncode == 2
