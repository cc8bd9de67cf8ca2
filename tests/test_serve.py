"""Serving: the adapter bank against PEFT, batched decoding, and the Serve application over real HTTP
(`imoe serve` as a user runs it, joined to the session's cluster) driven by the official openai client."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
import requests
import torch

from imoe_ray.serving.generation import GenerationRequest, collect, decode_steps
from imoe_ray.serving.lora_bank import AdapterBank, AdapterError
from imoe_ray.serving.model import ServingModel

from conftest import launch_imoe_serve, start_imoe_serve, stop_imoe_serve

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="module")
def served_store(built) -> Path:
    cfg, store, _ = built
    return Path(store.root)


@pytest.fixture(scope="module")
def model(served_store) -> ServingModel:
    return ServingModel(served_store, threads=1)


def _expert_names(store: Path) -> list[str]:
    return [e["name"] for e in json.loads((store / "experts" / "index.json").read_text())["experts"]]


# ---- the library, without Ray -----------------------------------------------------------------

def test_bank_matches_peft_in_mixed_adapter_batches(served_store, model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = _expert_names(served_store)[:2] + ["dense"]
    for n in names:
        model.ensure(n)
    ids = torch.randint(3, model.tokenizer.vocab_size, (4, 12))
    rows = [names[0], names[1], "base", names[2]]
    with torch.inference_mode(), model.bank.use(rows):
        mixed = model.model(input_ids=ids).logits
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(served_store / "base"),
                                          str(served_store / "experts" / names[0]), adapter_name=names[0]).eval()
    reference.load_adapter(str(served_store / "experts" / names[1]), adapter_name=names[1])
    reference.load_adapter(str(served_store / "baselines" / "dense"), adapter_name="dense")
    with torch.inference_mode():
        for i, name in enumerate(rows):
            if name == "base":
                with reference.disable_adapter():
                    expected = reference(input_ids=ids[i: i + 1]).logits[0]
            else:
                reference.set_adapter(name)
                expected = reference(input_ids=ids[i: i + 1]).logits[0]
            assert torch.allclose(mixed[i], expected, atol=1e-5), name
        with model.bank.use(["base"] * 4):
            plain = model.model(input_ids=ids).logits
    assert not torch.allclose(plain[0], mixed[0], atol=1e-3), "the expert's adapter changed nothing"


def test_bank_lru_capacity_and_eviction(served_store):
    from transformers import AutoModelForCausalLM

    names = _expert_names(served_store)
    bank = AdapterBank(AutoModelForCausalLM.from_pretrained(served_store / "base"), capacity=1)
    bank.load(names[0], served_store / "experts" / names[0])
    bank.load(names[1], served_store / "experts" / names[1])
    assert list(bank.resident) == [names[1]]
    with pytest.raises(KeyError, match="not resident"):
        with bank.use([names[0]]):
            pass
    assert bank.evict(names[1]) and not bank.resident and bank.resident_bytes == 0


def test_bank_refuses_what_it_cannot_serve(served_store, tmp_path):
    from transformers import AutoModelForCausalLM

    bank = AdapterBank(AutoModelForCausalLM.from_pretrained(served_store / "base"))
    with pytest.raises(AdapterError, match="not a PEFT adapter directory"):
        bank.load("nothing", tmp_path)
    name = _expert_names(served_store)[0]
    dora = tmp_path / "dora"
    dora.mkdir()
    config = json.loads((served_store / "experts" / name / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    (dora / "adapter_model.safetensors").write_bytes((served_store / "experts" / name / "adapter_model.safetensors").read_bytes())
    with pytest.raises(AdapterError, match="DoRA"):
        bank.load("dora", dora)


def test_batched_decoding_equals_one_request_at_a_time(served_store, model):
    names = _expert_names(served_store)
    eos = model.tokenizer.eos_token_id
    prompts = [[eos] + model.tokenizer(t, add_special_tokens=False)["input_ids"]
               for t in ("the server sends the request", "a matrix", "parse the document and then")]
    requests_ = [GenerationRequest(prompts[0], {names[0]: 1.0}, 12),
                 GenerationRequest(prompts[1], {names[1]: 1.0}, 5),
                 GenerationRequest(prompts[2], {names[0]: 0.7, names[1]: 0.3}, 9),
                 GenerationRequest(prompts[1], {"base": 1.0}, 7, temperature=0.8, seed=3)]
    together = model.generate(requests_)
    alone = [model.generate([r])[0] for r in requests_]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert [len(g.token_ids) for g in together] == [12, 5, 9, 7]
    assert all(g.finish_reason == "length" for g in together)


def test_requests_joining_a_running_batch_decode_as_if_alone(served_store, model):
    """Continuous batching: requests join between steps (their cache padded into the batch's) and
    leave when done; every request gets exactly the tokens it gets decoded alone."""
    from imoe_ray.serving.generation import DecodeBatch

    names = _expert_names(served_store)
    eos = model.tokenizer.eos_token_id
    ids = lambda t: [eos] + model.tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    arrivals = {0: [GenerationRequest(ids("a matrix"), {names[0]: 1.0}, 6)],
                2: [GenerationRequest(ids("parse the xml document and walk its element tree"), {names[1]: 1.0}, 9),
                    GenerationRequest(ids("the socket"), {names[0]: 0.6, "base": 0.4}, 4)],
                7: [GenerationRequest(ids("the server sends the request"), {"base": 1.0}, 5, temperature=0.9, seed=7)],
                12: [GenerationRequest(ids("a"), {names[1]: 1.0}, 3)]}  # joins an empty batch again
    for n in names[:2]:
        model.ensure(n)
    batch, got, widths = DecodeBatch(model.model, model.bank, model.pad_id), {}, []
    keys = {}
    for step in range(40):
        for r in arrivals.get(step, []):
            keys[batch.join(r)] = r
        for key, (token, finish) in batch.step().items():
            got.setdefault(key, []).extend([] if finish == "stop" else [token])
        widths.append(0 if batch._mask is None else batch._mask.shape[1])
    assert not batch.requests and not batch.rows
    for key, r in keys.items():
        alone = model.generate([r])[0]
        assert got[key] == alone.token_ids, key
    assert widths[1] < widths[3], "a longer prompt joining widened the batch"
    assert max(widths) <= max(len(r.prompt_ids) for r in keys.values()) + 9, "padding columns were dropped"


def test_greedy_decoding_matches_transformers_generate(served_store, model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    name = _expert_names(served_store)[0]
    prompt = [model.tokenizer.eos_token_id] + model.tokenizer("the model", add_special_tokens=False)["input_ids"]
    ours = model.generate([GenerationRequest(prompt, {name: 1.0}, 10)])[0].token_ids
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(served_store / "base"),
                                     str(served_store / "experts" / name)).eval()
    ref = peft.generate(input_ids=torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                        eos_token_id=None, pad_token_id=model.pad_id)
    assert ours == ref[0, len(prompt):].tolist()


def test_stop_token_ends_a_request_without_text(model):
    prompt = [model.tokenizer.eos_token_id, 5, 6, 7]
    first = model.generate([GenerationRequest(prompt, {"base": 1.0}, 1)])[0].token_ids[0]
    out = model.generate([GenerationRequest(prompt, {"base": 1.0}, 8, stop_ids=(first,))])[0]
    assert out.token_ids == [] and out.finish_reason == "stop"
    steps = decode_steps(model.model, model.bank, [GenerationRequest(prompt, {"base": 1.0}, 50)], model.pad_id)
    partial, done = collect(steps, 1, budget_s=0.0)
    assert not done and len(partial[0].token_ids) == 1  # decoding can be handed back step by step
    rest, done = collect(steps, 1)
    assert done and len(rest[0].token_ids) == 49


def test_continuous_batcher_joins_requests_within_the_resident_capacity(served_store, model):
    """Requests submitted while others decode join them (up to `capacity` distinct experts and
    `max_rows` rows), the rest wait their turn; every request gets its tokens as if alone, streamed
    requests in several parts, and a client that leaves early frees its rows."""
    import asyncio

    from imoe_ray.serving.batcher import ContinuousBatcher
    from imoe_ray.serving.generation import DecodeBatch

    names = _expert_names(served_store)[:3]
    prompt = [model.tokenizer.eos_token_id] + model.tokenizer("the value", add_special_tokens=False)["input_ids"]
    reqs = [GenerationRequest(prompt, {names[0]: 1.0}, 12), GenerationRequest(prompt, {names[1]: 1.0}, 6),
            GenerationRequest(prompt, {names[0]: 0.5, names[2]: 0.5}, 5), GenerationRequest(prompt, {"base": 1.0}, 8)]
    alone = [model.generate([r])[0].token_ids for r in reqs]
    loaded, seen = [], []

    async def run(capacity: int) -> list[list[int]]:
        async def load(name):
            loaded.append(name)
            model.ensure(name)

        batcher = ContinuousBatcher(DecodeBatch(model.model, model.bank, model.pad_id), max_rows=4,
                                    capacity=capacity, load=load)
        step = batcher.batch.step

        def watched():
            seen.append((capacity, batcher.in_use(), len(batcher.batch.requests)))
            return step()

        batcher.batch.step = watched

        async def one(r, delay, every):
            await asyncio.sleep(delay)
            return [p async for p in batcher.parts(batcher.submit(r), every)]

        async def leaver():
            parts = batcher.parts(batcher.submit(GenerationRequest(prompt, {"base": 1.0}, 100)), 0.0)
            await parts.__anext__()
            await parts.aclose()  # the client goes away after its first part

        # All submitted before the batcher's loop takes its first step (each waits one tick, then
        # submits; the loop task runs after them): they overlap by construction, not by timing.
        parts = await asyncio.gather(one(reqs[0], 0, None), one(reqs[1], 0, 0.0), one(reqs[2], 0, None),
                                     one(reqs[3], 0, None), leaver())
        assert not batcher.batch.requests and not batcher.waiting, "the leaver's rows are gone"
        assert len(parts[1]) > 1 and parts[1][-1].finish_reason == "length"  # streamed in parts
        return [[t for p in ps for t in p.tokens] for ps in parts[:4]]

    async def too_wide():
        batcher = ContinuousBatcher(DecodeBatch(model.model, model.bank, model.pad_id), max_rows=1, capacity=3)
        wide, fine = batcher.submit(reqs[2]), batcher.submit(reqs[3])
        with pytest.raises(ValueError, match="max_batch_size"):
            [p async for p in batcher.parts(wide)]
        return [t for p in [p async for p in batcher.parts(fine)] for t in p.tokens]

    assert asyncio.run(too_wide()) == alone[3], "a request too wide for the batch fails alone"
    assert asyncio.run(run(capacity=1)) == alone
    # more experts than the capacity only for a request that needs them, decoding alone
    assert all(len(in_use) <= 1 or n == 1 for c, in_use, n in seen if c == 1)
    assert asyncio.run(run(capacity=3)) == alone
    assert any(len(in_use) >= 2 and n >= 2 for c, in_use, n in seen if c == 3), "different experts decoded together"
    assert set(loaded) == set(names)


def test_strict_mode_decodes_a_three_expert_mixture_with_one_adapter_resident(served_store, monkeypatch):
    """Capacity 1 (`serve.max_loaded_experts: 1`) through the replica's own path (the continuous
    batcher over `ServingModel.decode_batch`): a greedy mixture of three experts decodes one
    adapter at a time (never two resident, not even while one is read from the store) and gets
    exactly the tokens of capacity 3, where all three decode in one pass."""
    import asyncio

    from imoe_ray.serving import lora_bank
    from imoe_ray.serving.batcher import ContinuousBatcher

    names = _expert_names(served_store)[:3]
    assert len(names) == 3
    wide, strict = ServingModel(served_store, capacity=3, threads=1), ServingModel(served_store, capacity=1, threads=1)
    prompt = [wide.tokenizer.eos_token_id] + wide.tokenizer("parse the document and", add_special_tokens=False)["input_ids"]
    request = GenerationRequest(prompt, dict(zip(names, (0.5, 0.3, 0.2))), 10)
    expected = wide.generate([request])[0].token_ids
    assert wide.bank.most_resident == 3
    passes, reads, use, read = [], [], strict.bank.use, lora_bank.read_lora

    def watched_use(rows):
        passes.append((len(strict.bank.resident), set(rows)))
        return use(rows)

    def watched_read(name, *args, **kwargs):
        reads.append(len(strict.bank.resident))  # the adapter it replaces is gone before it is read
        return read(name, *args, **kwargs)

    strict.bank.use = watched_use
    monkeypatch.setattr(lora_bank, "read_lora", watched_read)

    async def served() -> list[int]:
        async def admit(name):
            strict.ensure(name)

        batcher = ContinuousBatcher(strict.decode_batch(), max_rows=4, capacity=1, load=admit)
        return [t for part in [p async for p in batcher.parts(batcher.submit(request))] for t in part.tokens]

    assert asyncio.run(served()) == expected
    assert reads and set(reads) == {0} and strict.bank.most_resident == 1
    assert all(n == 1 and len(rows) == 1 for n, rows in passes)
    assert len(passes) >= 3 * len(expected), "every step ran one pass per expert"
    assert len(reads) <= 3 + 2 * len(expected), "k - 1 loads per step: the resident expert's pass goes first"
    assert strict.generate([request])[0].token_ids == expected


# ---- the application over HTTP ----------------------------------------------------------------

SERVE_SETTINGS = ["serve.expert_cpus=0.5", "serve.router_cpus=0.25", "serve.max_loaded_experts=2",
                  "serve.max_tokens=16", "serve.retry_s=90", "serve.max_replicas=1"]


@pytest.fixture(scope="module")
def server(ray_cluster, served_store):
    """`imoe serve` in its own process, joined to the session's cluster, as a user starts it."""
    log = served_store.parent / "serve.log"
    proc, base = start_imoe_serve(served_store, ray_cluster["env"], SERVE_SETTINGS, log)
    yield {"url": f"{base}/v1", "base": base, "proc": proc, "log": log}
    stop_imoe_serve(proc)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["url"], api_key="unused", max_retries=0, timeout=120)


def test_chat_routed_with_the_imoe_object(client, served_store):
    reply = client.chat.completions.create(model="imoe", max_tokens=8,
                                           messages=[{"role": "user", "content": "How do I plot a histogram of a column?"}])
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 8
    imoe = reply.model_extra["imoe"]
    assert set(imoe) >= {"categories", "experts", "mode", "timings_ms"}
    assert set(imoe["timings_ms"]) == {"route", "retrieval", "compression", "load", "generate", "fuse"}
    assert imoe["mode"] == "basic" and imoe["experts"]
    assert set(imoe["experts"]) <= set(_expert_names(served_store)) | {"base"}
    assert imoe["timings_ms"]["generate"] > 0


def test_streaming_chat_gives_the_same_text(client, served_store):
    name = _expert_names(served_store)[0]
    messages = [{"role": "user", "content": "the request is sent to the server"}]
    whole = client.chat.completions.create(model=name, max_tokens=12, temperature=0, messages=messages)
    chunks = list(client.chat.completions.create(model=name, max_tokens=12, temperature=0, messages=messages,
                                                 stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].model_extra["imoe"]["experts"] == [name]


def test_forced_expert_completions_and_ensemble(client, served_store):
    names = _expert_names(served_store)
    forced = client.completions.create(model=names[1], prompt="The function returns", max_tokens=6, temperature=0)
    assert forced.model_extra["imoe"]["experts"] == [names[1]] and forced.choices[0].text
    again = client.completions.create(model=names[1], prompt="The function returns", max_tokens=6, temperature=0)
    assert again.choices[0].text == forced.choices[0].text
    ensemble = client.chat.completions.create(
        model="imoe", max_tokens=6, messages=[{"role": "user", "content": "parse the xml file"}],
        extra_body={"imoe": {"ensemble": True, "top_k": 2}})
    imoe = ensemble.model_extra["imoe"]
    assert len(imoe["experts"]) == 2 and imoe["fusion"] == "mixture"
    assert sum(imoe["weights"].values()) == pytest.approx(1.0, abs=1e-3)
    fast = client.chat.completions.create(model="imoe", max_tokens=4, messages=[{"role": "user", "content": "sockets"}],
                                          extra_body={"imoe": {"mode": "fast"}})
    assert fast.model_extra["imoe"]["mode"] == "fast" and len(fast.model_extra["imoe"]["experts"]) == 1


def test_optimized_request_cites_passages_and_learns(client, served_store):
    from imoe_ray.retrieval.knowledge_base import KnowledgeBase
    from imoe_ray.retrieval.learning import list_learned, remove_learned
    from imoe_ray.retrieval.serving import expert_categories

    name = _expert_names(served_store)[0]
    reply = client.chat.completions.create(
        model=name, temperature=0, messages=[{"role": "user", "content": "mean of a numpy array along an axis"}],
        extra_body={"imoe": {"mode": "optimized"}})
    imoe = reply.model_extra["imoe"]
    assert imoe["mode"] == "optimized" and imoe["passages"] == len(imoe["citations"]) > 0
    assert {c["table"] for c in imoe["citations"]} <= set(expert_categories(served_store)[name])
    assert all(c["chunk_id"] and c["score"] > 0 and c["text"].strip() for c in imoe["citations"])
    assert imoe["timings_ms"]["retrieval"] > 0 and imoe["compression_ratio"] >= 1.0
    streamed = list(client.chat.completions.create(
        model=name, temperature=0, stream=True, max_tokens=12, extra_body={"imoe": {"mode": "optimized"}},
        messages=[{"role": "user", "content": "standard deviation of a numpy array"}]))
    answer = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    kb = KnowledgeBase(served_store / "kb", lambda texts: None)
    deadline = time.time() + 60  # learning runs after the response, in the background
    ids = {reply.id, streamed[0].id}
    while True:
        mine = [r for r in list_learned(kb) if r["request_id"] in ids]
        if {r["request_id"] for r in mine} == ids or time.time() > deadline:
            break
        time.sleep(0.5)
    assert {r["request_id"] for r in mine} == ids, "a streamed response is learned as well as a plain one"
    assert all(r["table"] in expert_categories(served_store)[name] for r in mine)
    assert any(r["text"].endswith(answer.strip()) for r in mine if r["request_id"] == streamed[0].id)
    remove_learned(kb, list({r["chunk_id"] for r in mine}))  # the shared store as it was


def test_route_experts_models_endpoints(server, client, served_store):
    routed = requests.post(f"{server['url']}/route", json={"text": "numpy arrays and matrices"}, timeout=30).json()
    assert {"categories", "probabilities", "experts", "exit_layer", "latency_ms"} <= set(routed)
    experts = requests.get(f"{server['url']}/experts", timeout=30).json()
    assert [e["name"] for e in experts["data"]] == _expert_names(served_store)
    assert "dense" in experts["other_adapters"]
    assert {m.id for m in client.models.list()} >= {"imoe", "base", *_expert_names(served_store)}


def test_the_web_console_streams_an_answer_and_shows_the_routing(server, served_store):
    """The console at `/` in headless Chromium (Debian's chromium + chromium-driver, driven by
    Selenium): it lists the store's experts, streams an answer to a question and fills the routing
    panel and the citations; the screenshot is left in test-artifacts/console.png."""
    import shutil

    chromium, chromedriver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        assert requests.get(f"{server['base']}/", timeout=30).headers["content-type"].startswith("text/html")
        browser.get(f"{server['base']}/")
        WebDriverWait(browser, 120).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#experts-list li.expert"))
        listed = {e.get_attribute("data-name") for e in browser.find_elements(By.CSS_SELECTOR, "#experts-list li.expert")}
        assert listed == set(_expert_names(served_store))
        browser.find_element(By.ID, "question").send_keys("How do I sort the rows of a numpy array?")
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 300).until(
            lambda b: b.find_elements(By.ID, "answer-latest") and
            b.find_element(By.ID, "answer-latest").get_attribute("data-done") == "true")
        answer = browser.find_element(By.ID, "answer-latest")
        assert "error" not in answer.get_attribute("class"), answer.text
        assert " ms" in answer.find_element(By.CSS_SELECTOR, ".meta").text
        assert browser.find_element(By.ID, "route-experts").text.strip()
        assert browser.find_element(By.ID, "route-timings").text.strip() not in ("", "–")
        cited = browser.find_elements(By.CSS_SELECTOR, "#citations li .text")
        assert cited and cited[0].text.strip(), "optimized mode cites passages with their text"
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "console.png"))
        browser.quit()


def test_every_metric_of_the_grafana_dashboard_is_exported(ray_session, client):
    """deploy/grafana/imoe-dashboard.json queries only metrics the deployments define, under the names
    Ray exports them by (`ray_` prefix, `_total` for counters, `_bucket` for histograms); those a chat
    request produces are on a node's Prometheus endpoint after a streamed and a whole answer (Ray
    exports every few seconds: polled)."""
    import re

    import ray

    names = set(re.findall(r"ray_imoe_[a-z_]+", (REPO / "deploy" / "grafana" / "imoe-dashboard.json").read_text()))
    code = "".join(p.read_text() for p in (REPO / "serve_apps").glob("*.py"))
    kinds = dict((name, kind) for kind, name in re.findall(r'metrics\.(\w+)\(\s*"(imoe_\w+)"', code))
    suffix = {"Counter": "_total", "Histogram": "_bucket", "Gauge": ""}
    for name in names:
        base = re.sub(r"_(bucket|total)$", "", name.removeprefix("ray_"))
        assert base in kinds, f"the dashboard names {name}, which no deployment defines"
        assert name == f"ray_{base}{suffix[kinds[base]]}", f"{name}: a {kinds[base]} is exported as ray_{base}{suffix[kinds[base]]}"
    per_request = {"ray_imoe_requests_total", "ray_imoe_routing_latency_ms_bucket", "ray_imoe_ttft_ms_bucket",
                   "ray_imoe_tokens_per_s_bucket", "ray_imoe_completion_tokens_total", "ray_imoe_batch_rows_bucket"}
    assert per_request <= names
    for stream in (True, False):
        reply = client.chat.completions.create(model="imoe", stream=stream, max_tokens=4,
                                               messages=[{"role": "user", "content": "numpy arrays"}])
        list(reply) if stream else reply
    ports = [n["MetricsExportPort"] for n in ray.nodes() if n["Alive"]]
    deadline, missing = time.time() + 120, per_request
    while missing and time.time() < deadline:
        exported = set()
        for port in ports:
            text = requests.get(f"http://{ray.util.get_node_ip_address()}:{port}/metrics", timeout=30).text
            exported |= set(re.findall(r"^(\w+)[{ ]", text, flags=re.M))
        missing = per_request - exported
        time.sleep(2)
    assert not missing, f"named by the dashboard, not exported after requests: {sorted(missing)}"


@pytest.mark.parametrize("body, status, param", [
    ('{"model": "imoe", "messages": [', 400, None),
    ('[1, 2]', 400, None),
    ('{"model": "imoe"}', 400, "messages"),
    ('{"model": "imoe", "messages": [{"role": "user", "content": "hi"}], "temperature": 7}', 400, "temperature"),
    ('{"model": "imoe", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', 400, "max_tokens"),
    ('{"model": "imoe", "messages": [{"role": "user", "content": "hi"}], "n": 3}', 400, None),
    ('{"model": "imoe", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}', 400, "max_tokens"),
    ('{"model": "no-such-expert", "messages": [{"role": "user", "content": "hi"}]}', 404, "model"),
    ('{"model": "imoe", "messages": [{"role": "user", "content": "hi"}], "imoe": {"mode": "turbo"}}', 400, "imoe.mode"),
])
def test_bad_requests_get_openai_shaped_errors(server, body, status, param):
    r = requests.post(f"{server['url']}/chat/completions", data=body, headers={"Content-Type": "application/json"},
                      timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    if param:
        assert error["param"] == param


def test_summarizer_fusion_on_a_store_without_one_is_a_400(server, served_store):
    """The session's store is built without a summarizer (conftest: fusion.summarizer=false): asking
    for one says so, naming the parameter, instead of fusing otherwise."""
    assert not (served_store / "fusion" / "summarizer").exists()
    body = {"model": "imoe", "max_tokens": 8, "messages": [{"role": "user", "content": "parse the xml file"}],
            "imoe": {"ensemble": True, "top_k": 2, "fusion": "summarizer"}}
    r = requests.post(f"{server['url']}/chat/completions", json=body, timeout=120)
    assert r.status_code == 400 and r.json()["error"]["param"] == "imoe.fusion", r.text


def test_over_long_prompt_is_a_400_naming_the_limit(client):
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as err:
        client.chat.completions.create(model="imoe", max_tokens=8,
                                       messages=[{"role": "user", "content": "socket buffers " * 400}])
    assert err.value.body["code"] == "context_length_exceeded"
    assert "maximum context length" in err.value.body["message"]


def test_a_replica_crash_mid_request_is_survived(ray_session, server, client, served_store):
    """Kill the expert replica while requests decode: each is retried (the `imoe` object counts the
    retries) or answered with a 5xx JSON error, none hangs, and the next request succeeds."""
    import ray
    from ray.util.state import list_actors

    name = _expert_names(served_store)[0]
    outcomes = []
    url = urllib.parse.urlsplit(server["url"])

    def send(i: int) -> http.client.HTTPConnection:
        """The whole request written to the socket before this returns: it is on its way to the server."""
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=240)
        conn.request("POST", f"{url.path}/completions", json.dumps({
            "model": name, "prompt": f"request {i}", "max_tokens": 48, "temperature": 1.0, "seed": i}),
            {"content-type": "application/json"})
        return conn

    def answer(conn: http.client.HTTPConnection):
        r = conn.getresponse()
        outcomes.append((r.status, json.loads(r.read())))

    replicas = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if "Experts" in (a.class_name or "")]
    assert replicas, "no live expert replica"
    replica = ray.get_actor(replicas[0].name, namespace="serve")
    workers = [threading.Thread(target=answer, args=(send(i),)) for i in range(12)]
    for w in workers:
        w.start()
    # A stream's first token proves the replica is decoding (on a loaded machine a fixed sleep may
    # kill it before any request arrived). The requests above were written to the server before this
    # one, so they decode in the same continuous batch, each with more than one token still to go.
    probe = requests.post(f"{server['url']}/completions", stream=True, timeout=240, json={
        "model": name, "prompt": "probe", "max_tokens": 40, "stream": True})
    next(line for line in probe.iter_lines() if line.startswith(b"data:"))
    ray.kill(replica, no_restart=True)
    for w in workers:
        w.join(timeout=240)
    probe.close()
    assert not any(w.is_alive() for w in workers), "a request hung after its replica died"
    assert all(s == 200 or (s >= 500 and "error" in body) for s, body in outcomes), outcomes
    assert any(s >= 500 or body["imoe"]["retries"] for s, body in outcomes), "the kill hit no request in flight"
    reply = client.chat.completions.create(model=name, max_tokens=4, messages=[{"role": "user", "content": "b"}])
    assert reply.choices[0].message.content is not None


def test_sigterm_stops_the_server_cleanly(server):
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, server["log"].read_text()[-2000:]
    with pytest.raises(requests.RequestException):
        requests.get(f"{server['base']}/healthz", timeout=3)


@pytest.mark.slow  # end to end, tens of seconds: `pytest -m slow`
def test_sigterm_while_starting_removes_what_was_deployed(ray_session, served_store, tmp_path):
    """SIGTERM before the server is ready (a supervisor giving up, a test ending early) still stops
    cleanly: exit 0, and no half-deployed replica is left on the cluster."""
    from ray.util.state import list_actors

    def replicas() -> list:
        return [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if "ServeReplica:imoe:" in (a.class_name or "")]

    log = tmp_path / "serve.log"
    proc, _ = launch_imoe_serve(served_store, ray_session["env"], SERVE_SETTINGS, log)
    deadline = time.time() + 180
    while not replicas():  # deploying, not ready yet
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, log.read_text()[-2000:]
    deadline = time.time() + 60
    while replicas():
        assert time.time() < deadline, f"replicas left behind: {replicas()}"
        time.sleep(0.5)
