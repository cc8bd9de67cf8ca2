"""The router stage: train on the store's discovered categories, save to `router/`, load for serving.

`router/config.json` holds every setting the router was trained and calibrated with (lambda, the
temperatures, the cascade threshold, the sub-modules' sizes), the category names, the expert
profiles and the held-out metrics; `router/weights.safetensors` holds the DACT units, the fast
path and the text featurizer the units read (its vocabulary is in config.json). Experts that join
after training are listed in `router/experts.json`.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Callable

import numpy as np

from imoe_ray.config import ROUTER_RUNTIME_FIELDS, Config
from imoe_ray.discovery.features import TextFeatures
from imoe_ray.discovery.stage import ASSIGNMENTS, load_chunks_with_embeddings, load_model
from imoe_ray.embedding.ray_embed import layer_states_matrix
from imoe_ray.embedding.stage import read_embeddings
from imoe_ray.routing.dact import head_arrays, head_from_arrays
from imoe_ray.routing.fastpath import FastPath
from imoe_ray.routing.neighbours import NeighbourVote
from imoe_ray.routing.router import ExpertProfile, Router
from imoe_ray.routing.train import Corpus, LinearHead, train_router
from imoe_ray.store import Store
from imoe_ray.store.tensors import arrays_from_bytes as load_arrays
from imoe_ray.store.tensors import arrays_to_bytes as save_arrays
from imoe_ray.store.store import StoreError

from imoe_ray.store.layout import EXPERTS_INDEX, ROUTER_EXTRA_EXPERTS as EXTRA_EXPERTS
from imoe_ray.store.layout import ROUTER_MODEL as MODEL, ROUTER_REFERENCE as REFERENCE
from imoe_ray.store.layout import ROUTER_WEIGHTS as WEIGHTS


def make_encoder(cfg: Config):
    from imoe_ray.embedding.encoder import Encoder

    return Encoder(cfg.embedding.encoder, max_tokens=cfg.router.max_tokens)


def load_corpus(store: Store, cfg: Config, encoder, report: Callable[[str], None]) -> Corpus:
    chunks, embeddings = load_chunks_with_embeddings(store, cfg)
    table = read_embeddings(store)
    order = {cid: i for i, cid in enumerate(table.column("chunk_id").to_pylist())}
    states = layer_states_matrix(table)
    texts = chunks.column(cfg.corpus.text_column).to_pylist()
    if states is None:
        report(f"[router] the embeddings carry no per-layer states (an older store): encoding {len(texts)} chunks")
        states = (encoder or make_encoder(cfg)).encode_with_layers(texts)[1]
    else:
        states = states[[order[c] for c in chunks.column("chunk_id").to_pylist()]]
    assignments = store.read_table(*ASSIGNMENTS, columns=["chunk_id", "memberships"])
    labels = np.array([int(np.argmax(m)) for m in assignments.column("memberships").to_pylist()], np.int64)
    return Corpus(texts, chunks.column("id").to_pylist(), chunks.column("chunk_id").to_pylist(), labels, embeddings, states)


def run(store: Store, cfg: Config, resume: bool, report: Callable[[str], None] = print) -> dict:
    discovery = load_model(store)
    names = [c.name for c in discovery.categories]
    profiles = [ExpertProfile(c.name, c.id, [], c.centroid) for c in discovery.categories]
    encoder = make_encoder(cfg)
    corpus = load_corpus(store, cfg, encoder, report)
    router, metrics, reference = train_router(corpus, names, profiles, discovery.threshold, cfg.router, encoder, report,
                                              discovery.text_features)
    store.write_bytes(save_arrays({"weight": reference.weight, "bias": reference.bias}), *REFERENCE)
    save_router(store, router, metrics)
    for name, m in metrics.items():
        if name.startswith("test_"):
            report(f"[router] held-out {name[5:]}: cascade {m['cascade_accuracy']:.3f}, DACT {m['dact_accuracy']:.3f} "
                   f"in {m['dact_mean_layers']:.2f} layers, full encoder {m['full_encoder_accuracy']:.3f}, "
                   f"fast path answers {m['fast_path_share']:.0%}")
    return metrics


def save_router(store: Store, router: Router, metrics: dict) -> None:
    """The weights first, the JSON last: a config.json on disk always has its weights beside it."""
    arrays = head_arrays(router.head) | router.fast.arrays()
    if router.neighbours is not None:
        arrays |= router.neighbours.arrays()
    text = router.text_features if router.head.text_dims or router.fast.text_weights is not None else None
    if text is not None:
        arrays |= {"text.idf": text.idf, "text.svd_components": text.components}
    store.write_bytes(save_arrays(arrays), *WEIGHTS)
    trained = [asdict(p) for p in router.profiles if p.category is not None]
    store.write_json({"names": router.names, "settings": router.settings, "fast": router.fast.settings(),
                      "neighbours": router.neighbours.settings() if router.neighbours is not None else None,
                      "text_vocabulary": text.vocabulary if text is not None else None,
                      "profiles": trained, "metrics": metrics}, *MODEL)


def load_router(store: Store, cfg: Config | None = None, with_encoder: bool = True) -> Router:
    """The trained router; `cfg` (when given) supplies the request-time settings."""
    if not store.exists(*MODEL) or not store.exists(*WEIGHTS):
        raise StoreError(f"no router in {store.uri}: run `imoe train-router --store {store.uri}` "
                         f"(or `imoe build --until router`) first")
    meta = store.read_json(*MODEL)
    arrays = load_arrays(store.read_bytes(*WEIGHTS))
    settings = dict(meta["settings"])
    if cfg is not None:
        runtime = cfg.router.model_dump(mode="json")
        settings |= {k: runtime[k] for k in ROUTER_RUNTIME_FIELDS if k != "threshold"}
        if cfg.router.threshold is not None:
            settings["threshold"] = cfg.router.threshold
    encoder = None
    if with_encoder:
        encoder = make_encoder(cfg) if cfg is not None else _encoder_for(settings)
    profiles = [ExpertProfile(**p) for p in meta["profiles"]]
    text = None
    if meta.get("text_vocabulary") is not None:
        text = TextFeatures(meta["text_vocabulary"], arrays["text.idf"], arrays["text.svd_components"])
    router = Router(meta["names"], FastPath.from_parts(meta["fast"], arrays, text), settings["fast_threshold"],
                    head_from_arrays(settings, arrays), settings["dact_temperature"], settings["threshold"],
                    settings, encoder, profiles, text,
                    NeighbourVote.from_parts(meta["neighbours"], arrays) if meta.get("neighbours") else None)
    if store.exists(*EXTRA_EXPERTS):
        for p in store.read_json(*EXTRA_EXPERTS):
            if p.get("category") is not None or encoder is not None:  # joining by centroid needs the encoder
                router.add_expert(ExpertProfile(**p))
    if store.exists(*EXPERTS_INDEX):  # categories too small for an expert are served by another (or the base)
        router.served_by = dict(store.read_json(*EXPERTS_INDEX).get("aliases", {}))
    return router


def _encoder_for(settings: dict):
    from imoe_ray.config import DEFAULT_ENCODER
    from imoe_ray.embedding.encoder import Encoder

    return Encoder(settings.get("encoder", DEFAULT_ENCODER), max_tokens=settings["max_tokens"])


def add_expert(store: Store, profile: ExpertProfile) -> None:
    """Register an expert that joins routing without retraining (by category, or by centroid)."""
    current = [p for p in (store.read_json(*EXTRA_EXPERTS) if store.exists(*EXTRA_EXPERTS) else [])
               if p["name"] != profile.name]
    store.write_json(current + [asdict(profile)], *EXTRA_EXPERTS)


def load_reference(store: Store) -> LinearHead:
    arrays = load_arrays(store.read_bytes(*REFERENCE))
    return LinearHead(arrays["weight"], arrays["bias"])
