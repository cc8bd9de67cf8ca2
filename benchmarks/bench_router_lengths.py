"""How much of a chunk's category can a short query carry? Classifiers of several families, side by side,
on the first N encoder tokens of the router's held-out chunks.

    imoe build --corpus corpus.jsonl --store store --until router
    python benchmarks/bench_router_lengths.py --store store [--lengths 8,16,24,32,48,64] [--all-layers]

Every classifier is fitted on what the router trains on (the training split's chunks and their query
views: prefixes, sentences, key terms, synthetic queries) and reads what the router's units read (the
pooled state joined with discovery's text features): logistic regression (the router's full-encoder
reference), an MLP, and k-nearest-neighbours. `--all-layers` reads every layer's state instead of the
last. If none of them reaches an accuracy at some length, the router's learned head is not what holds
it back there: the text is.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="store")
    parser.add_argument("--lengths", default="8,16,24,32,48,64", help="query lengths in encoder tokens")
    parser.add_argument("--all-layers", action="store_true", help="read every layer's pooled state, not the last")
    args = parser.parse_args()

    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import normalize

    from imoe_ray.cli import resolve_config
    from imoe_ray.discovery.features import combine
    from imoe_ray.discovery.stage import load_model
    from imoe_ray.routing.stage import load_corpus, make_encoder
    from imoe_ray.routing.views import split_of, token_prefixes, training_views
    from imoe_ray.store import Store

    cfg = resolve_config(args.store, None, None)
    store, r = Store(cfg.store, cache_dir=cfg.cache_dir), cfg.router
    discovery, encoder = load_model(store), make_encoder(cfg)
    corpus = load_corpus(store, cfg, encoder, print)
    split = np.array([split_of(i, r.calib_fraction, r.test_fraction) for i in corpus.ids])
    train, test = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    if len(test) == 0:
        raise SystemExit("the store's router has no test split (router.test_fraction is 0)")

    rng = np.random.default_rng(r.seed)
    texts, labels = [corpus.texts[i] for i in train], corpus.labels[train]
    views = training_views(texts, corpus.embeddings[train], labels, discovery.n_categories, encoder.tokenizer, rng, r)
    print(f"encoding {len(views.texts)} query views of {len(train)} training chunks")
    view_states = encoder.encode_with_layers(views.texts, batch_size=64)[1]

    def features(states: np.ndarray, rows: list[str]) -> np.ndarray:
        pooled = normalize(states.reshape(len(states), -1)) if args.all_layers else states[:, -1]
        text = discovery.text_features.transform(rows) if discovery.text_features is not None else None
        return combine(pooled, text)

    x = features(np.concatenate([corpus.layer_states[train], view_states]), texts + views.texts)
    y = np.concatenate([labels, np.array(views.labels, np.int64)])
    test_texts, test_labels = [corpus.texts[i] for i in test], corpus.labels[test]
    lengths = [int(n) for n in args.lengths.split(",") if n.strip()]
    queries = {}
    for n in lengths:
        prefixes = token_prefixes(test_texts, encoder.tokenizer, n)
        queries[str(n)] = features(encoder.encode_with_layers(prefixes, batch_size=64)[1], prefixes)
    queries["chunk"] = features(corpus.layer_states[test], test_texts)

    classifiers = {
        "logistic regression (C=4)": LogisticRegression(C=r.reference_c, max_iter=3000),
        "MLP (512 hidden)": MLPClassifier((512,), alpha=1e-3, max_iter=200, early_stopping=True, random_state=0),
        "15-nearest neighbours": KNeighborsClassifier(15, metric="cosine", weights="distance"),
    }
    results = {}
    for name, model in classifiers.items():
        started = time.perf_counter()
        model.fit(x, y)
        results[name] = {k: round(float(np.mean(model.predict(q) == test_labels)), 4) for k, q in queries.items()}
        print(f"fitted {name} in {time.perf_counter() - started:.0f}s")

    print(f"\naccuracy by query length: store {store.uri}, {discovery.n_categories} categories, {len(test)} held-out "
          f"chunks, {'all layers' if args.all_layers else 'last layer'} + text features")
    print(f"{'classifier':<28}" + "".join(f"{k:>8}" for k in queries))
    for name, row in results.items():
        print(f"{name:<28}" + "".join(f"{v:>8.3f}" for v in row.values()))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
