"""Requests that must not hurt other requests: bad numbers refused at the door, a request whose own
decoding fails fails alone, limits checked before any work, bodies bounded. No Ray: a tiny random
model and the library's batcher, and the ASGI middleware under Starlette's test client."""

from __future__ import annotations

import asyncio

import pytest
import torch
from pydantic import ValidationError

from imoe_ray.config import ServeConfig
from imoe_ray.job_queue.api import JobRequest
from imoe_ray.serving import openai_api as oa
from imoe_ray.serving.batcher import ContinuousBatcher
from imoe_ray.serving.generation import DecodeBatch, GenerationRequest
from imoe_ray.serving.limits import BodyLimit, check_prompt_tokens, check_request
from imoe_ray.serving.lora_bank import BASE, AdapterBank


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("field, value", [("temperature", 1e-50), ("temperature", 1e-4), ("temperature", 2.5),
                                          ("seed", 2**64), ("seed", -(2**63) - 1)])
def test_numbers_that_break_sampling_are_refused_naming_the_parameter(field, value):
    for request in (oa.ChatRequest, oa.CompletionRequest):
        body = {"model": "imoe", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}], field: value}
        with pytest.raises(ValidationError) as e:
            request.model_validate(body)
        assert e.value.errors()[0]["loc"][0] == field
    with pytest.raises(ValidationError):
        JobRequest.model_validate({"agent": "a", "prompt": "hi", field: value})
    with pytest.raises(ValueError, match=field):
        GenerationRequest([1, 2], {BASE: 1.0}, **{field: value})


def test_the_edges_of_the_ranges_are_accepted():
    oa.CompletionRequest(model="imoe", prompt="hi", temperature=0, seed=2**63 - 1)
    oa.CompletionRequest(model="imoe", prompt="hi", temperature=1e-3, seed=-(2**63))
    JobRequest(agent="a", prompt="hi", temperature=2, seed=2**63 - 1)


def test_a_request_whose_decoding_fails_fails_alone(tiny_model):
    """A long request decodes next to one whose sampling raises (its temperature forced below the
    validated range, as a bug or a NaN would): the long one ends normally, the bad one with its error."""
    async def run():
        batcher = ContinuousBatcher(DecodeBatch(tiny_model, AdapterBank(tiny_model)), max_rows=4, capacity=4)
        good = batcher.submit(GenerationRequest([1, 2, 3], {BASE: 1.0}, max_new_tokens=12))
        bad_request = GenerationRequest([4, 5], {BASE: 1.0}, max_new_tokens=12, temperature=1.0)
        bad_request.temperature = 1e-50  # past validation: logprobs / 1e-50 → inf → NaN probabilities
        bad = batcher.submit(bad_request)
        good_parts = [p async for p in batcher.parts(good)]
        with pytest.raises(RuntimeError):
            async for _ in batcher.parts(bad):
                pass
        return good_parts

    parts = asyncio.run(asyncio.wait_for(run(), 60))
    assert parts[-1].finish_reason == "length" and len(parts[-1].tokens) == 12


def test_a_request_refused_when_it_joins_leaves_the_batch_going(tiny_model):
    async def run():
        batch = DecodeBatch(tiny_model, AdapterBank(tiny_model))
        batcher = ContinuousBatcher(batch, max_rows=4, capacity=4)
        good = batcher.submit(GenerationRequest([1, 2, 3], {BASE: 1.0}, max_new_tokens=8))
        bad_request = GenerationRequest([4, 5], {BASE: 1.0}, max_new_tokens=8, stop=("x",))
        batch.decode = None  # a stop string on a batch that cannot decode text: join raises
        bad = batcher.submit(bad_request)
        with pytest.raises(ValueError, match="stop strings"):
            async for _ in batcher.parts(bad):
                pass
        return [p async for p in batcher.parts(good)]

    parts = asyncio.run(asyncio.wait_for(run(), 60))
    assert parts[-1].finish_reason == "length" and len(parts[-1].tokens) == 8


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "hi"}] * 300}, "messages"),
    ({"messages": [{"role": "user", "content": "x" * 300_000}]}, "messages"),
    ({"prompt": "x" * 300_000}, "prompt"),
    ({"prompt": "hi", "stop": "s" * 1000}, "stop"),
    ({"prompt": "hi", "max_tokens": 10**6}, "max_tokens"),
    ({"prompt": "hi", "max_completion_tokens": 10**6}, "max_completion_tokens"),
])
def test_limits_are_checked_before_any_work(body, param):
    request = (oa.ChatRequest if "messages" in body else oa.CompletionRequest).model_validate({"model": "imoe", **body})
    with pytest.raises(oa.ApiError) as e:
        check_request(request, ServeConfig())
    assert e.value.status == 400 and e.value.param == param


def test_a_prompt_filling_the_context_is_refused():
    check_prompt_tokens(127, 128, "prompt")
    with pytest.raises(oa.ApiError, match="maximum context length is 128") as e:
        check_prompt_tokens(128, 128, "prompt")
    assert e.value.body()["error"]["code"] == "context_length_exceeded"


def test_job_seeds_stay_within_64_bits_step_after_step():
    from imoe_ray.job_queue.preemption import step_request
    from imoe_ray.job_queue.records import JobRecord

    record = JobRecord(agent="a", priority=0, prompt_ids=[1, 2], experts={BASE: 1.0}, max_tokens=8,
                       temperature=1.0, top_p=1.0, seed=2**63 - 1, stop_ids=[0])
    record.generated = [5, 6, 7]
    assert step_request(record, 4).seed == -(2**63) + 2


def _app(limit: int):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def echo(request):
        return JSONResponse({"bytes": len(await request.body())})

    app = Starlette(routes=[Route("/echo", echo, methods=["POST"])])
    app.add_middleware(BodyLimit, max_bytes=limit)
    return app


def test_bodies_over_the_limit_are_a_413_whether_declared_or_streamed():
    from starlette.testclient import TestClient

    client = TestClient(_app(1024))
    assert client.post("/echo", content=b"x" * 1000).json() == {"bytes": 1000}
    declared = client.post("/echo", content=b"x" * 5000)
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "request_too_large"
    streamed = client.post("/echo", content=iter([b"x" * 600, b"x" * 600]))  # chunked: no content-length
    assert streamed.status_code == 413 and "1024" in streamed.json()["error"]["message"]


def test_the_application_state_sets_the_limit():
    from starlette.testclient import TestClient

    app = _app(1 << 20)
    app.state.max_body_bytes = 100
    assert TestClient(app).post("/echo", content=b"x" * 200).status_code == 413
