"""The summarizer (fusion of experts): prompt, synthetic cases, training rows, batched generation, the
`summarizer` build stage on a copy of the session's built store, and `imoe eval summarizer`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from imoe_ray.config import ConfigError, load_config
from imoe_ray.evaluation.summarizer import score, unigram_f1
from imoe_ray.experts.data import IGNORE
from imoe_ray.fusion.summarizer import (ANSWER, Case, candidate_terms, encode_case, fits, generate, has_term,
                                        summarizer_prompt, synthesize_cases, training_rows)

import fusion_cases
from fusion_cases import TEXTS

REPO = Path(__file__).resolve().parents[1]
IMOE = [sys.executable, "-m", "imoe_ray.cli"]
# Small enough for the tiny test base (64-token context, 512-token vocabulary) and a few seconds of training.
TINY_FUSION = ["fusion.summarizer=true", "fusion.examples=800", "fusion.epochs=1", "fusion.batch_size=8",
               "fusion.r=4", "fusion.alpha=8", "fusion.draft_words=4", "fusion.question_words=[2,3]",
               "fusion.max_words=[5,6]", "fusion.eval_cases=6"]  # the tiny LM reads 64 tokens


# ---- plain library ---------------------------------------------------------------------------

def test_prompt_lists_question_and_named_drafts_then_asks_for_the_answer():
    prompt = summarizer_prompt("one two three " * 10 + "how do I open a socket?",
                               [("net", "create it\n with  socket.socket()"), ("style", "Mention timeout. At most 9 words.")])
    lines = prompt.split("\n")
    assert lines[0].endswith("how do I open a socket?") and len(lines[0].split()) == 16  # the question's end is kept
    assert lines[1] == "[net] create it with socket.socket()"  # one line per draft, whitespace collapsed
    assert lines[2] == "[style] Mention timeout. At most 9 words." and lines[-1] == ANSWER
    assert len(summarizer_prompt("q", [("a", "w " * 100)]).split("\n")[1].split()) == 1 + 32


def test_synthetic_cases_obey_their_own_constraints():
    cases = synthesize_cases(TEXTS, 120, seed=3, words=(8, 10), question_words=(3, 5), draft_words=10)
    assert len(cases) == 120 and cases == synthesize_cases(TEXTS, 120, seed=3, words=(8, 10), question_words=(3, 5),
                                                           draft_words=10)
    pairs = [c for c in cases if len(c.drafts) == 2]
    assert {c.task for c in pairs} == {0, 1} and len(pairs) < len(cases)  # both orders; single-draft copy cases too
    assert any(c.terms and c.max_words for c in pairs) and any(c.terms and not c.max_words for c in pairs)
    assert any(not c.terms and c.max_words for c in pairs)
    for c in pairs:
        (task_expert, task), (constraint_expert, constraint) = c.drafts[c.task], c.drafts[1 - c.task]
        assert task_expert != constraint_expert
        assert all(has_term(constraint, t) and not has_term(c.question + " " + task, t) for t in c.terms)
        assert score(c.reference, c) | {"term_recall": 1.0} == score(c.reference, c) | {"term_recall": 1.0}
        assert score(c.reference, c)["obeys_both"] == 1.0, c
    with pytest.raises(ValueError, match="two experts"):
        synthesize_cases({"net": TEXTS["net"], "empty": []}, 5, seed=0)


def test_candidate_terms_are_plain_new_words():
    assert candidate_terms("The Socket, sockets: bytes() and_so 42 thereafter socket", {"bytes"}) == \
        ["Socket", "sockets", "thereafter"]


def test_scores_tell_drafts_concatenation_and_reference_apart():
    case = Case("how do I", [("net", "open the socket then send the request bytes to the server now please"),
                             ("style", "Mention timeout. At most 8 words.")], 0, ["timeout"], 8,
                "timeout: open the socket then send the")
    assert score(case.reference, case)["obeys_both"] == 1.0
    task, constraint = score(case.drafts[0][1], case), score(case.drafts[1][1], case)
    concat = score(" ".join(t for _, t in case.drafts), case)
    assert task["all_terms"] == 0.0 and task["length_ok"] == 0.0 and task["on_task"] == 1.0
    assert constraint["all_terms"] == 1.0 and constraint["on_task"] == 0.0 and constraint["obeys_both"] == 0.0
    assert concat["all_terms"] == 1.0 and concat["length_ok"] == 0.0 and concat["obeys_both"] == 0.0
    assert unigram_f1("a b c", "a b c") == 1.0 and unigram_f1("", "a") == 0.0
    assert has_term("use a Timeout here", "timeout") and not has_term("timeouts", "timeout")


@pytest.fixture(scope="module")
def tiny_lm():
    return fusion_cases.tiny_lm(128)


def test_training_rows_put_the_loss_on_the_answer_only(tiny_lm):
    _, tok = tiny_lm
    cases = fits(tok, synthesize_cases(TEXTS, 12, seed=1, draft_words=8), 128)
    inputs, labels = training_rows(cases, tok, 128)
    assert inputs.shape == labels.shape == (len(cases), inputs.shape[1])
    for row, c in enumerate(cases):
        ids, start = encode_case(tok, c.prompt, c.reference)
        assert inputs[row, :len(ids)].tolist() == ids and (labels[row, :start] == IGNORE).all()
        answer = labels[row, start:len(ids)].tolist()
        assert answer[-1] == tok.eos_token_id and tok.decode(answer[:-1]).strip() == c.reference
        assert (labels[row, len(ids):] == IGNORE).all() and (inputs[row, len(ids):] == tok.pad_token_id).all()
    with pytest.raises(ValueError, match="more than"):
        training_rows(cases, tok, 8)


def test_batched_greedy_generation_equals_one_at_a_time(tiny_lm):
    model, tok = tiny_lm
    prompts = [summarizer_prompt("open a", [("net", "socket and send")]), "the matrix", "parse the document and walk"]
    batched = generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    assert batched == [generate(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert all(isinstance(a, str) for a in batched)


def test_bad_fusion_settings_are_rejected():
    with pytest.raises(ConfigError, match="fusion: .*max_words"):
        load_config(None, ["fusion.max_words=[9,4]"])
    with pytest.raises(ConfigError, match="fusion.examples"):
        load_config(None, ["fusion.examples=0"])
    with pytest.raises(ConfigError, match="fusion.nope"):
        load_config(None, ["fusion.nope=1"])


# ---- the build stage on a copy of the session's store ------------------------------------------

def _copy_store(built, tmp_path_factory, overrides: list[str]):
    from imoe_ray.store import Store

    cfg, store, _ = built
    root = tmp_path_factory.mktemp("fused") / "store"
    shutil.copytree(store.uri, root, ignore=shutil.ignore_patterns("runs"))
    fused = load_config(None, overrides, base=cfg.model_dump(mode="json") | {"store": str(root)})
    return fused, Store(root)


@pytest.fixture(scope="module")
def fused(built, tmp_path_factory):
    """The session's store with a summarizer trained by the build's `summarizer` stage: (cfg, store, messages)."""
    from imoe_ray.build import build

    cfg, store = _copy_store(built, tmp_path_factory, TINY_FUSION)
    messages: list[str] = []
    build(cfg, until="summarizer", report=messages.append)
    return cfg, store, messages


@pytest.mark.slow  # end to end, tens of seconds: `pytest -m slow`
def test_summarizer_stage_stores_a_peft_adapter_with_its_manifest(built, fused):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, _, manifests = built
    cfg, store, messages = fused
    root = Path(store.uri) / "fusion" / "summarizer"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["kind"] == "summarizer" and manifest["base_model"]["fingerprint"] == manifests["base"].metrics["fingerprint"]
    assert manifest["adapter"]["type"] == "lora" and manifest["adapter"]["r"] == 4
    assert manifest["training"]["cases"] > 20 and manifest["training"]["steps"] > 0 and manifest["training"]["tokens"] > 0
    assert any("[summarizer] training a LoRA summarizer" in m for m in messages)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(Path(store.uri) / "base"), root)
    assert type(model).__name__ == "PeftModelForCausalLM"
    summary = json.loads((Path(store.uri) / "manifests" / "summarizer.json").read_text())
    assert summary["complete"] and summary["metrics"]["trained"] and summary["metrics"]["cases"] == manifest["training"]["cases"]


@pytest.mark.slow  # end to end, tens of seconds: `pytest -m slow`
def test_summarize_answers_from_drafts_and_a_rebuild_retrains_nothing(fused):
    from imoe_ray.build import build
    from imoe_ray.fusion.summarizer import load_summarizer, summarize

    cfg, store, _ = fused
    model, tok = load_summarizer(store.uri)
    answer = summarize(model, tok, "open a socket", [("net", "call socket.socket() then connect"),
                                                     ("style", "Mention timeout. At most 8 words.")], max_new_tokens=8)
    assert isinstance(answer, str)
    before = (Path(store.uri) / "fusion" / "summarizer" / "manifest.json").read_text()
    messages: list[str] = []
    build(cfg, until="summarizer", force_stages=("summarizer",), report=messages.append)
    assert "[summarizer] up to date, skipped" in messages
    assert (Path(store.uri) / "fusion" / "summarizer" / "manifest.json").read_text() == before


@pytest.mark.slow  # end to end, tens of seconds: `pytest -m slow`
def test_eval_summarizer_cli_writes_json_and_plot(fused, ray_session):
    cfg, store, _ = fused
    # The tiny LM reads 64 tokens and the expert names take ~15 each: the shortest drafts fit.
    done = subprocess.run([*IMOE, "eval", "summarizer", "--store", store.uri, "--cases", "6", "--max-new-tokens", "8",
                           "--set", "fusion.draft_words=2", "--set", "fusion.question_words=[1,1]"],
                          cwd=REPO, capture_output=True, text=True, env={**ray_session["env"], "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = Path(store.uri) / "fusion" / "eval-summarizer.json"
    result = json.loads(out.read_text())
    assert json.loads(done.stdout) == result and 0 < result["cases"] <= 6
    assert set(result["systems"]) == {"constrained", "summarizer", "base", "task_draft", "constraint_draft", "best_draft",
                                      "concatenation"}
    assert result["systems"]["constrained"]["term_recall"] in (None, 1.0)  # the head holds the terms
    assert result["systems"]["constrained"]["length_ok"] in (None, 1.0)
    for name, row in result["systems"].items():
        assert all(v is None or 0 <= v <= 1 for k, v in row.items() if k != "reference_nll"), name
    assert result["systems"]["constraint_draft"]["term_recall"] in (None, 1.0)
    assert result["systems"]["summarizer"]["reference_nll"] > 0 and result["systems"]["base"]["reference_nll"] > 0
    assert out.with_suffix(".png").stat().st_size > 10_000 and "summarizer on" in done.stderr


def test_eval_summarizer_without_a_summarizer_is_a_clear_error(built, ray_session):
    _, store, _ = built
    done = subprocess.run([*IMOE, "eval", "summarizer", "--store", store.uri], cwd=REPO, capture_output=True, text=True,
                          env=ray_session["env"])
    assert done.returncode == 2 and "no summarizer" in done.stderr


@pytest.mark.slow  # end to end, tens of seconds: `pytest -m slow`
def test_disabling_the_summarizer_removes_it(fused, tmp_path):
    from imoe_ray.fusion import stage
    from imoe_ray.store import Store

    cfg, store, _ = fused
    copy = tmp_path / "store"
    shutil.copytree(store.uri, copy)
    off = load_config(None, ["fusion.summarizer=false"], base=cfg.model_dump(mode="json") | {"store": str(copy)})
    messages: list[str] = []
    assert stage.run(Store(copy), off, False, messages.append) == {"trained": False}
    assert not (copy / "fusion" / "summarizer").exists() and "fusion.summarizer is false" in messages[0]
