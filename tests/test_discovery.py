"""Discovery on synthetic data with a known answer: blobs on the unit sphere with their own vocabularies."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from imoe_ray.config import DiscoveryConfig
from imoe_ray.discovery import Discovery, discover
from imoe_ray.discovery.keywords import category_names

VOCABS = [
    "tensor gradient autograd backward optimizer layer weights",
    "socket packet protocol header handshake router latency",
    "dataframe column index groupby merge pivot series",
    "thread lock mutex coroutine scheduler queue semaphore",
    "polynomial integral derivative matrix eigenvalue solver spline",
]


def blobs(k: int = 5, per: int = 60, dim: int = 384, spread: float = 0.35, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.concatenate([c + spread * rng.normal(size=(per, dim)) / np.sqrt(dim) * 4 for c in centres])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = np.repeat(np.arange(k), per)
    words = [v.split() for v in VOCABS]
    texts = [" ".join(rng.choice(words[label % len(words)], size=30)) + " common shared filler words" for label in y]
    return x.astype(np.float32), texts, y


@pytest.fixture(scope="module")
def found():
    x, texts, y = blobs()
    model, memberships = discover(x, texts, DiscoveryConfig(seed=0))
    return x, texts, y, model, memberships


def test_finds_the_number_of_categories_by_itself(found):
    x, texts, y, model, memberships = found
    assert model.n_categories == 5
    top, _ = model.assign(memberships)
    assert normalized_mutual_info_score(y, top) >= 0.9
    assert np.mean(top < 0) <= 0.15


def test_memberships_and_categories(found):
    x, texts, y, model, memberships = found
    assert memberships.shape == (len(x), 5)
    assert np.all((memberships >= 0) & (memberships <= 1))
    assert np.allclose(model.memberships(x, texts), memberships, atol=1e-5)  # new text is classified the same way
    names = [c.name for c in model.categories]
    assert len(set(names)) == 5 and all(n.replace("-", "").isalnum() and n == n.lower() for n in names)
    assert sum(c.size for c in model.categories) == len(x)
    for c in model.categories:
        assert len(c.centroid) == x.shape[1] and abs(np.linalg.norm(c.centroid) - 1) < 1e-3
        assert c.keywords and "common" not in c.keywords[:3]


def test_assign_threshold_multilabel_and_none():
    model = Discovery(categories=[], threshold=0.3)
    m = np.array([[0.6, 0.35, 0.05], [0.2, 0.25, 0.25], [0.1, 0.1, 0.8]], np.float32)
    top, cats = model.assign(m)
    assert top.tolist() == [0, -1, 2]
    assert cats == [[0, 1], [], [2]]


def test_complexity_lowers_the_bar():
    model = Discovery(categories=[], threshold=0.3, complexity_k=10.0)
    m = np.array([[0.25, 0.7, 0.05], [0.25, 0.7, 0.05]], np.float32)
    _, cats = model.assign(m, complexity=np.array([0.0, 0.5]))  # t_C: 0.3, then 0.076
    assert cats[0] == [1] and cats[1] == [1, 0]
    assert model.thresholds(np.array([1.0]), 1)[0] == pytest.approx(0.0)


def test_cap_merges_nearest_categories():
    x, texts, y = blobs()
    model, memberships = discover(x, texts, DiscoveryConfig(max_categories=3))
    assert model.n_categories == 3 and memberships.shape[1] == 3


def test_serialisation_round_trip(found):
    x, texts, _, model, memberships = found
    import json

    from imoe_ray.store.tensors import arrays_from_bytes, arrays_to_bytes

    # Through the bytes the store keeps: sklearn's column-major arrays must survive safetensors.
    again = Discovery.from_parts(json.loads(json.dumps(model.to_json())), arrays_from_bytes(arrays_to_bytes(model.arrays())))
    assert np.allclose(again.memberships(x, texts), memberships, atol=1e-5)
    assert [c.name for c in again.categories] == [c.name for c in model.categories]


def test_tiny_and_degenerate_inputs():
    x, texts, _ = blobs(k=2, per=4)
    model, m = discover(x, texts, DiscoveryConfig())
    assert model.n_categories == 1 and m.shape == (8, 1)
    same = np.ones((40, 384), np.float32) / np.sqrt(384)
    model, m = discover(same, ["the same words"] * 40, DiscoveryConfig())
    assert model.n_categories >= 1 and np.all(m.sum(axis=1) > 0.99)
    with pytest.raises(ValueError, match="texts"):
        discover(x, texts[:-1], DiscoveryConfig())


def test_names_are_unique_and_safe():
    names = category_names([["Tensor", "torch.nn"], ["Tensor", "torch.nn"], [], ["../etc", "passwd"]])
    assert len(set(names)) == 4
    assert all(n and all(ch.isalnum() or ch == "-" for ch in n) for n in names)
