"""A knowledge base that keeps its integrity: learned rows carry their caller, are capped per caller
and per table, are written in batches (few LanceDB commits), are marked in results, and can be
removed in bulk (`imoe kb remove --since/--until/--caller/--all-learned`) and compacted.

Runs on a small store made here: real LanceDB tables shaped like the shard stage's, embedded with
the project's encoder (no Ray needed)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from cli_run import Ran, imoe

from imoe_ray.retrieval.knowledge_base import KnowledgeBase
from imoe_ray.retrieval.learning import (Caps, Exchange, LearningBuffer, learn, learn_many, list_learned,
                                         remove_learned_where)

IMOE = str(Path(sys.executable).parent / "imoe")
TEXTS = {"fish": ["Aquarium fish need clean water and a stable temperature.",
                  "Goldfish grow larger than most people expect."],
         "bread": ["Sourdough bread rises with wild yeast and lactic bacteria.",
                   "A hot oven gives bread a crisp crust."]}


@pytest.fixture(scope="module")
def encoder():
    from imoe_ray.embedding.encoder import Encoder

    return Encoder(max_tokens=64, device="cpu", num_threads=1)


@pytest.fixture
def store(tmp_path, encoder) -> Path:
    import lancedb

    root = tmp_path / "store"
    db = lancedb.connect(str(root / "kb"))
    for name, texts in TEXTS.items():
        vectors = encoder.encode(texts)
        db.create_table(name, data=pa.table({
            "chunk_id": [f"{name}-{i}" for i in range(len(texts))], "id": [f"{name}-{i}" for i in range(len(texts))],
            "text": texts,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1])}))
    (root / "config.yaml").write_text("corpus:\n  text_column: text\n")
    return root


@pytest.fixture
def kb(store, encoder) -> KnowledgeBase:
    return KnowledgeBase(store / "kb", lambda texts: encoder.encode(texts), "text")


def test_learned_rows_carry_caller_and_are_marked_in_results(kb):
    learned = learn(kb, "Do fish like warm water?", "Tropical fish do.", ["fish"], "req-1", caller="10.0.0.7")
    assert learned.added == ["fish"]
    (row,) = list_learned(kb)
    assert (row["caller"], row["source"], row["request_id"]) == ("10.0.0.7", "learned", "req-1") and row["created_at"]
    hits = kb.search("do fish like warm water", ["fish"], k=3, mode="vector")
    assert hits[0].chunk_id == learned.chunk_id and hits[0].citation()["source"] == "learned"
    assert {h.source for h in hits[1:]} == {"corpus"}


def test_a_caller_is_capped_per_hour_and_a_table_in_total(kb):
    caps = Caps(rows_per_caller_hour=3, max_rows=5)
    first = learn_many(kb, [Exchange(f"q{i}", f"a{i}", ["fish"], f"r{i}", "1.1.1.1") for i in range(6)], caps=caps)
    assert [bool(r.added) for r in first] == [True] * 3 + [False] * 3 and all(r.capped for r in first[3:])
    again = learn_many(kb, [Exchange("later", "still capped", ["fish"], "r9", "1.1.1.1")], caps=caps)
    assert again[0].capped == ["fish"]                           # the cap counts what the table holds, not a batch
    others = learn_many(kb, [Exchange(f"o{i}", f"b{i}", ["fish"], f"s{i}", f"2.2.2.{i}") for i in range(4)], caps=caps)
    assert sum(bool(r.added) for r in others) == 2                # the table's total cap: 5
    assert kb.table("fish").count_rows("source = 'learned'") == 5
    assert learn(kb, "q0", "a0", ["fish"], "dup", caller="3.3.3.3", caps=caps).duplicate == ["fish"]


def test_a_thousand_answers_from_one_caller_are_capped_and_batched(kb):
    """The issue's figure: 1,000 learned answers from one caller → at most the cap of rows, ≤ 10 commits."""
    table = kb.table("bread")
    version = table.version
    buffer = LearningBuffer(kb, caps=Caps(rows_per_caller_hour=60, max_rows=10000), batch_rows=128, flush_s=3600)
    accepted = sum(buffer.add(Exchange(f"question {i}", f"answer {i}", ["bread"], f"r{i}", "9.9.9.9")) for i in range(1000))
    buffer.close()
    table.checkout_latest()
    assert accepted == 60 and buffer.dropped == 940
    assert table.count_rows("source = 'learned'") == 60
    assert table.version - version <= 10, table.version - version


def test_learning_can_be_turned_off_per_caller(kb, store):
    from imoe_ray.config import load_config
    from imoe_ray.retrieval.serving import Learner

    cfg = load_config(None, ["retrieval.learn_callers=[\"127.0.0.1\"]", "retrieval.learn_flush_s=3600"])
    learner = Learner(kb, cfg, {"fish": ["fish"]})
    assert learner.learn("q", "a", ["fish"], "r1", caller="127.0.0.1")
    assert not learner.learn("q2", "a2", ["fish"], "r2", caller="8.8.8.8")
    learner.buffer.close()
    assert [r["caller"] for r in list_learned(kb)] == ["127.0.0.1"]


def test_bulk_removal_and_compaction_through_the_cli(kb, store):
    now = time.time()
    old = [Exchange(f"old {i}", "x", ["fish", "bread"], f"o{i}", "5.5.5.5", created_at=now - 7200) for i in range(3)]
    new = [Exchange(f"new {i}", "y", ["fish"], f"n{i}", "6.6.6.6", created_at=now) for i in range(3)]
    learn_many(kb, old + new)
    corpus = {n: kb.table(n).count_rows("source = 'corpus'") for n in kb.names()}

    def kb_cli(*args: str) -> Ran:
        return imoe("kb", *args, "--store", store)

    listed = [json.loads(line) for line in kb_cli("list", "--json").stdout.splitlines()]
    assert {(r["caller"], r["source"]) for r in listed} == {("5.5.5.5", "learned"), ("6.6.6.6", "learned")}
    nothing = subprocess.run([IMOE, "kb", "remove", "--store", str(store)], capture_output=True, text=True)
    assert nothing.returncode == 2, nothing.stderr                  # nothing named: refused, nothing removed
    assert kb_cli("remove", "--since", "yesterday").returncode == 2
    until = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(now - 3600))
    done = kb_cli("remove", "--until", until)
    assert done.returncode == 0, done.stderr
    assert {r["caller"] for r in list_learned(kb)} == {"6.6.6.6"}
    assert kb_cli("remove", "--caller", "6.6.6.6", "--since", str(now - 10)).returncode == 0
    assert list_learned(kb) == []
    learn_many(kb, new)
    assert kb_cli("remove", "--all-learned").returncode == 0 and list_learned(kb) == []
    assert {n: kb.table(n).count_rows("source = 'corpus'") for n in kb.names()} == corpus
    compacted = kb_cli("compact")
    assert compacted.returncode == 0, compacted.stderr
    assert "fragments" in compacted.stderr
    assert remove_learned_where(kb, caller="nobody' OR '1'='1") == {"bread": 0, "fish": 0}   # quoted, not SQL
