"""The build end to end on a small real corpus, on the session's Ray cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lancedb
import numpy as np
import pyarrow.parquet as pq
import pytest

from imoe_ray.build import build
from imoe_ray.config import load_config
from imoe_ray.store import StageManifest, Store

REPO = Path(__file__).resolve().parents[1]
IMOE = [sys.executable, "-m", "imoe_ray.cli"]


def test_every_stage_completes_with_manifests(built):
    cfg, store, manifests = built
    assert list(manifests) == ["ingest", "embed", "discover", "router", "shard", "base", "experts", "summarizer"]
    assert all(m.complete for m in manifests.values())
    # the summarizer stage is off in the session store (conftest), so it may take no measurable time
    assert all(m.timings_s["total"] > 0 for name, m in manifests.items() if name != "summarizer")


def test_assignments_contract(built, small_corpus):
    cfg, store, _ = built
    t = pq.read_table(store.path("assignments.parquet"))
    assert {"id", "top_category", "categories", "memberships"} <= set(t.column_names)
    rows = [json.loads(line) for line in small_corpus.read_text().splitlines()]
    assert set(t.column("id").to_pylist()) == {r["id"] for r in rows}  # every input row is there
    n_c = len(store.read_json("discovery", "model.json")["categories"])
    assert n_c >= 2
    for top, cats, mem in zip(*(t.column(c).to_pylist() for c in ("top_category", "categories", "memberships"))):
        assert len(mem) == n_c and all(0.0 <= m <= 1.0 for m in mem)
        assert (top == -1) == (cats == [])
        if cats:
            assert top == max(cats, key=lambda c: mem[c])


def test_extra_columns_pass_through_untouched(built, small_corpus):
    cfg, store, _ = built
    chunks = pq.read_table(store.path("corpus", "chunks"))
    assert {"domain", "source", "chunk_id", "n_tokens"} <= set(chunks.column_names)
    original = {json.loads(l)["id"]: json.loads(l) for l in small_corpus.read_text().splitlines()}
    for row in chunks.select(["id", "domain", "source"]).to_pylist():
        assert row["domain"] == original[row["id"]]["domain"] and row["source"] == original[row["id"]]["source"]


def test_shards_and_knowledge_bases(built):
    cfg, store, _ = built
    from imoe_ray.routing.stage import load_corpus, load_router

    index = store.read_json("shards", "index.json")
    assert index["classifier"] == "router"
    names = [c["name"] for c in index["categories"]]
    router = load_router(store, cfg, with_encoder=False)
    corpus = load_corpus(store, cfg, None, lambda m: None)
    probs = router.decide_states(corpus.texts, corpus.layer_states).probabilities
    chosen = {cid: set(np.flatnonzero(p >= router.threshold)) for cid, p in zip(corpus.chunk_ids, probs)}
    db = lancedb.connect(store.path("kb"))
    for c in index["categories"]:
        shard = pq.read_table(store.path("shards", c["name"]))
        expected = {cid for cid, cats in chosen.items() if c["id"] in cats or not cats}
        assert set(shard.column("chunk_id").to_pylist()) == expected
        assert "domain" in shard.column_names  # input columns survive sharding too
        kb = db.open_table(c["name"]).to_arrow()
        assert set(kb.column("chunk_id").to_pylist()) == expected
        assert {"id", "text", "embedding"} <= set(kb.column_names)
    assert sorted(names) == sorted(set(names))


def test_the_categories_map_is_drawn(built, tmp_path):
    from imoe_ray.discovery.plot import plot_categories
    from imoe_ray.discovery.stage import load_model

    cfg, store, _ = built
    drawn = plot_categories(store, cfg, tmp_path / "categories.png")
    assert drawn["categories"] == len(load_model(store).categories) and drawn["points"] > 0
    assert (tmp_path / "categories.png").stat().st_size > 10_000


def test_rerun_skips_up_to_date_stages(built):
    cfg, store, first = built
    build(cfg, report=lambda m: None)  # other tests may have re-run a stage since, which makes the later ones stale
    before = {s: StageManifest.load(store, s) for s in first}
    again = build(cfg, report=lambda m: None)
    assert all(again[s].finished_at == before[s].finished_at for s in first)


def test_changed_setting_reruns_from_that_stage(built):
    """A setting the shard stage reads (a request-time router setting: the router is not retrained)
    re-runs it and nothing before it."""
    cfg, store, first = built
    changed = load_config(None, [f"router.keyword_boost={cfg.router.keyword_boost + 0.5}"],
                          base=cfg.model_dump(mode="json"))
    again = build(changed, until="shard", report=lambda m: None)
    for stage in ("embed", "discover", "router"):
        assert again[stage].finished_at == first[stage].finished_at, stage
    assert again["shard"].finished_at != first["shard"].finished_at


@pytest.mark.slow  # end to end, tens of seconds: `pytest -m slow`
def test_killed_embed_resumes_without_redoing_parts(ray_session, small_corpus, tmp_path):
    store = tmp_path / "store"
    args = [*IMOE, "build", "--corpus", str(small_corpus), "--store", str(store), "--until", "embed",
            "--set", "embedding.part_rows=16", "--set", "embedding.batch_size=4"]
    proc = subprocess.Popen(args, cwd=REPO, env=dict(os.environ, **ray_session["env"]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    parts = store / "embeddings.partial"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(parts.glob("part-*.parquet"))) < 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(list(parts.glob("part-*.parquet"))) >= 2, "the build never wrote a part"
    if StageManifest.load(Store(store), "embed") is not None:
        pytest.skip("the embed stage finished before it could be killed")
    assert StageManifest.load(Store(store), "embed", partial=True) is not None
    done = subprocess.run(args, cwd=REPO, env=dict(os.environ, **ray_session["env"]), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    m = StageManifest.load(Store(store), "embed")
    assert m.complete and m.metrics["reused"] >= 32 and m.metrics["embedded_now"] == m.metrics["chunks"] - m.metrics["reused"]
    assert not parts.exists()
    ids = pq.read_table(str(store / "embeddings")).column("chunk_id").to_pylist()
    assert len(ids) == len(set(ids)) == m.metrics["chunks"]


def test_a_forced_stage_killed_midway_is_not_up_to_date_afterwards(tmp_path):
    """Its output was being overwritten: the next build must run it again, not skip it."""
    from imoe_ray.build import Stage, _run_stage

    class Finishes(Stage):
        def run(self, *args) -> dict:
            return {"ran": True}

    class KilledMidway(Stage):
        def run(self, *args) -> dict:
            raise KeyboardInterrupt  # what a kill looks like from inside the stage

    cfg = load_config(None, [f"store={tmp_path / 'store'}"])
    store = Store(cfg.store)
    fields = ("probe", ("discovery",), "imoe_ray.build:build", "a probe stage")
    _run_stage(Finishes(*fields, starts_ray=True), store, cfg, "upstream", False, lambda m: None)
    messages: list[str] = []
    _run_stage(Finishes(*fields, starts_ray=True), store, cfg, "upstream", False, messages.append)
    assert messages == ["[probe] up to date, skipped (a probe stage)"]
    with pytest.raises(KeyboardInterrupt):
        _run_stage(KilledMidway(*fields, starts_ray=True), store, cfg, "upstream", True, lambda m: None)
    messages.clear()
    again = _run_stage(Finishes(*fields, starts_ray=True), store, cfg, "upstream", False, messages.append)
    assert messages[0] == "[probe] running: a probe stage" and again.complete and again.metrics == {"ran": True}
