"""Plan-and-copy fusion (`imoe_ray.fusion.constrained`): reading directives out of drafts, the plan,
and decoding under the copy constraint with a real (tiny, untrained) LM, in the summarizer's own
generation loop and in the serving decoder. No Ray."""

from __future__ import annotations

import pytest
import torch

from imoe_ray.config import load_config
from imoe_ray.evaluation.summarizer import score
from imoe_ray.fusion.constrained import (CopySteer, finish, make_steer, max_answer_tokens, plan_fusion, read_draft,
                                         salient_terms)
from imoe_ray.fusion.summarizer import generate, has_term, summarizer_prompt, synthesize_cases
from imoe_ray.serving.generation import DecodeBatch, GenerationRequest
from imoe_ray.serving.lora_bank import AdapterBank

import fusion_cases
from fusion_cases import TEXTS

TWO_DRAFTS = (0.6, 0.2, 0.2, 0.0)  # every case: a task draft and a constraint draft


@pytest.fixture(scope="module")
def tiny_lm():
    return fusion_cases.tiny_lm(256)


# ---- reading drafts --------------------------------------------------------------------------

def test_directives_are_read_from_free_text_and_the_rest_is_content():
    r = read_draft("code", "Write a loader for the file. Use numpy and pandas. Keep it under 20 words.")
    assert r.directives.terms == ["numpy", "pandas"] and r.directives.max_words == 20
    assert r.content == "Write a loader for the file."
    r = read_draft("style", "Please include 'asyncio' and \"await\". Do not mention threads. At least 5 words.")
    assert r.directives.terms == ["asyncio", "await"] and r.directives.forbidden == ["threads"]
    assert r.directives.min_words == 5 and r.content == ""
    assert read_draft("x", "At most twelve words.").directives.max_words == 12
    assert read_draft("x", "No more than 9 words, and mention latency.").directives.terms == ["latency"]
    # sentences that only look like directives stay content
    for text in ("No error is raised here.", "Use a context manager to close every file you open."):
        r = read_draft("x", text)
        assert not r.directives and r.content == text


def test_salient_terms_are_specific_words_not_already_said():
    assert salient_terms("the solver inverts a matrix with pivoting", {"matrix"}, 2) == ["inverts", "pivoting"]
    assert salient_terms("the and of", set(), 3) == []


def test_plan_requires_every_drafts_terms_and_keeps_the_tightest_bound():
    drafts = [("net", "the socket sends bytes to a server which answers every request with a status line"),
              ("linalg", "Mention matrix and floats. At most 10 words."),
              ("style", "At most 8 words.")]
    plan = plan_fusion("how do I send data", drafts)
    assert plan.required == ["matrix", "floats"] and plan.max_words == 8
    assert plan.head == ["matrix", "floats"] and plan.head_text == "matrix and floats:"
    assert plan.sources == ["the socket sends bytes to"]  # 8 words in all with the 3-word head
    # a term the content already has is not repeated in the head
    plan = plan_fusion("q", [("a", "the socket sends bytes"), ("b", "Mention socket.")])
    assert plan.required == ["socket"] and plan.head == [] and plan.sources == ["the socket sends bytes"]
    # a second content draft contributes its most specific word; a forbidden term is never copied
    plan = plan_fusion("q", [("a", "open the socket then send bytes"), ("b", "the matrix is inverted by pivoting"),
                             ("c", "Do not mention bytes.")], salient=1)
    assert plan.required == ["inverted"] and plan.sources[0] == "open the socket then send"


def test_plan_is_made_from_the_drafts_alone_and_matches_what_the_cases_ask():
    cases = synthesize_cases(TEXTS, 40, seed=5, draft_words=10, kinds=TWO_DRAFTS)
    for c in cases:
        plan = plan_fusion(c.question, c.drafts)
        assert [t.lower() for t in plan.required] == [t.lower() for t in c.terms]
        assert plan.max_words == c.max_words


# ---- decoding under the constraint -----------------------------------------------------------

def _is_copy(answer: str, plan) -> bool:
    """The answer is the head, then a word prefix of one of the sources."""
    rest = answer[len(plan.head_text):].split() if plan.head else answer.split()
    return (not plan.head or answer.startswith(plan.head_text)) and \
        any(s.split()[:len(rest)] == rest for s in plan.sources or [""])


def test_copy_by_construction_obeys_every_draft_even_with_an_untrained_lm(tiny_lm):
    model, tok = tiny_lm
    cases = synthesize_cases(TEXTS, 30, seed=7, draft_words=10, kinds=TWO_DRAFTS)
    plans = [plan_fusion(c.question, c.drafts) for c in cases]
    steers = [make_steer(p, tok, [tok.eos_token_id]) for p in plans]
    raw = generate(model, tok, [c.prompt for c in cases], max(max_answer_tokens(s) for s in steers), steers=steers)
    for c, p, a in zip(cases, plans, raw):
        answer = finish(a, p)
        assert _is_copy(answer, p), (answer, p.to_json())
        s = score(answer, c)
        assert s["all_terms"] in (None, 1.0) and s["length_ok"] in (None, 1.0)
    # the same model unconstrained writes noise that misses the terms
    free = generate(model, tok, [c.prompt for c in cases], 20)
    assert sum(score(a, c)["all_terms"] or 0 for a, c in zip(free, cases)) < len(cases) / 4


def test_the_end_waits_for_the_required_terms_a_source_holds(tiny_lm):
    model, tok = tiny_lm
    plan = plan_fusion("q", [("a", "the matrix of floats is inverted by the solver"), ("b", "Mention solver.")])
    assert plan.head == [] and plan.required == ["solver"]
    steer = make_steer(plan, tok, [tok.eos_token_id], stop="model")
    # the end token is the most likely at every step: the answer still runs to the required term
    eos_first = torch.full((1, len(tok)), -10.0)
    eos_first[0, tok.eos_token_id] = 10.0
    for _ in range(max_answer_tokens(steer)):
        token = int(steer.adjust(torch.log_softmax(eos_first[0], -1)).argmax())
        if token == tok.eos_token_id:
            break
        steer.advance(token)
    assert steer.candidates()[1]
    (source, copied), = steer._pointers
    assert copied == min(steer.ends[0]) and has_term(tok.decode(steer.sources[0][:copied]), "solver")
    assert not has_term(tok.decode(steer.sources[0][:copied - 1]), "solver")


def test_soft_copy_may_bridge_but_still_forces_the_head(tiny_lm):
    model, tok = tiny_lm
    cases = synthesize_cases(TEXTS, 12, seed=11, draft_words=10, kinds=(1.0, 0.0, 0.0, 0.0))
    plans = [plan_fusion(c.question, c.drafts) for c in cases]
    steers = [make_steer(p, tok, [tok.eos_token_id], bias=0.5) for p in plans]
    raw = generate(model, tok, [c.prompt for c in cases], max(max_answer_tokens(s) for s in steers), steers=steers)
    for p, a in zip(plans, raw):
        assert finish(a, p).startswith(p.head_text) and len(finish(a, p).split()) <= p.max_words
    hard = [make_steer(p, tok, [tok.eos_token_id], bias=1e4) for p in plans]
    exact = [make_steer(p, tok, [tok.eos_token_id]) for p in plans]
    prompts = [c.prompt for c in cases]
    assert generate(model, tok, prompts, 40, steers=hard) == generate(model, tok, prompts, 40, steers=exact)


def test_serving_decoder_applies_the_steer_like_the_summarizer_loop(tiny_lm):
    model, tok = tiny_lm
    drafts = [("net", "the socket sends bytes over the network to a server"), ("linalg", "Mention matrix. At most 7 words.")]
    plan = plan_fusion("send data", drafts)
    prompt = summarizer_prompt("send data", drafts)
    expected = generate(model, tok, [prompt], 30, steers=[make_steer(plan, tok, [tok.eos_token_id])])[0]
    batch = DecodeBatch(model, AdapterBank(model))
    ids = [tok.eos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    key = batch.join(GenerationRequest(ids, {"base": 1.0}, max_new_tokens=30, stop_ids=(tok.eos_token_id,),
                                       steer=make_steer(plan, tok, [tok.eos_token_id])))
    tokens = []
    while batch.requests:
        token, finish_reason = batch.step()[key]
        if finish_reason != "stop":
            tokens.append(token)
    assert tok.decode(tokens, skip_special_tokens=True).strip() == expected
    assert expected.startswith("matrix:") and len(finish(expected, plan).split()) <= 7


def test_a_steer_without_sources_only_forces_the_head():
    steer = CopySteer(forced=[5, 6], sources=[], stop_ids=[0])
    logprobs = torch.log_softmax(torch.zeros(10), -1)
    assert int(steer.adjust(logprobs).argmax()) == 5
    steer.advance(5)
    assert torch.isinf(steer.adjust(logprobs)).sum() == 9
    steer.advance(6)
    assert torch.equal(steer.adjust(logprobs), logprobs)


def test_the_served_fuser_plans_and_copies_or_asks(tiny_lm):
    from imoe_ray.fusion.clarify import ClarifySettings
    from imoe_ray.fusion.fuser import Fuser

    model, tok = tiny_lm
    fusion_cfg = load_config(None, []).fusion
    fuser = Fuser(fusion_cfg, ClarifySettings(enabled=True), tok, [tok.eos_token_id])
    agree = [("net", "the socket sends bytes over the network"), ("linalg", "Mention matrix. At most 6 words.")]
    f = fuser.prepare("send data", agree, clarify=True)
    assert f.clarification is None and f.prompt == summarizer_prompt("send data", agree)
    answer = f.finish(generate(model, tok, [f.prompt], f.max_new_tokens, steers=[f.steer])[0])
    assert answer.startswith("matrix:") and len(answer.split()) <= 6
    disagree = [("net", "the socket sends bytes over the network"), ("linalg", "invert the matrix of floats")]
    assert fuser.prepare("q", disagree, clarify=True).clarification.reason == "drafts_disagree"
    assert fuser.prepare("q", disagree, clarify=False).clarification is None
    free = Fuser(fusion_cfg.model_copy(update={"constrained": False}), ClarifySettings(), tok, [tok.eos_token_id])
    f = free.prepare("send data", agree)
    assert f.steer is None and f.finish("  a  b ") == "  a  b "


@pytest.mark.parametrize("stop", ["budget", "sentence", "model"])
def test_where_an_answer_may_end(tiny_lm, stop):
    _, tok = tiny_lm
    plan = plan_fusion("q", [("a", "open the socket. then send the bytes to the server"), ("b", "At most 9 words.")])
    steer = make_steer(plan, tok, [tok.eos_token_id], stop=stop)
    ends = sorted(steer.ends[0])
    texts = [tok.decode(steer.sources[0][:p]).strip() for p in ends]
    assert texts[-1] == "open the socket. then send the bytes to the"  # the budget: 9 words
    if stop == "budget":
        assert len(ends) == 1
    elif stop == "sentence":
        assert texts == ["open the socket.", texts[-1]]
    else:
        assert texts[:3] == ["open", "open the", "open the socket."] and len(texts) == 9
    with pytest.raises(ValueError, match="stop must be one of"):
        make_steer(plan, tok, [tok.eos_token_id], stop="never")
