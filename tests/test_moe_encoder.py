"""The sparse-MoE encoder: upcycling, top-k routing and capacity, the load-balancing loss, the
contrastive losses and pairs, save/load through `Encoder`, and one real `imoe train-encoder` (Ray Train)
on a copy of the session store's corpus."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from imoe_ray.config import DEFAULT_ENCODER
from imoe_ray.embedding.encoder import Encoder, EncoderError, resolve_encoder_path
from imoe_ray.encoders.contrastive import batch_order, contrastive, info_nce, neighbour_pairs, Pairs, triplet
from imoe_ray.encoders.moe import (MOE_FILE, MoEFeedForward, aux_loss, load_moe, moe_layers, save_moe, upcycle,
                                   utilisation)

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["the socket sends bytes over the network", "a matrix is inverted by the solver",
         "parse the xml document and walk its tree", "plot a histogram of the samples"]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_encoder_path(DEFAULT_ENCODER))


def tiny_bert(vocab_size: int = 200, layers: int = 2) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    return BertModel(config).eval()


def states(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]


def test_upcycled_model_equals_the_dense_one_at_init():
    dense = tiny_bert()
    ids, mask = torch.randint(0, 200, (3, 9)), torch.ones(3, 9, dtype=torch.long)
    mask[0, 5:] = 0  # padding is neither routed nor counted
    moe = upcycle(copy.deepcopy(dense), n_experts=4, top_k=2, every=1, capacity_factor=None, noise=0.0)
    assert len(moe_layers(moe)) == 2 and moe.imoe_moe.layers == [0, 1]
    assert torch.allclose(states(dense, ids, mask), states(moe, ids, mask), atol=1e-5)
    use = utilisation(moe)
    assert [u["tokens"] for u in use] == [int(mask.sum())] * 2 and all(abs(sum(u["share"]) - 1) < 1e-3 for u in use)
    # every=2 upcycles every other layer; noise makes the copies differ
    half = upcycle(copy.deepcopy(dense), n_experts=4, top_k=1, every=2, noise=0.1)
    assert half.imoe_moe.layers == [1]
    experts = moe_layers(half)[0].experts
    assert not torch.equal(experts[0][0].weight, experts[1][0].weight)
    with pytest.raises(ValueError, match="top_k"):
        upcycle(copy.deepcopy(dense), n_experts=2, top_k=3)


def test_top_k_routing_and_capacity():
    torch.manual_seed(0)
    moe = MoEFeedForward(hidden=8, intermediate=16, n_experts=4, top_k=1, capacity_factor=1.0, activation=torch.nn.GELU())
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 10.0  # every token with x[0] > 0 goes to expert 0
    x = torch.randn(1, 8, 8)
    x[..., 0] = 1.0
    moe.train()
    out = moe(x)[0]
    # capacity = ceil(1.0 * 8 tokens * k / E) = 2: the first two tokens are processed, the rest pass through
    assert moe.routed.tolist() == [8, 0, 0, 0] and moe.dropped.tolist() == [6, 0, 0, 0]
    assert out[:2].abs().sum() > 0 and torch.all(out[2:] == 0)
    assert torch.allclose(out[:2], moe.experts[0](x[0, :2]), atol=1e-6)  # k=1: gate 1
    moe.eval()  # no capacity at inference: an embedding never depends on its batch
    moe.reset_counts()
    assert torch.allclose(moe(x)[0], moe.experts[0](x[0]), atol=1e-6) and moe.dropped.sum() == 0
    # top-2: gates are the softmax over the two chosen logits
    moe2 = MoEFeedForward(8, 16, 4, 2, None, torch.nn.GELU()).eval()
    with torch.no_grad():
        moe2.router.weight.zero_()
        moe2.router.weight[0, 0], moe2.router.weight[1, 0] = 2.0, 1.0
    y = moe2(x)[0]
    g = torch.softmax(torch.tensor([2.0, 1.0]), 0)
    assert torch.allclose(y, g[0] * moe2.experts[0](x[0]) + g[1] * moe2.experts[1](x[0]), atol=1e-5)
    assert moe2.routed.tolist() == [8, 8, 0, 0]


def test_load_balancing_loss_is_minimal_when_routing_is_uniform():
    moe = MoEFeedForward(8, 16, 4, 1, None, torch.nn.GELU()).eval()
    x = torch.randn(2, 16, 8)
    with torch.no_grad():
        moe.router.weight.zero_()
    moe(x)
    uniform = moe.aux_loss.item()
    with torch.no_grad():
        moe.router.weight[0] = 5.0
    x = x.abs()  # all logits favour expert 0
    moe(x)
    skewed = moe.aux_loss.item()
    assert uniform == pytest.approx(1.0, abs=1e-5) and skewed > 3.0
    assert moe.aux_loss.requires_grad  # the router learns from it


def test_contrastive_losses_and_pairs():
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    noisy = torch.nn.functional.normalize(a + 0.05 * torch.randn(6, 16), dim=-1)
    groups = torch.arange(6)
    for loss in (info_nce, triplet, contrastive):
        assert loss(a, noisy, groups) < loss(a, noisy.roll(1, 0), groups)
    # a same-group item is not a negative: masking it lowers InfoNCE
    near = noisy.clone()
    near[1] = near[0]
    assert info_nce(a, near, torch.tensor([0, 0, 1, 2, 3, 4])) < info_nce(a, near, groups)
    pairs = neighbour_pairs(["d", "d", "d", "e"], [2, 0, 1, 0], ["c2", "c0", "c1", "e0"], Pairs())
    assert list(zip(pairs.anchors, pairs.positives)) == [("c0", "c1"), ("c1", "c2")] and pairs.groups == ["d", "d"]


def test_topic_batches_draw_each_full_batch_from_one_topic():
    topics = [0] * 9 + [1] * 5 + [2] * 2  # 16 pairs, batch 4: two full batches of 0, one of 1, one of the rest mixed
    batches = batch_order(topics, 4, 9, "topic", np.random.default_rng(0))
    first_epoch = batches[:4]
    assert len(batches) == 9 and sorted(np.concatenate(first_epoch).tolist()) == list(range(16))
    kinds = sorted(len({topics[i] for i in b}) for b in first_epoch)
    assert kinds[:3] == [1, 1, 1] and max(kinds) > 1  # three single-topic batches; the remainders mix
    random = batch_order(topics, 4, 4, "random", np.random.default_rng(0))
    assert sorted(np.concatenate(random).tolist()) == list(range(16))
    mixed = batch_order(topics, 4, 5, "mixed", np.random.default_rng(0))
    assert len(mixed) == 5 and sum(len({topics[i] for i in b}) == 1 for b in mixed[0::2]) >= 2  # topic batches first
    assert batch_order([5], 32, 3, "topic", np.random.default_rng(0)) == [np.array([0])] * 3  # fewer pairs than a batch


def test_save_load_round_trip_through_encoder(tokenizer, tmp_path):
    model = upcycle(tiny_bert(tokenizer.vocab_size), n_experts=3, top_k=2, every=1, noise=0.05, seed=1)
    model.config.dtype = "float16"  # as when the dense encoder came from fp16 weights and trained in fp32
    save_moe(model, tokenizer, tmp_path / "moe", extra={"metrics": {"loss": 1.0}})
    assert not (tmp_path / "moe" / "model.safetensors").exists()  # a plain from_pretrained must not half-load it
    spec = json.loads((tmp_path / "moe" / MOE_FILE).read_text())
    assert spec["n_experts"] == 3 and spec["layers"] == [0, 1] and spec["metrics"] == {"loss": 1.0}
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    reloaded = load_moe(tmp_path / "moe")
    assert {p.dtype for p in reloaded.parameters()} == {torch.float32}  # the weights' dtype, not the config's
    assert torch.equal(states(model, batch["input_ids"], batch["attention_mask"]),
                       states(reloaded, batch["input_ids"], batch["attention_mask"]))
    enc = Encoder(str(tmp_path / "moe"), max_tokens=32, device="cpu")
    assert moe_layers(enc.model) and enc.dim == 32
    vectors = enc.encode(TEXTS, batch_size=2)
    again = Encoder(str(tmp_path / "moe"), max_tokens=32, device="cpu").encode(TEXTS[::-1], batch_size=4)[::-1]
    assert vectors.shape == (4, 32) and abs(float((vectors ** 2).sum(1).mean()) - 1) < 1e-5
    assert abs(vectors - again).max() < 1e-5  # no dependence on batch composition
    assert float(aux_loss(enc.model)) > 0
    (tmp_path / "moe" / MOE_FILE).write_text("{not json")
    with pytest.raises(EncoderError, match="MoE encoder"):
        Encoder(str(tmp_path / "moe"))


@pytest.mark.slow  # end to end, tens of seconds: `pytest -m slow`
def test_train_encoder_cli_on_a_store_copy(built, ray_session, tmp_path):
    """One real `imoe train-encoder` (Ray Train, the embedded MiniLM upcycled) with tiny settings."""
    _, store, _ = built
    target = tmp_path / "store"
    target.mkdir()
    shutil.copytree(Path(store.uri) / "corpus", target / "corpus")
    shutil.copy(Path(store.uri) / "config.yaml", target / "config.yaml")
    shutil.copy(Path(store.uri) / "assignments.parquet", target / "assignments.parquet")  # categories → topic batches
    tiny = ["moe_encoder.steps=2", "moe_encoder.batch_size=4", "moe_encoder.max_tokens=32", "moe_encoder.cpus=1",
            "moe_encoder.utilisation_chunks=8", "moe_encoder.every=3", "moe_encoder.loss=triplet"]
    done = subprocess.run([sys.executable, "-m", "imoe_ray.cli", "train-encoder", "--store", str(target),
                           *[a for s in tiny for a in ("--set", s)]], cwd=REPO, capture_output=True, text=True,
                          env=ray_session["env"], timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = target / "encoders" / "moe"
    manifest = json.loads((out / MOE_FILE).read_text())
    assert manifest["layers"] == [2, 5] and manifest["settings"]["loss"] == "triplet"
    assert manifest["metrics"]["steps"] == 2 and manifest["metrics"]["pairs"] > 0
    assert manifest["metrics"]["batches"] == "topic"
    assert set(manifest["pair_kinds"]) >= {"prefix", "key-terms"}
    assert [len(u["share"]) for u in manifest["utilisation"]] == [4, 4]
    assert f'"path": "{out}"' in done.stdout  # the CLI's JSON (Ray may add its own lines to stdout)
    assert Encoder(str(out), max_tokens=32, device="cpu").encode(TEXTS[:2]).shape == (2, 384)
    bad = subprocess.run([sys.executable, "-m", "imoe_ray.cli", "train-encoder", "--store", str(tmp_path / "none")],
                         cwd=REPO, capture_output=True, text=True, env=ray_session["env"], timeout=120)
    assert bad.returncode == 2 and "build the store first" in bad.stderr


def test_training_length_resolves_by_hardware():
    """steps / batch_size / lr left null: the GPU settings with a GPU, the short CPU ones without;
    max_tokens left null: the passages' length."""
    from imoe_ray.config import MoeEncoderConfig

    m = MoeEncoderConfig()
    gpu, cpu = m.resolved(gpu=True, passage_tokens=256), m.resolved(gpu=False, passage_tokens=256)
    assert {k: gpu[k] for k in ("steps", "batch_size", "lr")} == MoeEncoderConfig.BY_HARDWARE["gpu"]
    assert {k: cpu[k] for k in ("steps", "batch_size", "lr")} == MoeEncoderConfig.BY_HARDWARE["cpu"]
    assert gpu["max_tokens"] == cpu["max_tokens"] == 256
    assert cpu["steps"] * cpu["batch_size"] < gpu["steps"] * gpu["batch_size"]
    assert MoeEncoderConfig(steps=7).resolved(gpu=True, passage_tokens=256)["steps"] == 7  # a setting given wins
    assert MoeEncoderConfig(max_tokens=64).resolved(gpu=False, passage_tokens=256)["max_tokens"] == 64
    assert m.steps is None and "BY_HARDWARE" not in m.model_dump()  # one config; resolved where training starts


def test_too_few_training_chunks_is_a_one_line_user_error(tokenizer, tmp_path):
    """One chunk cannot make a pair: a StoreError in the library, exit 2 and one line from the CLI (before Ray)."""
    import os

    import pyarrow as pa

    from imoe_ray.config import Config
    from imoe_ray.encoders.train import mine_pairs
    from imoe_ray.store import Store
    from imoe_ray.store.store import StoreError

    store = Store(str(tmp_path / "store"))
    store.write_table(pa.table({"chunk_id": ["d:0"], "id": ["d"], "chunk_index": pa.array([0], pa.int32()),
                                "text": [TEXTS[0]]}), "corpus", "chunks")
    with pytest.raises(StoreError, match="at least 2"):
        mine_pairs(store, Config(), tokenizer)
    done = subprocess.run([sys.executable, "-m", "imoe_ray.cli", "train-encoder", "--store", store.uri], cwd=REPO,
                          capture_output=True, text=True, env=os.environ | {"COLUMNS": "400"}, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "at least 2" in lines[0], done.stderr


def test_side_by_side_metrics_and_utilisation_plot(tokenizer, tmp_path):
    from imoe_ray.evaluation.encoder import evaluate_one, plot_utilisation

    save_moe(upcycle(tiny_bert(tokenizer.vocab_size), n_experts=3, top_k=1, every=1), tokenizer, tmp_path / "moe")
    enc = Encoder(str(tmp_path / "moe"), max_tokens=32, device="cpu")
    ids = [f"c{i}" for i in range(len(TEXTS))]
    result = evaluate_one(enc, TEXTS, ids, TEXTS, [{i} for i in ids], batch_size=2)
    assert result["r@10"] == 1.0 and result["encode_ms_per_passage"] > 0
    assert [u["layer"] for u in result["utilisation"]] == [0, 1] and 0 <= result["min_expert_share"] <= 1 / 3
    assert result["utilisation"][0]["tokens"] == sum(len(tokenizer(t)["input_ids"]) for t in TEXTS)  # chunks only
    plot_utilisation(result["utilisation"], tmp_path / "util.png")
    assert (tmp_path / "util.png").stat().st_size > 5_000


def test_discovery_nmi_side_by_side(tokenizer, tmp_path):
    """`--label-column`: the store's discovery run on each encoder's embeddings, NMI against the chunks' labels."""
    import numpy as np
    import pyarrow as pa

    from imoe_ray.config import Config
    from imoe_ray.corpus.readers import CorpusError
    from imoe_ray.evaluation.encoder import chunk_labels, compare_encoders
    from imoe_ray.store import Store

    vocab = {"net": "socket packet router tcp latency bandwidth handshake firewall".split(),
             "math": "matrix eigenvalue integral vector theorem derivative lemma tensor".split(),
             "cook": "flour oven butter simmer recipe garlic dough pastry".split()}
    rng = np.random.default_rng(0)
    rows = [(f"{d}{i}", d, " ".join(rng.choice(words, 12))) for d, words in vocab.items() for i in range(14)]
    store = Store(str(tmp_path / "store"))
    store.write_table(pa.table({"chunk_id": [f"{r[0]}:0" for r in rows], "id": [r[0] for r in rows],
                                "chunk_index": pa.array([0] * len(rows), pa.int32()), "text": [r[2] for r in rows],
                                "n_tokens": pa.array([12] * len(rows), pa.int32()), "domain": [r[1] for r in rows]}),
                      "corpus", "chunks")
    save_moe(upcycle(tiny_bert(tokenizer.vocab_size), n_experts=3, top_k=1, every=1), tokenizer, tmp_path / "moe")
    cfg = Config()
    assert chunk_labels(store, cfg, "domain") == {r[0]: r[1] for r in rows}
    with pytest.raises(CorpusError, match="--labels"):
        chunk_labels(store, cfg, "topic")
    result = compare_encoders(store, cfg, str(tmp_path / "moe"), max_queries=20, report=lambda _m: None,
                              label_column="domain")
    for name in ("dense", "moe"):
        found = result["encoders"][name]["discovery"]
        assert result["encoders"][name]["nmi"] == found["nmi"] == result["nmi"][name]
        assert found["rows_evaluated"] == len(rows) and found["n_labels"] == 3
    assert result["encoders"]["dense"]["nmi"] > 0.8  # three vocabularies: the real encoder separates them
    assert result["nmi"]["change"] == pytest.approx(result["nmi"]["moe"] - result["nmi"]["dense"], abs=1e-4)
