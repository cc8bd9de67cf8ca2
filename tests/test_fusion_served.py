"""Plan-and-copy fusion and clarification through the real served app: `imoe serve` on a copy of the
session's store with a (tiny) summarizer, driven over HTTP by the official openai client."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from imoe_ray.config import load_config
from imoe_ray.fusion.clarify import ClarifySettings, clarify_drafts
from imoe_ray.fusion.constrained import plan_fusion
from imoe_ray.fusion.crosstalk import second_round

from conftest import start_imoe_serve, stop_imoe_serve

TINY_FUSION = ["fusion.summarizer=true", "fusion.examples=400", "fusion.epochs=1", "fusion.batch_size=8",
               "fusion.r=4", "fusion.alpha=8", "fusion.draft_words=4", "fusion.question_words=[2,3]",
               "fusion.max_words=[5,6]"]
SERVE = ["serve.expert_cpus=0.5", "serve.router_cpus=0.25", "serve.max_tokens=8", "serve.retry_s=90",
         "serve.max_replicas=1", "serve.clarify_tie_margin=1.0", "serve.clarify_divergence=0.0",
         "serve.clarify_query_words=3",  # every short query is a near tie; any two different drafts disagree
         "serve.t_ct=0.001", "serve.cross_talk_tokens=40"]  # cross-talk (when a request asks): every selected expert
PROMPT = "the model reads the file and the worker sends each request to the node"


@pytest.fixture(scope="module")
def served(built, ray_cluster, tmp_path_factory):
    from imoe_ray.build import build

    cfg, store, _ = built
    root = tmp_path_factory.mktemp("fusion-served") / "store"
    shutil.copytree(store.uri, root, ignore=shutil.ignore_patterns("runs"))
    build(load_config(None, TINY_FUSION, base=cfg.model_dump(mode="json") | {"store": str(root)}), until="summarizer",
          report=lambda m: None)
    proc, base = start_imoe_serve(root, ray_cluster["env"], SERVE, root.parent / "serve.log")
    from openai import OpenAI

    yield root, OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)
    stop_imoe_serve(proc)


def _experts(root: Path) -> list[str]:
    return [e["name"] for e in json.loads((root / "experts" / "index.json").read_text())["experts"]]


def _alone(client, expert: str, prompt: str) -> str:
    return client.completions.create(model=expert, prompt=prompt, max_tokens=8, temperature=0).choices[0].text


def _built_from(answer: str, drafts: list[tuple[str, str]], prompt: str = PROMPT) -> bool:
    """The fused answer is the plan's head followed by one of its sources, as planned from `drafts`."""
    plan = plan_fusion(prompt, drafts)
    return any(" ".join(f"{plan.head_text} {s}".split()).startswith(" ".join(answer.split()))
               for s in plan.sources or [""])


def _fused(client, prompt: str = PROMPT, **imoe):
    return client.completions.create(model="imoe", prompt=prompt, max_tokens=8, temperature=0,
                                     extra_body={"imoe": {"ensemble": True, "top_k": 2, "fusion": "summarizer"} | imoe})


@pytest.mark.slow  # a store, a summarizer and `imoe serve`: minutes
def test_the_served_summarizer_copies_the_drafts_and_obeys_them(served):
    root, client = served
    reply = _fused(client)
    imoe = reply.model_extra["imoe"]
    assert imoe["fusion"] == "summarizer" and len(imoe["experts"]) == 2 and "clarification" not in imoe
    # each expert's draft is what that expert answers alone to the same request
    drafts = [(e, client.completions.create(model=e, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text)
              for e in imoe["experts"]]
    plan = plan_fusion(PROMPT, drafts)
    answer = " ".join(reply.choices[0].text.split())
    built_from = [" ".join(f"{plan.head_text} {s}".split()) for s in plan.sources or [""]]
    assert answer and any(b.startswith(answer) for b in built_from), (answer, plan.to_json())
    assert reply.choices[0].finish_reason in ("stop", "length") and imoe["timings_ms"]["fuse"] > 0
    # asked for clarification, the server applies the same rule to the same drafts
    asked = _fused(client, clarify=True)
    expected = clarify_drafts(drafts, ClarifySettings(True, divergence=0.0, tie_margin=1.0, query_words=3))
    got = asked.model_extra["imoe"].get("clarification")
    assert got == (expected.to_json() if expected else None)
    if expected:
        assert asked.choices[0].text == expected.question and asked.choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_a_short_query_with_a_near_tie_gets_a_clarifying_question(served):
    root, client = served
    reply = client.chat.completions.create(model="imoe", max_tokens=8, messages=[{"role": "user", "content": "the file"}],
                                           extra_body={"imoe": {"clarify": True, "ensemble": True, "top_k": 2}})
    c = reply.model_extra["imoe"]["clarification"]
    assert c["reason"] == "near_tie" and len(c["options"]) >= 2 and set(c["options"]) <= set(_experts(root))
    assert reply.choices[0].message.content == c["question"] and reply.choices[0].finish_reason == "stop"
    assert all(o in c["question"] for o in c["options"])
    stream = client.chat.completions.create(model="imoe", max_tokens=8, stream=True,
                                            messages=[{"role": "user", "content": "the file"}],
                                            extra_body={"imoe": {"clarify": True, "ensemble": True, "top_k": 2}})
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == c["question"]
    assert chunks[-1].model_extra["imoe"]["clarification"] == c
    # off for this request (the server's default is off too): an ordinary answer
    plain = client.chat.completions.create(model="imoe", max_tokens=8, messages=[{"role": "user", "content": "the file"}],
                                           extra_body={"imoe": {"clarify": False, "ensemble": True, "top_k": 2}})
    assert "clarification" not in plain.model_extra["imoe"]
    plain = client.chat.completions.create(model="imoe", max_tokens=8, messages=[{"role": "user", "content": "the file"}])
    assert "clarification" not in plain.model_extra["imoe"]


@pytest.mark.slow
def test_cross_talk_redrafts_each_strong_expert_reading_the_others_before_fusion(served):
    from transformers import AutoTokenizer

    root, client = served
    prompt = "the worker sends the request"  # short: the tiny LM's 64 tokens hold it and the other's draft
    reply = _fused(client, prompt, cross_talk=True)
    imoe = reply.model_extra["imoe"]
    assert len(imoe["experts"]) == 2 and sorted(imoe["cross_talk"]) == sorted(imoe["experts"]), imoe
    # round 1: what each expert answers alone; round 2: each again, the other's draft before the prompt
    first = {e: _alone(client, e, prompt) for e in imoe["experts"]}
    prompts = second_round(prompt, first, imoe["cross_talk"], AutoTokenizer.from_pretrained(root / "base"), 40)
    assert all(p.endswith(prompt) and p != prompt for p in prompts.values()), (first, prompts)
    second = [(e, _alone(client, e, prompts[e])) for e in imoe["experts"]]
    answer = reply.choices[0].text
    assert answer and _built_from(answer, second, prompt), (answer, second)
    assert _fused(client, prompt).model_extra["imoe"]["cross_talk"] == []   # off unless asked (serve.cross_talk: false)
