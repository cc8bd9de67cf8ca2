"""The one request path of the HTTP endpoints and the job queue (`imoe_ray.serving.requests`), and
the admission bound in front of it (`limits.Admission`). No Ray cluster: a tokenizer trained here,
ASGI called directly, and calls that fail the way a dead or full expert replica fails."""

from __future__ import annotations

import asyncio
import json

import pytest
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from imoe_ray.config import ServeConfig
from imoe_ray.experts.base_model import train_tokenizer
from imoe_ray.job_queue.api import JobRequest
from imoe_ray.serving import openai_api as oa
from imoe_ray.serving.limits import Admission, TokenBudget
from imoe_ray.serving.requests import RequestPath, Sampling, experts_call

TEXTS = ["the quick brown fox jumps over the lazy dog", "a histogram of the values with matplotlib",
         "the router sends each request to its experts", "user: assistant: system:"] * 4


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, 200)


def _path(tokenizer, context: int = 128, **settings) -> RequestPath:
    return RequestPath(tokenizer, context, ServeConfig(**settings), stop_ids=(tokenizer.eos_token_id, 7))


def test_a_job_and_a_completion_are_refused_with_the_same_error(tokenizer):
    path = _path(tokenizer, max_prompt_chars=100)
    errors = []
    for body in (oa.CompletionRequest.model_validate({"model": "imoe", "prompt": "x" * 101}),
                 JobRequest.model_validate({"prompt": "x" * 101})):
        with pytest.raises(oa.ApiError) as e:
            path.check(body)
        errors.append(e.value.body())
    assert errors[0] == errors[1] and errors[0]["error"]["param"] == "prompt"


def test_a_job_is_held_to_the_job_limit_of_tokens(tokenizer):
    jobs = RequestPath(tokenizer, 128, ServeConfig(max_tokens_limit=1000), stop_ids=(0,),
                       budget=TokenBudget(128, 8, 16))
    jobs.check(JobRequest.model_validate({"prompt": "hi", "max_tokens": 16}))
    with pytest.raises(oa.ApiError, match="at most 16") as e:
        jobs.check(JobRequest.model_validate({"prompt": "hi", "max_tokens": 17}))
    assert e.value.param == "max_tokens"


def test_the_prompt_that_fills_the_context_names_its_parameter(tokenizer):
    path = _path(tokenizer, context=16)
    chat = oa.ChatRequest.model_validate({"model": "imoe", "messages": [{"role": "user", "content": "the fox " * 40}]})
    prompt = path.prompt(chat)
    assert prompt.param == "messages" and "fox" in prompt.query
    with pytest.raises(oa.ApiError, match="maximum context length is 16") as e:
        path.plan(planner=None, model="imoe", prompt=prompt, options=oa.ImoeOptions())  # refused before routing
    assert e.value.param == "messages"


def test_every_stop_token_of_the_model_reaches_the_decoder(tokenizer):
    path = _path(tokenizer)
    ids, limit = path.encode("the quick brown fox", None)
    request = path.generation({"base": 1.0}, ids, limit, Sampling.of(JobRequest.model_validate({"prompt": "hi"})))
    assert request.stop_ids == (tokenizer.eos_token_id, 7) and request.max_new_tokens == ServeConfig().max_tokens


def _calls(*outcomes):
    """A `send` whose n-th call yields parts or raises as a replica would."""
    sent = []

    def send():
        outcome = outcomes[len(sent)]
        sent.append(outcome)

        async def parts():
            for item in outcome:
                if isinstance(item, BaseException):
                    raise item
                yield item
        return parts()
    return send, sent


def _collect(send, **kwargs) -> list:
    async def run():
        return [part async for part in experts_call(send, **kwargs)]
    return asyncio.run(asyncio.wait_for(run(), 30))


def test_a_dead_replica_before_the_first_part_is_retried():
    send, sent = _calls([RayActorError()], [{"tokens": [1]}, {"tokens": [2]}])
    retried = []
    assert _collect(send, retry_s=30, on_retry=retried.append) == [{"tokens": [1]}, {"tokens": [2]}]
    assert len(sent) == 2 and len(retried) == 1


def test_a_dead_replica_after_a_part_is_a_503_not_a_duplicate():
    send, sent = _calls([{"tokens": [1]}, RayActorError()], [{"tokens": [1]}])

    async def run():
        got = []
        with pytest.raises(oa.ApiError) as e:
            async for part in experts_call(send, retry_s=30):
                got.append(part)
        return got, e.value
    got, error = asyncio.run(run())
    assert got == [{"tokens": [1]}] and error.status == 503 and len(sent) == 1


def test_full_replicas_refuse_a_client_at_once_and_hold_a_job():
    send, sent = _calls([BackPressureError(num_queued_requests=1, max_queued_requests=1)], [{"tokens": [3]}])
    with pytest.raises(oa.ApiError) as e:
        _collect(send, retry_s=30)
    assert e.value.status == 429 and len(sent) == 1
    send, sent = _calls([BackPressureError(num_queued_requests=1, max_queued_requests=1)], [{"tokens": [3]}])
    assert _collect(send, retry_s=30, on_backpressure="wait") == [{"tokens": [3]}] and len(sent) == 2


def test_admission_turns_away_the_request_past_the_bound_before_reading_it():
    release = asyncio.Event()
    served = []

    async def app(scope, receive, send):
        await receive()
        served.append(scope["path"])
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    admission = Admission(app, bound=2)

    def call(path: str = "/v1/chat/completions"):
        sent, read = [], []

        async def receive():
            read.append(True)
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message):
            sent.append(message)
        return admission({"type": "http", "method": "POST", "path": path, "headers": []}, receive, send), sent, read

    async def run():
        first, second = call(), call()
        held = [asyncio.create_task(first[0]), asyncio.create_task(second[0])]
        while len(served) < 2:
            await asyncio.sleep(0)
        third, sent, read = call()
        await third  # answered without waiting for the two in flight
        health, health_sent, _ = call("/healthz")  # paths that do no work are not counted
        health_task = asyncio.create_task(health)
        release.set()
        await asyncio.gather(*held, health_task)
        fourth, fourth_sent, _ = call()
        await fourth
        return sent, read, health_sent, fourth_sent

    sent, read, health_sent, fourth_sent = asyncio.run(asyncio.wait_for(run(), 30))
    start = sent[0]
    headers = dict(start["headers"])
    assert start["status"] == 429 and headers[b"retry-after"] == b"1" and not read
    assert json.loads(sent[1]["body"])["error"]["code"] == "rate_limit_exceeded"
    assert health_sent[0]["status"] == 200 and fourth_sent[0]["status"] == 200


def test_an_ensemble_may_name_its_number_of_experts():
    three = oa.ImoeOptions.model_validate({"ensemble": 3})
    assert three.ensemble is True and three.top_k == 3
    plain = oa.ImoeOptions.model_validate({"ensemble": True, "top_k": 2})
    assert plain.ensemble is True and plain.top_k == 2
    assert oa.ImoeOptions.model_validate({"ensemble": False}).ensemble is False
    for bad in ({"ensemble": 0}, {"ensemble": 65}, {"ensemble": 3, "top_k": 2}):
        with pytest.raises(ValueError, match="ensemble"):
            oa.ImoeOptions.model_validate(bad)
