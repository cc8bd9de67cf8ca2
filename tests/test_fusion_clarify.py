"""The clarification rule (`imoe_ray.fusion.clarify`): draft divergence, contradictory directives,
near ties on short queries, and the per-request option. No Ray."""

from __future__ import annotations

from collections import Counter

import pytest
from pydantic import ValidationError

from imoe_ray.config import ConfigError, load_config
from imoe_ray.fusion.clarify import (ClarifySettings, clarify_drafts, clarify_route, content_words, draft_divergence,
                                     js_divergence)
from imoe_ray.serving.openai_api import ChatRequest

ON = ClarifySettings(enabled=True, divergence=0.9, tie_margin=0.1, query_words=6)


def test_js_divergence_is_zero_for_the_same_words_and_one_for_disjoint_ones():
    a = Counter({"socket": 2, "bytes": 1})
    assert js_divergence(a, Counter({"socket": 4, "bytes": 2})) == pytest.approx(0.0)
    assert js_divergence(a, Counter({"matrix": 1})) == pytest.approx(1.0)
    mid = js_divergence(a, Counter({"socket": 1, "matrix": 1}))
    assert 0.0 < mid < 1.0 and mid == pytest.approx(js_divergence(Counter({"socket": 1, "matrix": 1}), a))
    assert content_words("The socket and THE bytes") == Counter({"socket": 1, "bytes": 1})
    assert draft_divergence(["only one draft"]) == 0.0


def test_drafts_that_share_no_content_ask_which_reading_is_meant():
    drafts = [("networking", "open a socket and send the bytes to the server"),
              ("statistics", "estimate the variance of the sample with a bootstrap")]
    c = clarify_drafts(drafts, ON)
    assert c is not None and c.reason == "drafts_disagree" and c.score > 0.9
    assert c.question.endswith("?") and "networking" in c.question and "statistics" in c.question
    assert [o.split(":")[0] for o in c.options] == ["networking", "statistics"]
    # drafts that say the same thing, and a task draft with a constraint draft, are no disagreement
    same = [("a", "open a socket and send the bytes"), ("b", "send the bytes through an open socket")]
    assert clarify_drafts(same, ON) is None
    assert clarify_drafts([("a", "open a socket and send the bytes"), ("b", "Mention latency. At most 9 words.")],
                          ON) is None
    # the threshold is the switch: at 1.0 nothing is divergent enough
    assert clarify_drafts(drafts, ClarifySettings(True, divergence=1.0)) is None


def test_contradictory_directives_always_ask():
    c = clarify_drafts([("a", "Mention threads."), ("b", "Do not mention threads.")], ON)
    assert c is not None and c.reason == "contradictory_directives"
    assert c.options == ["a asks to mention threads, b asks not to"]
    c = clarify_drafts([("a", "At least 30 words."), ("b", "At most 10 words.")], ON)
    assert c is not None and "at least 30" in c.options[0]


def test_a_near_tie_asks_only_on_a_short_query():
    tied = {"networking": 0.41, "concurrency": 0.38, "statistics": 0.21}
    c = clarify_route("sockets and threads", tied, ON)
    assert c is not None and c.reason == "near_tie" and c.options == ["networking", "concurrency"]
    assert c.score == pytest.approx(0.03) and "networking or concurrency" in c.question
    assert clarify_route("how do I share one socket between many threads of a server", tied, ON) is None
    assert clarify_route("sockets", {"networking": 0.8, "concurrency": 0.2}, ON) is None
    assert clarify_route("sockets", {"base": 0.5, "networking": 0.5}, ON) is None


def test_clarification_is_a_config_setting_and_a_request_option():
    cfg = load_config(None, ["serve.clarify=true", "serve.clarify_divergence=0.5"])
    s = ClarifySettings.from_config(cfg.serve)
    assert s.enabled and s.divergence == 0.5 and s.query_words == cfg.serve.clarify_query_words
    assert not load_config(None, []).serve.clarify
    with pytest.raises(ConfigError, match="clarify_divergence"):
        load_config(None, ["serve.clarify_divergence=2"])
    body = ChatRequest.model_validate({"model": "imoe", "messages": [{"role": "user", "content": "hi"}],
                                       "imoe": {"clarify": True}})
    assert body.imoe.clarify is True
    assert ChatRequest.model_validate({"model": "imoe", "messages": [{"role": "user", "content": "hi"}]}).imoe.clarify is None
    with pytest.raises(ValidationError):
        ChatRequest.model_validate({"model": "imoe", "messages": [], "imoe": {"clarify": "maybe"}})


def test_the_response_carries_a_clarification_only_when_there_is_one():
    from imoe_ray.serving.pipeline import Plan

    plan = Plan("imoe", "basic", "p", {"a": 0.5, "b": 0.5}, clarify=True)
    assert "clarification" not in plan.imoe() and "clarify" not in plan.imoe()
    plan.clarification = clarify_route("sockets", {"a": 0.5, "b": 0.5}, ON).to_json()
    out = plan.imoe()["clarification"]
    assert out["options"] == ["a", "b"] and out["question"].startswith("Do you mean a or b?")
