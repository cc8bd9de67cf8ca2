"""OpenAI-API conformance and the serving defects of issue 27: the library without Ray, then `imoe serve`
in strict mode (`serve.max_loaded_experts=1`) over real HTTP, driven by the official `openai` clients
for Python and for Node.js."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from imoe_ray.serving.generation import GenerationRequest
from imoe_ray.serving.model import ServingModel

from conftest import start_imoe_serve, stop_imoe_serve

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(built) -> Path:
    return Path(built[1].root)


@pytest.fixture(scope="module")
def model(store) -> ServingModel:
    return ServingModel(store, threads=1)


def _names(store: Path) -> list[str]:
    return [e["name"] for e in json.loads((store / "experts" / "index.json").read_text())["experts"]]


def _ids(model: ServingModel, text: str) -> list[int]:
    return [model.tokenizer.eos_token_id] + model.tokenizer(text, add_special_tokens=False)["input_ids"]


# ---- the library ------------------------------------------------------------------------------

def test_strict_capacity_decodes_a_mixture_expert_by_expert(store, model):
    """Defect 2: with one adapter allowed, a 3-expert mixture decodes pass by pass (one adapter
    resident at a time) and gets exactly the tokens of the unconstrained model."""
    names = _names(store)[:3]
    assert len(names) == 3
    mix = GenerationRequest(_ids(model, "the server parses the request"), {names[0]: 0.5, names[1]: 0.3, names[2]: 0.2}, 10)
    alone = GenerationRequest(_ids(model, "a matrix"), {names[1]: 1.0}, 6)
    expected = [g.token_ids for g in model.generate([mix, alone])]
    strict = ServingModel(store, capacity=1, threads=1)
    most = []
    load = strict.bank.load

    def watched(name, directory):
        out = load(name, directory)
        most.append(len(strict.bank.resident))
        return out

    strict.bank.load = watched
    use = strict.bank.use

    def using(rows):
        most.append(len(set(rows) - {"base"}))
        return use(rows)

    strict.bank.use = using
    assert [g.token_ids for g in strict.generate([mix, alone])] == expected
    assert most and max(most) == 1, "more than one adapter was resident or used in one pass"


def test_fallback_to_every_expert_takes_the_most_probable(built, store):
    """Defect 1: the "all experts" fallback keeps the router's most probable experts, not the first
    ones in category order."""
    from imoe_ray.experts.mixture import expert_prior
    from imoe_ray.routing.stage import load_router
    from imoe_ray.serving.openai_api import ImoeOptions
    from imoe_ray.serving.pipeline import Planner
    from imoe_ray.store import Store

    cfg = built[0].model_copy(update={"router": built[0].router.model_copy(update={"threshold": 1.01, "fallback": "all"})})
    router = load_router(Store(str(store)), cfg)
    planner = Planner(router, _names(store), "basic", top_k=2)
    order = _names(store)
    checked = 0
    for query in ("numpy arrays and matrices", "parse the xml document", "http server sockets", "plot a histogram",
                  "regular expressions in strings", "sort a list of dictionaries", "the python standard library"):
        route = router.route(query)
        assert route.fallback and len(route.experts) >= 3
        plan = planner.plan("imoe", query, query, ImoeOptions())
        prior = expert_prior(route.all_probabilities, router.served_by)
        best = sorted(route.experts, key=lambda e: -prior.get(e, 0.0))[:2]
        assert list(plan.experts) == best, query
        checked += best != [e for e in order if e in route.experts][:2]
    assert checked, "no query's two most probable experts differed from the first two in category order"


def _random_adapter(store: Path, config, out: Path) -> None:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(store / "base"), config)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    peft.save_pretrained(out)


@pytest.mark.parametrize("kind", ["dora", "ia3"])
def test_dora_and_ia3_experts_are_served_as_peft_computes_them(store, model, tmp_path, kind):
    """Defect 3: DoRA and IA3 experts (they train) load into the bank and give PEFT's logits."""
    from peft import IA3Config, LoraConfig, PeftModel, TaskType
    from transformers import AutoModelForCausalLM

    targets = ["q_proj", "v_proj", "down_proj"]
    config = (LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, target_modules=targets, use_dora=True)
              if kind == "dora" else
              IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=targets, feedforward_modules=["down_proj"]))
    _random_adapter(store, config, tmp_path / kind)
    fresh = ServingModel(store, threads=1)
    fresh.bank.load(kind, tmp_path / kind)
    ids = torch.randint(3, model.tokenizer.vocab_size, (2, 10))
    with torch.inference_mode(), fresh.bank.use([kind, "base"]):
        ours = fresh.model(input_ids=ids).logits
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(store / "base"), str(tmp_path / kind)).eval()
    with torch.inference_mode():
        expected = reference(input_ids=ids[:1]).logits[0]
        with reference.disable_adapter():
            plain = reference(input_ids=ids).logits
    assert torch.allclose(ours[0], expected, atol=1e-4)
    assert torch.allclose(ours[1], plain[1], atol=1e-5)
    assert not torch.allclose(expected, plain[0], atol=1e-3), "the adapter changed nothing"


def test_stop_strings_logit_bias_and_logprobs_in_the_decoder(model):
    prompt = _ids(model, "the function returns")
    free = model.generate([GenerationRequest(prompt, {"base": 1.0}, 12)])[0]
    text = model.decode(free.token_ids)
    stop = text[len(model.decode(free.token_ids[:3])):][:2]  # two characters the 4th token (or later) produces
    assert stop.strip() or stop
    stopped = model.generate([GenerationRequest(prompt, {"base": 1.0}, 12, stop=(stop,))])[0]
    assert stopped.finish_reason == "stop_string" and len(stopped.token_ids) < len(free.token_ids)
    assert stop in model.decode(stopped.token_ids) and stop not in model.decode(stopped.token_ids[:-1])
    banned = free.token_ids[0]
    biased = model.generate([GenerationRequest(prompt, {"base": 1.0}, 3, logit_bias={banned: -100.0}, logprobs=2)])[0]
    assert biased.token_ids[0] != banned and len(biased.logprobs) == 3
    first = biased.logprobs[0]
    assert first["token"] == biased.token_ids[0] and first["logprob"] <= 0 and len(first["top"]) == 2
    assert first["top"][0][0] == first["token"]  # greedy: the chosen token is the most probable


def test_every_eos_id_of_the_generation_config_stops(store, tmp_path):
    from transformers import AutoTokenizer

    from imoe_ray.serving.model import stop_token_ids

    base = tmp_path / "base"
    shutil.copytree(store / "base", base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    (base / "generation_config.json").write_text(json.dumps({"eos_token_id": [tokenizer.eos_token_id, 7, 9]}))
    assert set(stop_token_ids(base, tokenizer)) == {tokenizer.eos_token_id, 7, 9}


def test_the_router_compressor_scores_with_the_replica_base(built, store):
    """Defect 5: the Router's selective compressor takes a scorer (the expert replica's base model)
    and loads no model of its own; it compresses exactly as with a local copy."""
    from imoe_ray.compression.selective import SelectiveCompressor
    from imoe_ray.retrieval.serving import PromptCompressor

    cfg = built[0]
    cfg = cfg.model_copy(update={"retrieval": cfg.retrieval.model_copy(update={"compressor": "selective"})})
    local = SelectiveCompressor(store / "base")
    calls = []

    def scorer(texts):
        calls.append(len(texts))
        return [(offsets, values.tolist()) for offsets, values in local.surprisal(texts)]

    remote = PromptCompressor(store, cfg, scorer=scorer)
    assert remote.method.model is None, "the Router holds a second copy of the base model"
    text = "how do I compute the mean of a numpy array along one axis when the array has missing values " * 3
    passages = ["numpy provides nanmean which ignores missing values along the given axis of the array"] * 2
    ours = remote.compress("numpy mean axis", [text, *passages], 64)
    theirs = PromptCompressor(store, cfg).compress("numpy mean axis", [text, *passages], 64)
    assert calls and (ours.question, ours.context) == (theirs.question, theirs.context)


def test_trained_experts_carry_routing_keywords_and_a_model_card(built, store):
    """Defect 6: the trained experts' keywords reach the router's keyword priors; every expert
    directory has a model card generated from its manifest."""
    from imoe_ray.routing.stage import load_router
    from imoe_ray.store import Store

    router = load_router(Store(str(store)), built[0])
    trained = [p for p in router.profiles if p.category is not None]
    assert trained and all(p.keywords for p in trained)
    for name in _names(store):
        manifest = json.loads((store / "experts" / name / "manifest.json").read_text())
        card = (store / "experts" / name / "README.md").read_text()
        assert card.startswith("---\n") and "library_name: peft" in card
        assert manifest["category"]["name"] in card and str(manifest["training"]["tokens"]) in card
        assert all(k in card for k in manifest["routing"]["keywords"][:3])


@pytest.mark.parametrize("fmt", ["vllm", "peft"])
def test_export_writes_a_portable_adapter(store, tmp_path, fmt):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from imoe_ray.experts.export import VLLM_RANKS

    name = _names(store)[0]
    out = tmp_path / f"{name}-{fmt}"
    run = subprocess.run([sys.executable, "-m", "imoe_ray.cli", "experts", "export", name, "--store", str(store),
                          "--format", fmt, "-o", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    config = json.loads((out / "adapter_config.json").read_text())
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert not Path(config["base_model_name_or_path"]).is_absolute()
    assert (out / config["base_model_name_or_path"] / "config.json").is_file()
    assert (out / "README.md").read_text().startswith("---\n")
    if fmt == "vllm":
        assert not [k for k in weights if "lm_head" in k or "embed" in k]
        assert "lm_head" not in config["target_modules"] and config["r"] in VLLM_RANKS
        assert not config.get("modules_to_save") and config["peft_type"] == "LORA" and not config.get("use_dora")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(store / "base"), str(out)).eval()
    ids = torch.randint(3, 100, (1, 8))
    served = ServingModel(store, threads=1)
    served.bank.load("x", out)
    with torch.inference_mode(), served.bank.use(["x"]):
        assert torch.allclose(served.model(input_ids=ids).logits, peft(input_ids=ids).logits, atol=1e-4)


def test_export_refuses_what_it_cannot_write(store, tmp_path):
    run = subprocess.run([sys.executable, "-m", "imoe_ray.cli", "experts", "export", "no-such", "--store", str(store),
                          "-o", str(tmp_path / "x")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "no expert named" in run.stderr and not (tmp_path / "x").exists()


# ---- the application over HTTP, strict mode ---------------------------------------------------

STRICT = ["serve.expert_cpus=0.5", "serve.router_cpus=0.25", "serve.max_loaded_experts=1", "serve.max_tokens=16",
          "serve.retry_s=90", "serve.max_replicas=1", "retrieval.compressor=selective"]


@pytest.fixture(scope="module")
def served(store, tmp_path_factory) -> Path:
    """A copy of the session's store with a sparse-MoE encoder (an upcycled MiniLM, as
    `imoe train-encoder` starts from), so `/v1/embeddings` can select it by model name."""
    from imoe_ray.embedding.encoder import Encoder
    from imoe_ray.encoders.moe import save_moe, upcycle

    root = tmp_path_factory.mktemp("served") / "store"
    shutil.copytree(store, root, ignore=shutil.ignore_patterns("runs"))
    encoder = Encoder()
    upcycle(encoder.model, n_experts=2, top_k=2, every=6, noise=0.5)  # the perturbed copy takes part
    save_moe(encoder.model, encoder.tokenizer, root / "encoders" / "moe")
    return root


@pytest.fixture(scope="module")
def server(ray_cluster, served):
    log = served.parent / "serve-strict.log"
    proc, base = start_imoe_serve(served, ray_cluster["env"], STRICT, log)
    yield {"url": f"{base}/v1", "base": base, "log": log}
    stop_imoe_serve(proc)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["url"], api_key="unused", max_retries=0, timeout=300)


def test_strict_mode_answers_a_three_expert_ensemble(client, ray_session, store):
    """`serve.max_loaded_experts=1` answers a request mixing three experts (200), one resident at a time."""
    from ray import serve

    reply = client.chat.completions.create(model="imoe", max_tokens=6, messages=[{"role": "user", "content": "parse the xml"}],
                                           extra_body={"imoe": {"ensemble": 3}})
    assert len(reply.model_extra["imoe"]["experts"]) == 3 and reply.choices[0].message.content is not None
    assert len(serve.get_deployment_handle("Experts", app_name="imoe").resident.remote().result()) <= 1


def test_include_usage_sends_a_final_usage_chunk_only_when_asked(client):
    messages = [{"role": "user", "content": "the request is sent to the server"}]
    chunks = list(client.chat.completions.create(model="imoe", max_tokens=8, messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens >= 1
    assert all(c.usage is None for c in chunks[:-1])
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    plain = list(client.chat.completions.create(model="imoe", max_tokens=8, messages=messages, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason in ("stop", "length")
    done = list(client.completions.create(model="imoe", prompt="The function", max_tokens=5, stream=True,
                                          stream_options={"include_usage": True}))
    assert done[-1].choices == [] and 1 <= done[-1].usage.completion_tokens <= 5


def test_stop_strings_cut_the_text_and_the_token_count(client, store):
    name = _names(store)[0]
    free = client.completions.create(model=name, prompt="The function returns", max_tokens=16, temperature=0)
    text = free.choices[0].text
    stop = next(text[i:i + 2] for i in range(3, len(text) // 2) if text[i:i + 2].strip())
    cut = client.completions.create(model=name, prompt="The function returns", max_tokens=16, temperature=0, stop=[stop])
    content = cut.choices[0].text
    assert stop not in content and text.startswith(content) and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < free.usage.completion_tokens
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(store / "base")
    assert cut.usage.completion_tokens <= len(tokenizer(content, add_special_tokens=False)["input_ids"]) + 1
    streamed = list(client.completions.create(model=name, prompt="The function returns", max_tokens=16, temperature=0,
                                              stop=[stop], stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == content
    assert streamed[-1].usage.completion_tokens == cut.usage.completion_tokens


def test_embeddings_in_the_openai_shape(client, server, store):
    from imoe_ray.embedding.encoder import Encoder

    out = client.embeddings.create(model="imoe", input=["a", "b"])
    dim = Encoder().dim
    assert len(out.data) == 2 and all(len(d.embedding) == dim for d in out.data) and out.usage.prompt_tokens > 0
    assert [d.index for d in out.data] == [0, 1]
    one = requests.post(f"{server['url']}/embeddings", json={"model": "imoe", "input": "a", "encoding_format": "base64"},
                        timeout=120).json()
    vector = np.frombuffer(base64.b64decode(one["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(vector, out.data[0].embedding, atol=1e-6)
    bad = requests.post(f"{server['url']}/embeddings", json={"model": "nope", "input": "a"}, timeout=60)
    assert bad.status_code == 404 and bad.json()["error"]["param"] == "model"


def test_embeddings_by_the_sparse_moe_encoder(client, served):
    from imoe_ray.embedding.encoder import Encoder

    assert any(m.id == "imoe-moe" and m.model_extra["task"] == "embed" for m in client.models.list())
    out = client.embeddings.create(model="imoe-moe", input=["numpy arrays", "xml parsing"])
    expected = Encoder(str(served / "encoders" / "moe")).encode(["numpy arrays", "xml parsing"])
    assert np.allclose(np.array([d.embedding for d in out.data]), expected, atol=1e-5)
    dense = client.embeddings.create(model="imoe", input=["numpy arrays", "xml parsing"])
    assert not np.allclose(np.array([d.embedding for d in dense.data]), expected, atol=1e-2)


def test_models_by_id_and_their_fields(server, client, store):
    ids = {m.id for m in client.models.list()}
    assert {"imoe", "base", *_names(store)} <= ids
    card = client.models.retrieve(_names(store)[0])
    assert card.id == _names(store)[0] and card.model_extra["parent"] == "base"
    assert card.model_extra["max_model_len"] > 0 and card.model_extra["root"]
    missing = requests.get(f"{server['url']}/models/no-such-model", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("extra, param", [
    ({"best_of": 2}, "best_of"), ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"), ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"suffix": "end"}, "suffix"), ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"logit_bias": {"5": 200}}, "logit_bias"), ({"echo": True, "logprobs": 1}, None),
    ({"response_format": {"type": "json_object"}}, "response_format"),
])
def test_unsupported_parameters_are_a_400_naming_them(server, extra, param):
    body = {"model": "imoe", "prompt": "hi", "max_tokens": 2} | extra
    r = requests.post(f"{server['url']}/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param or (param is None and "echo" in error["message"])


def test_logprobs_logit_bias_and_echo(client, store):
    name = _names(store)[0]
    reply = client.chat.completions.create(model=name, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2,
                                           messages=[{"role": "user", "content": "the server"}])
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob <= 0 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)
    echo = client.completions.create(model=name, prompt="The value", max_tokens=3, temperature=0, echo=True)
    assert echo.choices[0].text.startswith("The value")


def test_the_node_openai_client(server, tmp_path):
    """The official `openai` npm package: chat, a stream with usage, and embeddings."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("Node.js and npm are needed for this test (Node 20+)")
    install = subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "openai@4"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr
    script = tmp_path / "client.mjs"
    script.write_text(NODE_CLIENT)
    run = subprocess.run(["node", str(script), server["url"]], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr + run.stdout
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["chat_role"] == "assistant" and result["chat_tokens"] >= 1
    assert result["stream_last_choices"] == 0 and result["stream_usage"] >= 1 and result["stream_text"] is not None
    assert result["embeddings"] == 2 and result["dim"] > 0


NODE_CLIENT = """
import OpenAI from "openai";
const client = new OpenAI({ baseURL: process.argv[2], apiKey: "unused", maxRetries: 0, timeout: 300000 });
const messages = [{ role: "user", content: "parse the xml file" }];
const chat = await client.chat.completions.create({ model: "imoe", max_tokens: 6, messages });
const stream = await client.chat.completions.create({ model: "imoe", max_tokens: 6, messages, stream: true,
  stream_options: { include_usage: true } });
let text = "", last = null;
for await (const chunk of stream) { last = chunk; if (chunk.choices.length) text += chunk.choices[0].delta.content ?? ""; }
const emb = await client.embeddings.create({ model: "imoe", input: ["a", "b"] });
console.log(JSON.stringify({ chat_role: chat.choices[0].message.role, chat_tokens: chat.usage.completion_tokens,
  stream_last_choices: last.choices.length, stream_usage: last.usage?.completion_tokens ?? 0, stream_text: text,
  embeddings: emb.data.length, dim: emb.data[0].embedding.length }));
"""
