"""Whole models as experts (`imoe experts add-model`): registration into a store, routing by keywords
and centroid, the byte-budgeted LRU of an expert replica, and answers through the served app.
The models are tiny Hugging Face causal LMs made here, each with its own tokenizer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from imoe_ray.experts.whole_model import (ModelExpertError, add_model, is_model_expert, model_experts, remove_model,
                                          weight_bytes)
from imoe_ray.serving.model_pool import MB, BudgetError, ModelPool, module_bytes

IMOE = str(Path(sys.executable).parent / "imoe")
DOMAIN_TEXTS = ["def add(a, b): return a + b", "the integral of x squared dx", "hello world, a general text",
                "import numpy as np", "solve the equation for x"]


def make_model(out: Path, kind: str = "llama", hidden: int = 32, layers: int = 1, seed: int = 0) -> Path:
    """A tiny causal LM directory with its own byte-level BPE tokenizer (what a user's fine-tuned model is)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel()
    tk.train_from_iterator(DOMAIN_TEXTS * 10, trainers.BpeTrainer(vocab_size=200 + 50 * seed,
                                                                  special_tokens=["<unk>", "<s>", "</s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if kind == "llama":
        config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                             bos_token_id=1, eos_token_id=2)
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(vocab_size=len(tok), n_embd=hidden, n_layer=layers, n_head=4, n_positions=128,
                            bos_token_id=1, eos_token_id=2)
        model = GPT2LMHeadModel(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def encoder():
    from imoe_ray.config import Config
    from imoe_ray.routing.stage import make_encoder

    return make_encoder(Config())


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"coder": make_model(root / "coder", "llama", seed=0), "mathy": make_model(root / "mathy", "gpt2", seed=1)}


@pytest.fixture
def store(tmp_path) -> Path:
    """A store's serving side as add-model needs it: an experts index (and the writer lock's folder)."""
    store = tmp_path / "store"
    (store / "experts").mkdir(parents=True)
    (store / "experts" / "index.json").write_text(json.dumps({"experts": [{"name": "trained", "categories": ["trained"]}]}))
    (store / "manifests").mkdir()
    (store / "manifests" / "base.json").write_text(json.dumps({"metrics": {"fingerprint": "0" * 64}}))
    return store


def test_add_model_copies_validates_and_registers_for_routing(store, models, encoder):
    expert = add_model(store, "coder", models["coder"], ["python", "code"], None, lambda: encoder)
    folder = store / "experts" / "coder"
    assert expert.path == str(folder) and is_model_expert(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["kind"] == "model" and manifest["model"]["architecture"] == "LlamaForCausalLM"
    assert manifest["routing"]["keywords"] == ["python", "code"] and manifest["routing"]["centroid_from"] == "keywords"
    from imoe_ray.packaging.manifest import sha256_file

    for rel, digest in manifest["model"]["files"].items():
        assert sha256_file(folder / rel) == digest
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (folder / "model").iterdir()}
    index = json.loads((store / "experts" / "index.json").read_text())
    assert [e["name"] for e in index["experts"]] == ["trained", "coder"] and index["experts"][1]["kind"] == "model"
    profile = json.loads((store / "router" / "experts.json").read_text())[0]
    assert profile["name"] == "coder" and profile["category"] is None and profile["keywords"] == ["python", "code"]
    import numpy as np

    expected = encoder.encode(["python, code"])[0]
    assert np.allclose(profile["centroid"], expected / np.linalg.norm(expected), atol=1e-5)
    from imoe_ray.serving.model import installed_experts

    assert installed_experts(store)["coder"] == folder and model_experts(store) == {"coder": folder / "model"}
    assert expert.parameters == weight_bytes(folder / "model")[0] > 0

    add_model(store, "mathy", models["mathy"], [], DOMAIN_TEXTS[1:2], lambda: encoder)   # a centroid from sample texts
    profile = json.loads((store / "router" / "experts.json").read_text())[1]
    assert np.allclose(profile["centroid"], encoder.encode(DOMAIN_TEXTS[1:2])[0], atol=1e-5)
    remove_model(store, "coder")
    assert not folder.exists() and "coder" not in {p["name"] for p in json.loads((store / "router" / "experts.json").read_text())}
    assert [e["name"] for e in json.loads((store / "experts" / "index.json").read_text())["experts"]] == ["trained", "mathy"]


def _not_causal(out: Path) -> Path:
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(out)
    (out / "tokenizer.json").write_text("{}")
    return out


@pytest.mark.parametrize("case, message", [
    ("taken", "already has an expert named 'trained'"),
    ("bad-name", "is not a package name"),
    ("reserved", "reserved"),
    ("no-routing", "routing keywords"),
    ("pickled", "pickled weights are never loaded"),
    ("no-tokenizer", "has no tokenizer"),
    ("not-causal", "not a causal language model"),
    ("missing", "is not a directory"),
])
def test_add_model_refusals_leave_the_store_as_it_was(store, models, encoder, tmp_path, case, message):
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    name, path, keywords = {"taken": "trained", "bad-name": "Bad Name", "reserved": "base"}.get(case, "new"), \
        models["coder"], ["k"]
    if case == "no-routing":
        keywords = []
    elif case in ("pickled", "no-tokenizer"):
        path = tmp_path / case
        shutil.copytree(models["coder"], path)
        if case == "pickled":
            (path / "model.safetensors").rename(path / "pytorch_model.bin")
        else:
            for f in ("tokenizer.json", "tokenizer_config.json"):
                (path / f).unlink()
    elif case == "not-causal":
        path = _not_causal(tmp_path / "bert")
    elif case == "missing":
        path = tmp_path / "nowhere"
    with pytest.raises(Exception, match=message) as raised:
        add_model(store, name, path, keywords, None, lambda: encoder)
    from imoe_ray.packaging import PackageError

    assert isinstance(raised.value, (ModelExpertError, PackageError))
    after = {p: p.read_bytes() for p in store.rglob("*") if p.is_file() and "locks" not in p.parts}
    assert after == {p: b for p, b in before.items() if "locks" not in p.parts}


def test_pool_keeps_everything_resident_within_the_byte_budget(models, tmp_path):
    one = max(weight_bytes(models["coder"])[1], weight_bytes(models["mathy"])[1])
    fixed = {"bytes": 1000}
    pool = ModelPool(budget_bytes=int(one * 1.5) + fixed["bytes"], fixed_bytes=lambda: fixed["bytes"])
    seen = []
    assert pool.resident_bytes() == 0
    first, load_ms = pool.get("coder", models["coder"])
    assert load_ms > 0 and first.nbytes == module_bytes(first.model) and list(pool.resident) == ["coder"]
    assert pool.get("coder", models["coder"])[1] == 0.0                   # resident: no load
    for name in ["mathy", "coder", "mathy"]:                             # a budget for one: one at a time
        pool.get(name, models[name])
        seen.append(list(pool.resident))
        assert pool.total_bytes() <= pool.budget_bytes
    assert seen == [["mathy"], ["coder"], ["mathy"]] and pool.loads == 4 and pool.evictions == 3

    roomy = ModelPool(budget_bytes=10 * one, fixed_bytes=lambda: 0)
    roomy.get("coder", models["coder"])
    roomy.get("mathy", models["mathy"])
    assert set(roomy.resident) == {"coder", "mathy"}
    fixed["bytes"] = 0
    shrinking = ModelPool(budget_bytes=3 * one, fixed_bytes=lambda: fixed["bytes"])
    shrinking.get("coder", models["coder"])
    shrinking.get("mathy", models["mathy"])
    fixed["bytes"] = 2 * one                                              # adapters loaded: whole models make room
    shrinking.fit()
    assert list(shrinking.resident) == ["mathy"] and shrinking.total_bytes() <= shrinking.budget_bytes

    tight = ModelPool(budget_bytes=one // 2, fixed_bytes=lambda: 0)
    with pytest.raises(BudgetError, match="serve.memory_budget_mb"):
        tight.get("coder", models["coder"])
    assert not tight.resident

    unbounded = ModelPool(budget_bytes=None)                              # no budget: one whole model at a time
    unbounded.get("coder", models["coder"])
    unbounded.get("mathy", models["mathy"])
    assert list(unbounded.resident) == ["mathy"]


def test_a_budget_that_cannot_hold_the_base_is_refused_before_serving(models, tmp_path):
    from imoe_ray.serving.model_experts import check_budget

    shutil.copytree(models["coder"], tmp_path / "base")
    base_mb = weight_bytes(tmp_path / "base")[1] / MB
    check_budget(tmp_path, base_mb * 1.01, max_loaded_experts=2)
    with pytest.raises(ValueError, match="serve.memory_budget_mb=.* cannot hold the base model"):
        check_budget(tmp_path, base_mb * 0.99, max_loaded_experts=2)


def test_a_replaced_model_is_loaded_again(models, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(models["coder"], folder)
    pool = ModelPool(budget_bytes=None)
    pool.get("m", folder)
    replacement = tmp_path / "m2"
    shutil.copytree(models["mathy"], replacement)
    shutil.rmtree(folder)
    replacement.rename(folder)
    loaded, load_ms = pool.get("m", folder)
    assert load_ms > 0 and type(loaded.model).__name__ == "GPT2LMHeadModel"


def test_model_experts_answer_with_their_own_tokenizer(store, models, encoder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from imoe_ray.serving.model_experts import ModelExperts, ModelRefusal, ModelRequest

    add_model(store, "coder", models["coder"], ["python"], None, lambda: encoder)
    experts = ModelExperts(store, budget_mb=None, fixed_bytes=lambda: 0)
    out = experts.answer(ModelRequest("coder", 6, prompt="def add(a, b):"))
    tok = AutoTokenizer.from_pretrained(models["coder"])
    reference = AutoModelForCausalLM.from_pretrained(models["coder"]).eval()
    ids = tok("def add(a, b):", return_tensors="pt")["input_ids"]
    expected = reference.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=2, eos_token_id=[2])[0, ids.shape[1]:]
    expected = [t for t in expected.tolist() if t != 2]
    assert out.text == tok.decode(expected, skip_special_tokens=True) and out.load_ms > 0
    assert out.prompt_tokens == ids.shape[1] and out.completion_tokens == len(expected) and out.tokens == expected
    assert experts.answer(ModelRequest("coder", 2, prompt="x")).load_ms == 0.0
    refused = experts.serve(ModelRequest("nobody", 2, prompt="x"))
    assert isinstance(refused, ModelRefusal) and refused.status == 404 and refused.code == "model_not_found"
    snapshot = experts.snapshot()
    assert set(snapshot["models"]) == {"coder"} and snapshot["budget_mb"] is None
    assert snapshot["resident_mb"] == pytest.approx(module_bytes(experts.pool.resident["coder"].model) / MB, abs=1e-3)


def test_a_whole_model_job_resumed_step_by_step_decodes_what_one_run_does(store, models, encoder, tmp_path):
    """A job on a whole-model expert runs in steps of a few tokens, in the expert's own vocabulary,
    and may be paused between any two: stepping (with pauses, on a fresh pool as after a restart)
    gives the tokens of one run straight through. Who decodes: a whole model only when it is the
    most probable expert, alone; otherwise the adapters without it."""
    from imoe_ray.job_queue.preemption import absorb, decoded_by, step_request
    from imoe_ray.job_queue.records import JobRecord
    from imoe_ray.serving.model_experts import ModelExperts, ModelRequest, prompt_ids

    add_model(store, "mathy", models["mathy"], ["maths"], None, lambda: encoder)
    experts = ModelExperts(store, budget_mb=None, fixed_bytes=lambda: 0)
    tokenizer = experts.pool.get("mathy", experts.path("mathy"))[0].tokenizer
    ids = prompt_ids(tokenizer, "solve the equation")
    straight = experts.answer(ModelRequest("mathy", 9, prompt_ids=tuple(ids))).tokens

    record = JobRecord(agent="a", priority=0, prompt_ids=ids, experts={"mathy": 1.0}, model="mathy", max_tokens=9)
    done, steps = False, 0
    while not done:
        request = step_request(record, 2)
        assert isinstance(request, ModelRequest) and request.max_new_tokens <= 2
        if steps == 2:   # paused here; resumed by a fresh replica's pool
            experts = ModelExperts(store, budget_mb=None, fixed_bytes=lambda: 0)
        out = experts.answer(request)
        done, steps = absorb(record, out.tokens, out.finish_reason), steps + 1
    assert record.generated == straight and steps >= 3

    whole = {"mathy"}
    assert decoded_by({"mathy": 0.7, "expert_0": 0.3}, whole) == ("mathy", {"mathy": 1.0})
    assert decoded_by({"mathy": 0.3, "expert_0": 0.5, "expert_1": 0.2}, whole) == \
        (None, {"expert_0": pytest.approx(0.5 / 0.7), "expert_1": pytest.approx(0.2 / 0.7)})


def test_a_whole_model_travels_as_a_signed_expert_package(store, models, encoder, tmp_path):
    """`imoe experts package` of a whole-model expert → sign → install into another store (whatever its
    base): served from experts/NAME/model like an added one; files changed after install are refused."""
    from imoe_ray.config import PackagesConfig
    from imoe_ray.packaging import PackageError
    from imoe_ray.packaging.archive import resign
    from imoe_ray.packaging.manifest import PackageManifest
    from imoe_ray.packaging.registry import Registry, package_expert
    from imoe_ray.packaging.signing import generate_keys, load_signing_key, sign
    from imoe_ray.serving.model_experts import ModelExperts, ModelRequest

    add_model(store, "coder", models["coder"], ["python"], None, lambda: encoder)
    path, manifest = package_expert(store, "coder", "1.0.0", tmp_path / "coder.expert", new_name="shipped")
    assert manifest.model.architecture == "LlamaForCausalLM" and manifest.adapter is None and manifest.base_model is None
    assert all(f.startswith("model/") for f in manifest.files) and "model/model.safetensors" in manifest.files
    private, public = generate_keys(tmp_path / "keys")
    resign(path, sign(manifest, load_signing_key(private)))
    other = tmp_path / "other"
    shutil.copytree(store, other)
    (other / "manifests" / "base.json").write_text(json.dumps({"metrics": {"fingerprint": "1" * 64}}))  # another base
    with pytest.raises(PackageError, match="not signed|not trusted"):
        Registry(other, PackagesConfig()).install(str(package_expert(store, "coder", "1.0.0", tmp_path / "u.expert")[0]))
    row = Registry(other, PackagesConfig(trusted_keys=[str(public)])).install(str(path))
    assert row.trust == "trusted" and row.compatible and row.name == "shipped"
    served = other / "experts" / "shipped"
    assert is_model_expert(served) and (served / "model" / "model.safetensors").is_file()
    assert model_experts(other)["shipped"] == served / "model"
    profile = [p for p in json.loads((other / "router" / "experts.json").read_text()) if p["name"] == "shipped"][0]
    assert profile["keywords"] == ["python"] and profile["centroid"] == manifest.routing.centroid
    experts = ModelExperts(other, budget_mb=None, fixed_bytes=lambda: 0)
    assert experts.answer(ModelRequest("shipped", 2, prompt="def")).load_ms > 0
    experts.pool.evict("shipped")
    (served / "model" / "config.json").write_text((served / "model" / "config.json").read_text() + " ")
    refused = experts.serve(ModelRequest("shipped", 2, prompt="def"))
    assert refused.status == 503 and "does not match the sha256" in refused.error

    data = json.loads(manifest.to_json())
    with pytest.raises(PackageError, match="exactly one of an adapter or a whole model"):
        PackageManifest.parse(json.dumps(data | {"adapter": {"type": "lora", "rank": 4}}))
    with pytest.raises(PackageError, match="model/<"):
        PackageManifest.parse(json.dumps(data | {"files": {"model/run.py": "0" * 64, **data["files"]}}))


def test_add_model_command_contract(store, models, tmp_path):
    """`imoe experts add-model NAME --path DIR --store S --keywords a,b` exits 0; a refusal exits 2, one line."""
    done = subprocess.run([IMOE, "experts", "add-model", "coder", "--path", str(models["coder"]), "--store", str(store),
                           "--keywords", "python,code"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "coder" in model_experts(store)
    again = subprocess.run([IMOE, "experts", "add-model", "coder", "--path", str(models["coder"]), "--store", str(store),
                            "--keywords", "python"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already has an expert named 'coder'" in again.stderr
    assert "Traceback" not in again.stderr


# ---- through a built store: routing, and the served app over HTTP ---------------------------------

@pytest.fixture(scope="module")
def served_models(tmp_path_factory) -> dict[str, Path]:
    """Larger than the adapters of the built store, so that a budget's room for one is clear-cut."""
    root = tmp_path_factory.mktemp("served-models")
    return {"coder": make_model(root / "coder", "llama", hidden=64, seed=0),
            "mathy": make_model(root / "mathy", "gpt2", hidden=64, seed=1)}


@pytest.fixture(scope="module")
def model_store(built, served_models, tmp_path_factory) -> Path:
    """A copy of the session's built store with two whole-model experts added by the command."""
    models = served_models
    _, built_store, _ = built
    store = tmp_path_factory.mktemp("whole") / "store"
    shutil.copytree(built_store.root, store, ignore=shutil.ignore_patterns("runs"))
    for name, words in (("coder", "quokka,wombat"), ("mathy", "zebrafish")):
        done = subprocess.run([IMOE, "experts", "add-model", name, "--path", str(models[name]), "--store", str(store),
                               "--keywords", words], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    return store


def test_router_reaches_whole_models_by_their_keywords_without_retraining(built, model_store):
    from imoe_ray.routing.stage import load_router
    from imoe_ray.store import Store

    cfg, _, _ = built
    router = load_router(Store(model_store), cfg)
    assert router.route("tell me about the quokka").experts == ["coder"]
    assert router.route("wombat habitat in Australia").experts == ["coder"]   # unknown words, but its keyword
    assert router.route("how do zebrafish swim").experts == ["mathy"]
    assert not {"coder", "mathy"} & set(router.route("How do I plot a histogram of a column?").experts)


@pytest.mark.slow
def test_served_whole_models_within_the_byte_budget(ray_cluster, model_store, served_models):
    """`imoe serve --set serve.memory_budget_mb=M` with room for one whole model: both are listed, a
    keyword query is answered by its model, switching evicts the other, `resident_mb` stays within M,
    a request routed to both runs them in turn and fuses their answers as text, and a job routed to
    one is decoded by it, step by step, to the chat's answer."""
    import requests
    from openai import OpenAI

    from conftest import start_imoe_serve, stop_imoe_serve

    from imoe_ray.serving.model_experts import adapter_bytes

    models = served_models
    adapter = max(adapter_bytes(p.parent) for p in model_store.glob("experts/*/adapter_config.json"))
    one = min(weight_bytes(models[n])[1] for n in models)
    assert adapter < 0.2 * one
    budget_mb = (weight_bytes(model_store / "base")[1] + adapter + 1.5 * one) / MB   # room for one whole model
    settings = ["serve.expert_cpus=0.5", "serve.router_cpus=0.25", "serve.max_loaded_experts=1", "serve.max_tokens=8",
                "serve.max_replicas=1", f"serve.memory_budget_mb={budget_mb:.6f}"]
    proc, base = start_imoe_serve(model_store, ray_cluster["env"], settings, model_store.parent / "serve.log")
    try:
        experts = requests.get(f"{base}/v1/experts", timeout=60).json()
        kinds = {r["name"]: r["kind"] for r in experts["data"]}
        assert kinds["coder"] == kinds["mathy"] == "model" and experts["models"] == {}
        cards = {m["id"]: m for m in requests.get(f"{base}/v1/models", timeout=60).json()["data"]}
        assert cards["coder"]["parent"] is None and cards["coder"]["root"].endswith("experts/coder/model")
        client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        seen = []
        for text, expert in (("tell me about the quokka", "coder"), ("how do zebrafish swim", "mathy"),
                             ("and the wombat?", "coder")):
            reply = client.chat.completions.create(model="imoe", max_tokens=6, messages=[{"role": "user", "content": text}])
            imoe = reply.model_extra["imoe"]
            assert imoe["experts"] == [expert] and imoe["timings_ms"]["load"] > 0   # the other one was resident
            state = requests.get(f"{base}/v1/experts", timeout=60).json()
            assert list(state["models"]) == [expert] and state["resident_mb"] <= budget_mb
            seen.append(state["evictions"])
        assert seen == [0, 1, 2]
        again = client.chat.completions.create(model="coder", max_tokens=6, messages=[{"role": "user", "content": "hi"}])
        assert again.model_extra["imoe"]["timings_ms"]["load"] == 0.0           # resident: no load
        both = client.chat.completions.create(model="imoe", max_tokens=6, messages=[{"role": "user", "content":
                                              "quokka and zebrafish"}], extra_body={"imoe": {"ensemble": True, "top_k": 2}})
        imoe = both.model_extra["imoe"]
        assert set(imoe["experts"]) == {"coder", "mathy"} and imoe["fusion"] == "top"   # no summarizer in this store
        stream = client.chat.completions.create(model="mathy", max_tokens=6, stream=True, temperature=0,
                                                messages=[{"role": "user", "content": "zebrafish"}])
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
            client.chat.completions.create(model="mathy", max_tokens=6, temperature=0,
                                           messages=[{"role": "user", "content": "zebrafish"}]).choices[0].message.content
        assert requests.get(f"{base}/v1/experts", timeout=60).json()["resident_mb"] <= budget_mb

        # jobs: a whole-model expert decodes a job alone, in steps (jobs.step_tokens), as a chat does in one go
        chat = [{"role": "user", "content": "how do zebrafish swim"}]
        expected = client.chat.completions.create(model="imoe", max_tokens=6, temperature=0, messages=chat,
                                                  extra_body={"imoe": {"mode": "basic"}})
        assert expected.model_extra["imoe"]["experts"] == ["mathy"]
        job = requests.post(f"{base}/v1/jobs", json={"messages": chat, "max_tokens": 6, "mode": "basic"}, timeout=60)
        assert job.status_code == 200, job.text
        view = _finished(base, job.json()["id"])
        assert view["state"] == "succeeded" and view["experts"] == {"mathy": 1.0}
        assert view["output"] == expected.choices[0].message.content
        mixed = requests.post(f"{base}/v1/jobs", json={"prompt": "x", "experts": ["coder", "mathy"]}, timeout=60)
        assert mixed.status_code == 400 and "decodes a job alone" in mixed.json()["error"]["message"]
    finally:
        stop_imoe_serve(proc)


def _finished(base: str, job_id: str, timeout: float = 300) -> dict:
    import time

    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        view = requests.get(f"{base}/v1/jobs/{job_id}", timeout=60).json()
        if view["state"] in ("succeeded", "failed", "cancelled"):
            return view
        time.sleep(0.1)
    raise TimeoutError(view)
