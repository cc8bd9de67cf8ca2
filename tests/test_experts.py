"""Experts: the base LM, PEFT adapters per category trained as parallel Ray Train jobs, the dense
baseline, the c-BTM mixture and `imoe eval lm`, on the session's built store."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_run import imoe
import torch

from imoe_ray.config import ExpertsConfig
from imoe_ray.experts.adapters import peft_config
from imoe_ray.experts.base_model import llama_config, new_model, train_tokenizer
from imoe_ray.experts.data import IGNORE, count_tokens, token_blocks
from imoe_ray.experts.mixture import ExpertLM, mix_logprobs, top_k_weights, windows
from imoe_ray.experts.stage import BASE_SERVED, plan_experts

REPO = Path(__file__).resolve().parents[1]
IMOE = [sys.executable, "-m", "imoe_ray.cli"]
TEXTS = ["the socket sends bytes over the network to a server", "a matrix of floats is inverted by the solver",
         "parse the xml document and walk its element tree"] * 20


# ---- plain library ---------------------------------------------------------------------------

def test_mixture_is_the_weighted_sum_of_probabilities():
    a, b = np.log([0.5, 0.25, 0.25]), np.log([0.1, 0.8, 0.1])
    mixed = mix_logprobs([a, b], [3.0, 1.0])  # weights are renormalised
    assert np.allclose(np.exp(mixed), 0.75 * np.exp(a) + 0.25 * np.exp(b))
    t = mix_logprobs([torch.as_tensor(a), torch.as_tensor(b)], [0.75, 0.25])
    assert torch.allclose(t, torch.as_tensor(mixed))
    assert np.allclose(mix_logprobs([a], [1.0]), a)
    with pytest.raises(ValueError, match="weight"):
        mix_logprobs([a, b], [1.0])
    with pytest.raises(ValueError, match="weight"):
        mix_logprobs([a, b], [0.0, 0.0])


def test_top_k_weights_map_folded_categories_to_their_expert():
    probs = {"a": 0.5, "small": 0.3, "b": 0.15, "c": 0.05}
    w = top_k_weights(probs, {"a": "a", "b": "b", "small": "a"}, k=2)
    assert w == {"a": pytest.approx(1.0)}
    w = top_k_weights(probs, {"a": "a", "b": "b", "small": "b"}, k=2)
    assert w == {"a": pytest.approx(0.5 / 0.8), "b": pytest.approx(0.3 / 0.8)}


@pytest.mark.parametrize("max_len", [8, 16, 64])
def test_windows_score_every_token_once_with_context(max_len):
    texts = [list(range(n)) for n in (5, 12, 40, 41)]
    first = 4
    wins = windows(texts, first, max_len)
    scored = {i: [] for i in range(len(texts))}
    for w in wins:
        assert len(w.ids) <= max_len and w.score_from >= 1
        assert w.score_from >= min(first, max_len // 2)
        scored[w.text].extend(w.ids[w.score_from:])
    for i, ids in enumerate(texts):
        assert scored[i] == ids[first:]


def test_token_blocks_pack_texts_with_eos_and_ignore_padding():
    tok = train_tokenizer(TEXTS, 300)
    inputs, labels = token_blocks(TEXTS[:5], tok, seq_len=16, min_tail=1)
    flat = inputs.reshape(-1)
    assert (flat == tok.eos_token_id).sum() == 5
    assert inputs.shape == labels.shape and inputs.shape[1] == 16
    n_ids = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in TEXTS[:5])
    assert count_tokens(labels) == n_ids
    assert (labels[-1] == IGNORE).sum() == inputs.size - n_ids


def test_small_categories_fold_into_their_nearest_neighbour_or_the_base():
    texts = {"big1": ["x"] * 20, "big2": ["y"] * 20, "tiny": ["z"] * 2}
    centroids = {"big1": np.array([1.0, 0.0]), "big2": np.array([0.0, 1.0]), "tiny": np.array([0.2, 0.9])}
    warnings = []
    plan, aliases = plan_experts(texts, centroids, min_chunks=8, report=warnings.append)
    assert aliases == {"tiny": "big2"} and len(plan["big2"]) == 22 and set(plan) == {"big1", "big2"}
    assert "warning" in warnings[0] and "tiny" in warnings[0]
    plan, aliases = plan_experts({"tiny": ["z"]}, {"tiny": np.array([1.0])}, 8, warnings.append)
    assert plan == {} and aliases == {"tiny": BASE_SERVED}


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_every_adapter_kind_wraps_the_base_model(kind):
    from peft import get_peft_model

    from imoe_ray.config import PretrainConfig

    tok = train_tokenizer(TEXTS, 300)
    cfg = PretrainConfig(hidden_size=32, layers=1, heads=2, intermediate_size=64, seq_len=32)
    base = new_model(llama_config(cfg, tok), 0)
    model = get_peft_model(base, peft_config(ExpertsConfig(adapter=kind, r=4), base))
    assert any("lm_head" in n for n, p in model.named_parameters() if p.requires_grad) == (kind != "dora")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trainable < sum(p.numel() for p in model.parameters()) / 2
    x = torch.as_tensor([tok("the socket")["input_ids"]])
    assert model(input_ids=x, labels=x).loss.isfinite()


# ---- the session's built store ----------------------------------------------------------------

@pytest.fixture(scope="module")
def index(built):
    _, store, _ = built
    return store.read_json("experts", "index.json")


def test_store_contract_base_experts_dense(built, index):
    cfg, store, manifests = built
    root = Path(store.uri)
    assert (root / "base" / "config.json").is_file() and (root / "base" / "tokenizer.json").is_file()
    assert index["experts"], "no expert was trained"
    fingerprint = manifests["base"].metrics["fingerprint"]
    for e in index["experts"]:
        m = json.loads((root / "experts" / e["name"] / "manifest.json").read_text())
        assert (root / "experts" / e["name"] / "adapter_config.json").is_file()
        assert m["category"]["name"] == e["name"] and m["routing"]["keywords"] and len(m["centroid"]) == 384
        assert m["base_model"]["fingerprint"] == fingerprint and m["adapter"]["type"] == "lora"
        assert m["training"]["tokens"] > 0 and math.isfinite(m["training"]["loss"])
    dense = json.loads((root / "baselines" / "dense" / "manifest.json").read_text())
    experts_tokens = sum(e["tokens"] for e in index["experts"]) * cfg.experts.epochs
    assert dense["kind"] == "dense-baseline"
    assert 0.8 < dense["training"]["tokens"] / experts_tokens < 1.25, "the dense baseline's token budget is off"


def test_experts_load_with_plain_transformers_and_peft(built, index):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, store, _ = built
    root = Path(store.uri)
    tok = AutoTokenizer.from_pretrained(root / "base")
    x = torch.as_tensor([tok("create a socket and send the request")["input_ids"]])
    base_logits = AutoModelForCausalLM.from_pretrained(root / "base")(input_ids=x).logits
    name = index["experts"][0]["name"]
    expert = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), root / "experts" / name)
    assert not torch.allclose(expert(input_ids=x).logits, base_logits), "the adapter changed nothing"


def test_routed_experts_exist_under_the_names_route_reports(built, index):
    from imoe_ray.routing.stage import load_router

    cfg, store, _ = built
    router = load_router(store, cfg)
    for query in ("open a tcp socket and read bytes", "invert the matrix with a solver", "plot axes ticks"):
        for name in router.route(query).experts:
            assert name == "base" or (Path(store.uri) / "experts" / name / "adapter_config.json").is_file()


def test_mixture_of_one_expert_is_that_expert(built, index):
    _, store, _ = built
    name = index["experts"][0]["name"]
    lm = ExpertLM.from_store(store.uri, [name], dense=False)
    ids = torch.as_tensor([lm.encode(["a socket sends bytes to the server"])[0]])
    alone = lm.next_token_logprobs(ids, {name: 1.0})
    assert torch.allclose(alone.exp().sum(), torch.tensor(1.0), atol=1e-4)
    mixed = lm.next_token_logprobs(ids, {name: 0.5, "base": 0.5})
    base = lm.next_token_logprobs(ids, {"base": 1.0})
    assert torch.allclose(mixed.exp(), 0.5 * alone.exp() + 0.5 * base.exp(), atol=1e-5)


def test_eval_lm_cli_writes_json_and_plot(built, ray_session, tmp_path):
    cfg, store, _ = built
    out = tmp_path / "eval" / "lm.json"
    done = imoe("eval", "lm", "--store", store.uri, "--output", out)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["perplexity"]) == {"base", "dense", "top1", "served", "mixture_router", "mixture"}
    assert all(1 < v < 1e5 for v in result["perplexity"].values())
    assert 1 <= result["routing"]["served_experts_per_text"] <= result["top_k"]  # the t_C policy's experts, capped
    assert 0 <= result["routing"]["category_expert_served"] <= 1 and result["threshold_policy"] == "fixed"
    assert result["per_category"] and sum(c["texts"] for c in result["per_category"].values()) == result["texts"]
    assert result["tokens_scored"] > 0 and result["route_tokens"] == 32
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "top-k mixture" in done.stderr and json.loads(done.stdout) == result


def test_eval_lm_on_a_heldout_file(built, tmp_path):
    cfg, store, _ = built
    from imoe_ray.evaluation.lm import evaluate_lm
    from imoe_ray.corpus.readers import CorpusError

    rows = [{"body": t * 3, "topic": "net" if "socket" in t else "other"} for t in TEXTS[:6]]
    path = tmp_path / "heldout.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    result = evaluate_lm(store, cfg, str(path), text_column="body", category_column="topic", report=lambda m: None)
    assert set(result["per_category"]) == {"net", "other"} and result["texts"] == 6
    with pytest.raises(CorpusError, match="nope"):
        evaluate_lm(store, cfg, str(path), text_column="body", category_column="nope", report=lambda m: None)
    path.write_text(json.dumps({"body": "too short"}))
    with pytest.raises(CorpusError, match="longer than 32"):
        evaluate_lm(store, cfg, str(path), text_column="body", report=lambda m: None)


def test_rebuild_retrains_only_the_missing_expert(built, index):
    import shutil

    from imoe_ray.build import build
    from imoe_ray.store import StageManifest

    cfg, store, _ = built
    root = Path(store.uri)
    keep, gone = index["experts"][0]["name"], index["experts"][-1]["name"]
    before = (root / "experts" / keep / "manifest.json").read_text()
    shutil.rmtree(root / "experts" / gone)
    messages = []
    fingerprint = StageManifest.load(store, "experts").fingerprint()
    build(cfg, until="experts", force_stages=("experts",), report=messages.append)
    assert StageManifest.load(store, "experts").fingerprint() != fingerprint  # the stages after it will re-run
    assert (root / "experts" / gone / "adapter_config.json").is_file()
    assert (root / "experts" / keep / "manifest.json").read_text() == before
    assert any(f"{keep}: up to date, skipped" in m for m in messages)
    assert any("training 1 job(s)" in m and gone in m for m in messages)


@pytest.mark.slow  # end to end, tens of seconds: `pytest -m slow`
def test_deepspeed_zero2_trains_an_adapter_on_two_cpu_workers(built, tmp_path):
    """`experts.strategy: deepspeed` through Ray Train: DeepSpeed's CPU accelerator, gloo, ZeRO stage 2."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from imoe_ray.config import load_config
    from imoe_ray.experts import parallel, stage
    from imoe_ray.experts.train_loop import MODEL_DIR
    from imoe_ray.store import Store

    cfg, store, _ = built
    ds = load_config(None, ["experts.strategy=deepspeed", "experts.zero_stage=2", "experts.workers_per_expert=2"],
                     base=cfg.model_dump(mode="json"))
    base = store.local_dir(stage.BASE)
    inputs, labels = token_blocks(TEXTS, AutoTokenizer.from_pretrained(base), 32)
    job = stage._job("ds", "zero2", inputs, labels, 2.0, ds, store, 1)
    job.loop_config["reports"] = 2  # every report of several workers writes a checkpoint
    seen = {}

    def check(name, metrics, checkpoint):
        seen["metrics"] = metrics
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), Path(checkpoint) / MODEL_DIR)
        seen["adapter"] = type(model).__name__
        return metrics

    parallel.run_one(job, parallel.Storage(Store(tmp_path), ()), 0, check)
    assert seen["adapter"] == "PeftModelForCausalLM"
    assert seen["metrics"]["step"] == seen["metrics"]["steps"] > 0 and math.isfinite(seen["metrics"]["loss"])
    assert seen["metrics"]["workers"] == 2 and seen["metrics"]["tokens"] >= 1.5 * count_tokens(labels)
