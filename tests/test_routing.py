"""The router: DACT's halting guarantee, calibration, the fast path, and the trained router of a built store."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from cli_run import imoe
import torch
from safetensors.numpy import load_file

from imoe_ray.routing.calibration import cascade_threshold, fit_temperature
from imoe_ray.routing.dact import exit_from_states, train_head
from imoe_ray.routing.fastpath import FastPath
from imoe_ray.routing.router import BASE_MODEL, ExpertProfile

IMOE = [sys.executable, "-m", "imoe_ray.cli"]


def _clustered_states(n: int, layers: int, dim: int, classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(classes, size=n)
    centers = rng.normal(size=(classes, dim)) * 2
    # Deeper layers separate the classes better, as in a real encoder.
    states = np.stack([centers[labels] * (l + 1) / layers + rng.normal(size=(n, dim)) for l in range(layers)], axis=1)
    return states.astype(np.float32), labels


def test_dact_exit_never_changes_the_decision_and_saves_layers():
    states, labels = _clustered_states(600, layers=5, dim=16, classes=4)
    head = train_head(states, labels, 4, ponder_lambda=0.05, epochs=40, lr=3e-3, batch_size=128, seed=0)
    out = exit_from_states(head, states)
    with torch.no_grad():
        final, _, _ = head(torch.from_numpy(states))
    assert np.array_equal(out.probabilities.argmax(1), final.numpy().argmax(1))  # halting is exact
    assert np.allclose(out.probabilities.sum(1), 1.0, atol=1e-5)
    assert out.layers.min() >= 1 and out.layers.max() <= 5
    assert out.layers.mean() < 4.0
    assert np.mean(out.probabilities.argmax(1) == labels) > 0.9


def test_dact_units_read_text_features_and_halt_early_on_them():
    """States that carry nothing, text features that carry the class: the units learn from the text
    and stop after the first layer, and halting stays exact."""
    rng = np.random.default_rng(2)
    labels = rng.integers(3, size=600)
    states = rng.normal(size=(600, 4, 16)).astype(np.float32)
    text = (np.eye(3)[labels] * 4 + rng.normal(size=(600, 3)) * 0.5).astype(np.float32)
    blind = train_head(states, labels, 3, 0.05, 40, 3e-3, 128, 0)
    head = train_head(states, labels, 3, 0.2, 40, 3e-3, 128, 0, text=text)
    assert head.text_dims == 3 and blind.text_dims == 0
    out = exit_from_states(head, states, text)
    with torch.no_grad():
        final, _, _ = head(torch.from_numpy(states), torch.from_numpy(text))
    assert np.array_equal(out.probabilities.argmax(1), final.numpy().argmax(1))
    assert np.mean(out.probabilities.argmax(1) == labels) > 0.95
    assert np.mean(exit_from_states(blind, states).probabilities.argmax(1) == labels) < 0.6
    assert out.layers.mean() < 1.5


def test_each_layer_classifier_is_the_logistic_regression_of_its_input_and_halting_leaves_it_alone():
    """Stage 1 fits every layer's classifier by logistic regression (the last one is the full encoder
    + linear head); stage 2 trains only the halting units, so any lambda keeps the same classifiers."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import normalize

    from imoe_ray.routing.dact import fit_classifiers, train_halting

    states, labels = _clustered_states(400, layers=3, dim=8, classes=3, seed=3)
    base = fit_classifiers(states, labels, 3, c=4.0)
    last = normalize(states[:, -1])
    logits = last @ base.classify[-1].weight.detach().numpy().T + base.classify[-1].bias.detach().numpy()
    sk = LogisticRegression(C=4.0, max_iter=2000).fit(last, labels)
    assert np.allclose(logits, sk.decision_function(last), atol=1e-4)
    halted = train_halting(base, states, labels, 0.1, 20, 3e-3, 128, 0)
    for a, b in zip(base.classify.parameters(), halted.classify.parameters()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(base.halt.parameters(), halted.halt.parameters()))


def test_ponder_lambda_trades_layers_for_nothing_when_easy():
    states, labels = _clustered_states(600, layers=5, dim=16, classes=3, seed=1)
    cheap = exit_from_states(train_head(states, labels, 3, 0.2, 40, 3e-3, 128, 0), states).layers.mean()
    costly = exit_from_states(train_head(states, labels, 3, 0.0, 40, 3e-3, 128, 0), states).layers.mean()
    assert cheap <= costly


def test_temperature_scaling_recovers_the_true_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4000, 5)) * 3
    p = np.exp(logits / 2.0)
    p /= p.sum(1, keepdims=True)
    labels = np.array([rng.choice(5, p=row) for row in p])
    assert abs(fit_temperature(logits, labels) - 2.0) < 0.25


def test_cascade_threshold_keeps_the_fast_path_as_good_as_the_slow_one():
    confidence = np.array([0.99, 0.95, 0.9, 0.8, 0.6, 0.5])
    fast_ok = np.array([1, 1, 1, 0, 1, 0], bool)
    slow_ok = np.ones(6, bool)
    assert cascade_threshold(confidence, fast_ok, slow_ok, min_precision=0.9) == 0.9
    assert cascade_threshold(confidence, ~fast_ok, slow_ok, min_precision=0.9) is None


def test_cascade_threshold_holds_on_every_held_out_set():
    # Pooled, the fast path's two extra hits on set 0 pay for its miss on set 1 at 0.8; per set they must not.
    confidence = np.array([0.99, 0.95, 0.9, 0.8, 0.6])
    fast_ok = np.array([1, 1, 1, 0, 1], bool)
    slow_ok = np.array([0, 0, 1, 1, 1], bool)
    groups = np.array([0, 0, 0, 1, 1])
    assert cascade_threshold(confidence, fast_ok, slow_ok, min_precision=0.5) == 0.6
    assert cascade_threshold(confidence, fast_ok, slow_ok, min_precision=0.5, groups=groups) == 0.9


def test_neighbour_vote_follows_the_nearest_rows_and_round_trips():
    from imoe_ray.routing.neighbours import NeighbourVote

    rng = np.random.default_rng(0)
    centres = np.eye(3, 8)
    rows = np.concatenate([c + 0.05 * rng.standard_normal((20, 8)) for c in centres])
    labels = np.repeat([0, 1, 2], 20)
    vote = NeighbourVote.fit(rows, labels, 3, k=5, temperature=0.1, max_rows=1000, seed=0)
    between = (centres[0] + centres[1]) / 2 + 0.01 * centres[2]
    p = vote.probabilities(np.stack([centres[1], between]))
    assert np.allclose(p.sum(1), 1) and p[0].argmax() == 1 and p[0, 1] > 0.99 and (p > 0).all()
    assert set(np.argsort(-p[1])[:2]) == {0, 1}           # between two categories: both ahead of the third
    again = NeighbourVote.from_parts(vote.settings(), vote.arrays())
    assert np.allclose(again.probabilities(rows[:5]), vote.probabilities(rows[:5]), atol=1e-3)
    capped = NeighbourVote.fit(rows, labels, 3, k=5, temperature=0.1, max_rows=10, seed=0)
    assert len(capped.labels) == 10 and capped.probabilities(rows[:2]).shape == (2, 3)


def test_fast_path_learns_and_knows_its_vocabulary():
    texts = ["open a socket and connect to the server", "tcp socket listen accept", "http server request socket",
             "plot a histogram with matplotlib", "matplotlib figure axes plot", "draw a line plot with labels"] * 3
    labels = np.array([0, 0, 0, 1, 1, 1] * 3)
    fast = FastPath.fit(texts, labels, 2, n_features=2**12, max_chars=1000, c=10.0, seed=0)
    assert fast.probabilities("socket server").argmax() == 0
    assert fast.probabilities("histogram plot").argmax() == 1
    assert fast.known_fraction("socket plot") == 1.0 and fast.known_fraction("zebra giraffe") == 0.0
    assert np.allclose(fast.logits_batch(["socket server"])[0], fast.logits("socket server"), atol=1e-5)


def test_fast_path_reads_the_text_features_and_round_trips():
    from imoe_ray.discovery.features import TextFeatures

    texts = ["open a socket and connect to the server", "tcp socket listen accept", "http server request socket",
             "plot a histogram with matplotlib", "matplotlib figure axes plot", "draw a line plot with labels"] * 3
    labels = np.array([0, 0, 0, 1, 1, 1] * 3)
    text = TextFeatures.fit(texts, dims=3, seed=0)
    # One text without the vectorizer gives what the vectorizer gives (case, stop words, unknown words, nothing).
    queries = ["Socket SOCKET socket, the server!", "plot axes of a figure", "zebra", "", "the and of"]
    assert np.allclose(np.stack([text.transform_one(q) for q in queries]), text.transform(queries), atol=1e-6)
    fast = FastPath.fit(texts, labels, 2, n_features=2**12, max_chars=1000, c=10.0, seed=0, text_features=text)
    assert fast.text_weights.shape == (3, 2) and np.abs(fast.text_weights).sum() > 0
    assert fast.probabilities("socket server").argmax() == 0 and fast.probabilities("histogram plot").argmax() == 1
    assert np.allclose(fast.logits_batch(queries), np.stack([fast.logits(q) for q in queries]), atol=1e-5)
    loaded = FastPath.from_parts(fast.settings(), fast.arrays(), text)
    assert np.allclose(loaded.logits("tcp accept"), fast.logits("tcp accept"))
    with pytest.raises(ValueError, match="reads text features"):
        FastPath.from_parts(fast.settings(), fast.arrays())


# ---- the trained router of the session's built store --------------------------------------------

@pytest.fixture(scope="module")
def router(built):
    from imoe_ray.routing.stage import load_router

    cfg, store, _ = built
    return load_router(store, cfg)


def test_router_is_saved_with_lambda_and_every_setting(built):
    cfg, store, manifests = built
    meta = store.read_json("router", "config.json")
    s = meta["settings"]
    assert s["ponder_lambda"] in cfg.router.ponder_lambdas and len(s["lambda_sweep"]) == len(cfg.router.ponder_lambdas)
    for key in ("n_layers", "hidden", "n_classes", "dact_temperature", "fast_temperature", "fast_threshold",
                "threshold", "encoder", "reference_c", "fast_features", "text_dims", "unit_input", "weight_decay"):
        assert key in s
    weights = load_file(store.path("router", "weights.safetensors"))
    # The units read the discovery's text features too, and the router carries its own copy of them.
    assert s["text_dims"] == weights["text.svd_components"].shape[0] > 0 and meta["text_vocabulary"]
    assert weights["dact.classify.0.weight"].shape == (s["n_classes"], s["hidden"] + s["text_dims"])
    assert weights["fast.weights"].shape == (s["fast_features"], s["n_classes"])
    assert weights["fast.text_weights"].shape == (s["text_dims"], s["n_classes"])  # so does the fast path
    m = meta["metrics"]["test_chunks"]
    assert m["rows"] > 0 and m["cascade_accuracy"] > 2.0 / s["n_classes"]
    assert manifests["router"].metrics["lambda"] == s["ponder_lambda"]
    # lambda: the fewest layers among those within the allowed drop on every held-out set, else the most accurate
    within = [r for r in s["lambda_sweep"] if r["worst_drop"] <= cfg.router.max_accuracy_drop]
    chosen = next(r for r in s["lambda_sweep"] if r["lambda"] == s["ponder_lambda"])
    if within:
        assert chosen in within and chosen["mean_layers"] == min(r["mean_layers"] for r in within)
    else:
        assert chosen["accuracy"] == max(r["accuracy"] for r in s["lambda_sweep"])


def test_live_dact_matches_dact_on_stored_states(router, built):
    from imoe_ray.routing.stage import load_corpus

    cfg, store, _ = built
    corpus = load_corpus(store, cfg, None, lambda m: None)
    texts, states = corpus.texts[:12], corpus.layer_states[:12]
    live, _ = router.dact(texts)
    stored = router.decide_states(texts, states, use_fast_path=False)
    assert np.array_equal(live.exit_layer, stored.exit_layer)
    assert np.allclose(live.probabilities, stored.probabilities, atol=2e-3)  # float16 storage


def test_live_routes_match_the_cascade_on_stored_states_with_the_neighbour_vote(router, built):
    """What sharding and evaluation compute from stored states is what a request gets: the cascade,
    then the neighbour vote read from the pooled last layer (live: DACT runs every layer for it).
    Keyword priors apply to live requests only, so they are off here."""
    import copy

    from imoe_ray.routing.stage import load_corpus

    cfg, store, _ = built
    assert router.neighbours is not None and router.settings["neighbour_weight"] >= 0
    meta = store.read_json("router", "config.json")
    weights = load_file(store.path("router", "weights.safetensors"))
    assert weights["neighbours.features"].shape == (len(weights["neighbours.labels"]), meta["settings"]["hidden"] +
                                                    meta["settings"]["text_dims"]) and meta["neighbours"]["k"] > 0
    corpus = load_corpus(store, cfg, None, lambda m: None)
    texts, states = corpus.texts[:12], corpus.layer_states[:12]
    stored = router.decide_states(texts, states)
    plain = copy.copy(router)
    plain.settings = dict(router.settings, keyword_boost=0.0)
    for text, probs in zip(texts, stored.probabilities):
        live = plain.route(text).all_probabilities
        assert np.allclose([live[n] for n in router.names], probs, atol=5e-3)   # float16 storage


def test_route_decision_contract(router, built):
    cfg, store, _ = built
    text = store.read_table("corpus", "chunks", columns=["text"]).column("text")[0].as_py()
    r = router.route(text)
    assert r.categories and r.probabilities == sorted(r.probabilities, reverse=True)
    assert all(p >= router.threshold for p in r.probabilities) or r.fallback
    assert 0 <= r.exit_layer <= router.head.n_layers and r.latency_ms > 0
    assert set(r.experts) <= set(router.names) | {BASE_MODEL}
    assert abs(sum(r.all_probabilities.values()) - 1.0) < 1e-2


@pytest.mark.parametrize("garbage", ["", "   \n\t ", "the of and", "x" * 1_000_000, "é∂ƒ\x00\x01" * 1000,
                                     b"\xff\xfe\x00binary\x80", "a" * 300 + " socket"])
def test_garbage_gets_a_defined_answer(router, garbage):
    r = router.route(garbage)
    assert r.experts and r.latency_ms < 5000
    json.dumps(r.to_json())


def test_non_text_is_a_clear_error(router):
    with pytest.raises(TypeError, match="text"):
        router.route(12345)


def test_generic_question_goes_to_the_base_model(router):
    r = router.route("what is the capital of France and who was its first king?")
    assert r.experts == [BASE_MODEL] and r.fallback


def test_keyword_prior_and_a_late_expert_join_without_retraining(router, built):
    cfg, store, _ = built
    query = "zebrafish aquarium husbandry tips"
    before = router.route(query, force_dact=True).all_probabilities
    profiles = list(router.profiles)
    try:
        first = profiles[0]
        router.add_expert(ExpertProfile(first.name, first.category, ["aquarium"], first.centroid))
        boosted = router.route(query, force_dact=True).all_probabilities
        assert boosted[first.name] > before[first.name]
        centroid = router._encoder.encode([query])[0].tolist()
        router.add_expert(ExpertProfile("aquarist", None, ["zebrafish"], centroid))
        r = router.route(query)
        assert "aquarist" in r.experts and "aquarist" in r.all_probabilities
    finally:
        router.profiles = profiles


def test_route_cli_single_and_batch(built, tmp_path):
    cfg, store, _ = built
    out = imoe("route", "--store", store.uri, "--json", "how do I open a socket?")
    assert out.returncode == 0, out.stderr
    decision = json.loads(out.stdout)
    assert {"categories", "probabilities", "experts", "exit_layer", "latency_ms"} <= set(decision)
    requests = tmp_path / "in.jsonl"
    requests.write_text("\n".join(json.dumps({"id": f"q{i}", "text": t, "extra": i})
                                  for i, t in enumerate(["plot a histogram", "", "parse json strings"])) + "\n")
    result = tmp_path / "out.jsonl"
    out = imoe("route", "--store", store.uri, "--input", requests, "--output", result)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in result.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["q0", "q1", "q2"] and all("experts" in r for r in rows)


def test_eval_route_writes_accuracy_by_length_a_confusion_matrix_and_a_plot(built, tmp_path):
    cfg, store, _ = built
    out_json = tmp_path / "route.json"
    out = imoe("eval", "route", "--store", store.uri, "-o", out_json)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result == json.loads(out_json.read_text())
    assert set(result["accuracy"]) == {"8", "16", "24", "32", "64", "whole"}
    assert all(0 <= a <= 1 for a in result["accuracy"].values())
    counts = np.array(result["confusion"]["counts"])
    assert counts.shape == (len(result["categories"]), len(result["categories"]) + 1) and counts.sum() == result["texts"]
    assert np.trace(counts) / counts.sum() == pytest.approx(result["accuracy"]["whole"], abs=1e-3)
    assert 0 <= result["calibration"]["ece"] <= 1 and sum(b["n"] for b in result["calibration"]["bins"]) == result["texts"]
    assert out_json.with_suffix(".png").stat().st_size > 10_000


def test_route_cli_bad_input_is_a_clear_error(built, tmp_path):
    cfg, store, _ = built
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "text": "fine"}\nnot json\n')
    out = imoe("route", "--store", store.uri, "--input", bad, "--output", tmp_path / "o.jsonl")
    assert out.returncode == 2 and "bad.jsonl:2" in out.stderr and not (tmp_path / "o.jsonl").exists()
    out = imoe("route", "--store", tmp_path / "nothing", "hello")
    assert out.returncode == 2 and "error" in out.stderr


def test_train_router_cli_retrains_in_place(built, tmp_path):
    import shutil

    from imoe_ray.store import StageManifest, Store

    _, built_store, _ = built
    # A copy: a retrained router makes the session store's later stages stale.
    shutil.copytree(built_store.root, tmp_path / "store", ignore=shutil.ignore_patterns("runs"))
    store = Store(str(tmp_path / "store"))
    before = StageManifest.load(store, "router")
    out = imoe("train-router", "--store", store.uri, "--force")
    assert out.returncode == 0, out.stderr
    assert "cascade acc" in out.stderr and "prefix" in out.stderr
    after = StageManifest.load(store, "router")
    # Retrained on purpose: the stages after it (the shards, routed by the old router) re-run on the next build.
    assert after.finished_at != before.finished_at and after.fingerprint() != before.fingerprint()


def test_adaptive_t_c_falls_with_the_query_complexity():
    from imoe_ray.routing.threshold import AdaptiveThreshold

    adaptive = AdaptiveThreshold(t_complex=0.1, t_simple=0.6, complexity_words=12, close_margin=0.1)
    simple = adaptive.complexity(2, np.array([0.9, 0.05, 0.05]))
    complex_ = adaptive.complexity(20, np.array([0.36, 0.33, 0.31]))
    assert 0 <= simple < complex_ <= 1
    assert adaptive.threshold(0.0) == 0.6 and adaptive.threshold(1.0) == 0.1
    assert adaptive.threshold(complex_) < 0.2 < adaptive.threshold(simple)  # several experts vs one
    assert adaptive.complexity(5, np.array([1.0])) == 0.0  # one category: nothing to choose between
