"""Request-time t_C (the selection rule) and cross-talk (t_CT): plain library code, no Ray."""

from __future__ import annotations

import numpy as np
import pytest

from imoe_ray.config import Config, ConfigError, load_config
from imoe_ray.experts.base_model import train_tokenizer
from imoe_ray.fusion.crosstalk import clip_tokens, cross_talk_experts, cross_talk_prompt, second_round
from imoe_ray.routing.router import adaptive_threshold
from imoe_ray.routing.threshold import AdaptiveThreshold, select
from imoe_ray.serving.openai_api import ImoeOptions
from imoe_ray.serving.pipeline import Plan

TEXTS = ["numpy arrays hold numbers in a grid and broadcasting lines their shapes up",
         "the http server answers requests on a socket and closes the connection",
         "regular expressions match patterns in strings with groups and anchors"] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, 300)


# ---- request-time t_C ------------------------------------------------------------------------

def test_fixed_policy_keeps_every_category_above_t_c():
    out = select(np.array([0.5, 0.25, 0.15, 0.1]), 0.2)
    assert out.categories == [0, 1] and out.t_c == 0.2 and out.complexity is None
    assert select(np.array([0.15, 0.15, 0.7]), 0.2).categories == [2]
    assert select(np.array([0.19, 0.18, 0.17]), 0.2).categories == []  # the top misses the store's t_C: fallback


def test_adaptive_policy_adds_runners_up_only_when_the_router_is_unsure():
    entropy_only = AdaptiveThreshold(t_complex=0.05, t_simple=0.5, complexity_words=12, close_margin=0.1,
                                     weights=(0.0, 1.0, 0.0), max_experts=2)
    sure = select(np.array([0.9, 0.06, 0.04]), 0.2, entropy_only, content_words=30)
    unsure = select(np.array([0.45, 0.35, 0.2]), 0.2, entropy_only, content_words=3)
    assert sure.categories == [0] and unsure.categories == [0, 1]  # the cap keeps the third out
    assert unsure.complexity > sure.complexity and unsure.t_c < sure.t_c
    # length carries no weight here: the same probabilities give the same decision at any length
    assert select(np.array([0.9, 0.06, 0.04]), 0.2, entropy_only, content_words=1).categories == [0]
    no_cap = AdaptiveThreshold(0.05, 0.5, 12, 0.1, (0.0, 1.0, 0.0), None)
    assert select(np.array([0.45, 0.35, 0.2]), 0.2, no_cap).categories == [0, 1, 2]


def test_adaptive_settings_come_from_the_config_and_old_routers_get_defaults():
    cfg = load_config(None, ["router.threshold_policy=adaptive", "router.complexity_weights=[0,2,1]",
                             "router.max_experts=2", "router.adaptive_range=[0.05,0.4]"])
    made = adaptive_threshold(cfg.router.model_dump())
    assert made.weights == (0.0, 2.0, 1.0) and made.max_experts == 2 and (made.t_complex, made.t_simple) == (0.05, 0.4)
    # settings saved by a router trained before these fields existed
    old = {"threshold_policy": "adaptive", "adaptive_range": [0.1, 0.6], "complexity_words": 12, "close_margin": 0.1}
    assert adaptive_threshold(old).weights == tuple(Config().router.complexity_weights)
    assert adaptive_threshold({"threshold_policy": "fixed"}) is None
    with pytest.raises(ConfigError, match="complexity_weights"):
        load_config(None, ["router.complexity_weights=[0,0,0]"])


# ---- cross-talk (t_CT) -----------------------------------------------------------------------

def test_cross_talk_needs_two_strong_experts():
    experts = ["numpy", "http", "regex"]
    assert cross_talk_experts(["numpy", "http", "regex"], [0.45, 0.35, 0.2], experts, 0.3) == ["numpy", "http"]
    assert cross_talk_experts(["numpy", "http"], [0.7, 0.25], experts, 0.3) == []        # one strong: none
    assert cross_talk_experts(["numpy", "http"], [0.5, 0.4], ["numpy"], 0.3) == []       # http not in the plan
    # a folded category adds to the expert that serves it
    assert cross_talk_experts(["numpy", "arrays", "http"], [0.2, 0.2, 0.6], experts, 0.3,
                              {"arrays": "numpy"}) == ["http", "numpy"]
    assert cross_talk_experts(["base", "numpy"], [0.5, 0.5], ["base", "numpy"], 0.3) == []


def test_second_round_prompts_read_the_others_drafts_within_the_budget(tokenizer):
    drafts = {"numpy": "use numpy arrays and broadcasting " * 10, "http": "answer on the http socket " * 10,
              "regex": "match the pattern with groups"}
    prompts = second_round("How do I serve arrays?", drafts, ["numpy", "http"], tokenizer, budget_tokens=24)
    assert set(prompts) == {"numpy", "http"}  # regex is not strong: it keeps its first draft
    assert prompts["numpy"].startswith("[http] answer on the http") and "[numpy]" not in prompts["numpy"]
    assert prompts["http"].startswith("[numpy] use numpy arrays") and "[http]" not in prompts["http"]
    for p in prompts.values():
        context, question = p.rsplit("\n\n", 1)
        assert question == "How do I serve arrays?"
        assert len(tokenizer.encode(context, add_special_tokens=False)) <= 24
    # three experts share the budget; each still appears
    three = cross_talk_prompt("q", [("a", drafts["numpy"]), ("b", drafts["http"])], tokenizer, 40)
    assert "[a] " in three and "[b] " in three
    assert len(tokenizer.encode(three.rsplit("\n\n", 1)[0], add_special_tokens=False)) <= 40
    assert cross_talk_prompt("q", [], tokenizer, 40) == "q"
    assert clip_tokens("short  text", 50, tokenizer) == "short text"


def test_plan_reports_cross_talk_and_the_request_may_ask_for_it():
    plan = Plan("imoe", "optimized", "q", {"numpy": 0.6, "http": 0.4}, fusion="summarizer",
                cross_talk=["numpy", "http"])
    assert plan.imoe()["cross_talk"] == ["numpy", "http"]
    assert Plan("imoe", "basic", "q", {"numpy": 1.0}).imoe()["cross_talk"] == []
    assert ImoeOptions(cross_talk=True).cross_talk is True and ImoeOptions().cross_talk is None
    cfg = load_config(None, ["serve.cross_talk=true", "serve.t_ct=0.25", "serve.cross_talk_tokens=32"])
    assert (cfg.serve.cross_talk, cfg.serve.t_ct, cfg.serve.cross_talk_tokens) == (True, 0.25, 32)
    with pytest.raises(ConfigError, match="t_ct"):
        load_config(None, ["serve.t_ct=1.5"])


def test_planner_sets_cross_talk_for_summarized_plans_with_two_strong_experts(built):
    """The planner's rule on the built store's real router: the experts of a summarized plan whose
    probability reaches t_CT, when at least two do; never for the token-level mixture or when the
    request says no."""
    from imoe_ray.experts.mixture import expert_prior
    from imoe_ray.routing.stage import load_router
    from imoe_ray.serving.pipeline import Planner

    cfg, store, _ = built
    router = load_router(store, cfg)
    experts = sorted({router.served_by.get(p.name, p.name) for p in router.profiles}) + ["summarizer"]
    on = Planner(router, experts, "basic", top_k=2, cross_talk=True, t_ct=0.001)
    off = Planner(router, experts, "basic", top_k=2, t_ct=0.001)
    summarize = ImoeOptions(ensemble=True, top_k=2, fusion="summarizer")
    talked = 0
    for query in ("numpy arrays and http server sockets", "plot a histogram of the test results",
                  "regular expressions in the csv file", "train the model on the cluster"):
        plan = on.plan("imoe", query, query, summarize)
        prior = expert_prior(router.route(query).all_probabilities, router.served_by)
        strong = sorted((e for e in plan.experts if prior.get(e, 0.0) >= 0.001), key=lambda e: -prior[e])
        assert plan.fusion == "summarizer" and plan.cross_talk == (strong if len(strong) >= 2 else [])
        assert plan.imoe()["cross_talk"] == plan.cross_talk
        talked += bool(plan.cross_talk)
        assert on.plan("imoe", query, query, ImoeOptions(ensemble=True, top_k=2, fusion="mixture")).cross_talk == []
        assert on.plan("imoe", query, query, summarize.model_copy(update={"cross_talk": False})).cross_talk == []
        assert off.plan("imoe", query, query, summarize).cross_talk == []          # serve.cross_talk off
        asked = off.plan("imoe", query, query, summarize.model_copy(update={"cross_talk": True}))
        assert asked.cross_talk == plan.cross_talk                                 # ... unless the request asks
    assert talked, "no query had two experts above t_CT"
