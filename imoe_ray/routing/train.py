"""Train the router from a store's discovered categories: views → fast path, DACT, calibration, evaluation.

Plain Python over arrays: the encoder is frozen (its per-layer states of the chunks come from the
embed stage), so only short query views are encoded here; the DACT units (a logistic regression per
layer, then the halting units) and the linear fast path train in a minute or two on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from imoe_ray.config import RouterConfig
from imoe_ray.discovery.features import TextFeatures, combine
from imoe_ray.routing import calibration
from imoe_ray.routing.dact import exit_from_states, fit_classifiers, train_halting
from imoe_ray.routing.fastpath import FastPath
from imoe_ray.routing.neighbours import NeighbourVote
from imoe_ray.routing.router import ExpertProfile, Router
from imoe_ray.routing.views import sentences, split_of, token_prefixes, training_views

Report = Callable[[str], None]


@dataclass
class Corpus:
    """The labelled chunks a router learns from, row for row."""
    texts: list[str]
    ids: list[str]            # input row ids (the split is by row, so a document's chunks stay together)
    chunk_ids: list[str]
    labels: np.ndarray        # (n,) discovered top category
    embeddings: np.ndarray    # (n, dim)
    layer_states: np.ndarray  # (n, L, dim)


@dataclass
class EvalSet:
    name: str
    texts: list[str]
    labels: np.ndarray
    states: np.ndarray


def _encode(encoder, texts: list[str], what: str, report: Report) -> np.ndarray:
    report(f"[router] encoding {len(texts)} {what}")
    return encoder.encode_with_layers(texts, batch_size=64)[1]


def _accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return round(float(np.mean(pred == labels)), 4) if len(labels) else float("nan")


def eval_sets(corpus: Corpus, rows: np.ndarray, encoder, prefix_tokens: int, report: Report,
              with_query_views: bool) -> list[EvalSet]:
    """Held-out chunks as they are, their first `prefix_tokens` tokens, and (for calibration) one sentence each."""
    texts = [corpus.texts[i] for i in rows]
    labels = corpus.labels[rows]
    out = [EvalSet("chunks", texts, labels, corpus.layer_states[rows])]
    prefixes = token_prefixes(texts, encoder.tokenizer, prefix_tokens)
    out.append(EvalSet(f"prefix{prefix_tokens}", prefixes, labels, _encode(encoder, prefixes, "held-out prefixes", report)))
    if with_query_views:
        pairs = [(s[0], l) for t, l in zip(texts, labels) if (s := sentences(t))]
        if pairs:
            sent = [p[0] for p in pairs]
            out.append(EvalSet("sentences", sent, np.array([p[1] for p in pairs]),
                               _encode(encoder, sent, "held-out sentences", report)))
    return out


@dataclass
class LinearHead:
    """The full encoder's last layer (joined with the text features when the router reads them, as
    discovery joins them) + a linear head: what DACT is measured against (evaluation only)."""
    weight: np.ndarray  # (K, dim [+ text dims])
    bias: np.ndarray    # (K,)

    def predict(self, states: np.ndarray, text: np.ndarray | None = None) -> np.ndarray:
        return (reference_features(states, text) @ self.weight.T + self.bias).argmax(1)


def reference_features(states: np.ndarray, text: np.ndarray | None) -> np.ndarray:
    """The last layer's pooled state joined with the rows' text features (None: the state alone), as discovery joins them."""
    return combine(states[:, -1], text)


def train_router(corpus: Corpus, names: list[str], profiles: list[ExpertProfile], threshold: float,
                 cfg: RouterConfig, encoder, report: Report = print,
                 text_features: TextFeatures | None = None,
                 split: np.ndarray | None = None) -> tuple[Router, dict, LinearHead]:
    """`text_features`: discovery's tf-idf → SVD featurizer, read by every DACT unit and the fast path
    (`cfg.read_text_features`). `split`: each row's "train", "calib" or "test" (None: the store's
    split by input row id; a cross-validation passes its folds)."""
    rng = np.random.default_rng(cfg.seed)
    text = text_features if cfg.read_text_features else None
    unit_text = (lambda texts: None) if text is None else text.transform
    n_classes = len(names)
    if split is None:
        split = np.array([split_of(i, cfg.calib_fraction, cfg.test_fraction) for i in corpus.ids])
    train, calib, test = (np.flatnonzero(split == s) for s in ("train", "calib", "test"))
    if len(train) == 0 or len(calib) == 0:
        raise ValueError(f"{len(corpus.texts)} chunks are too few to hold out a calibration split")
    report(f"[router] {len(train)} training chunks, {len(calib)} for calibration, {len(test)} for testing")

    # 1. Training data: the chunks and their query-like views.
    train_texts = [corpus.texts[i] for i in train]
    views = training_views(train_texts, corpus.embeddings[train], corpus.labels[train], n_classes,
                           encoder.tokenizer, rng, cfg)
    view_states = _encode(encoder, views.texts, "query views of the training chunks", report)
    x_texts = train_texts + views.texts
    x_states = np.concatenate([corpus.layer_states[train], view_states])
    y = np.concatenate([corpus.labels[train], np.array(views.labels, np.int64)])
    kinds = {k: views.kinds.count(k) for k in sorted(set(views.kinds))}

    calib_sets = eval_sets(corpus, calib, encoder, cfg.eval_prefix_tokens, report, with_query_views=True)
    c_texts = [t for s in calib_sets for t in s.texts]
    c_states = np.concatenate([s.states for s in calib_sets])
    c_labels = np.concatenate([s.labels for s in calib_sets])
    c_groups = np.concatenate([np.full(len(s.labels), i) for i, s in enumerate(calib_sets)])

    x_text, c_text = unit_text(x_texts), unit_text(c_texts)

    # 2. Every layer's classifier (logistic regression on the unit's input). The last one is the
    #    reference DACT is measured against: the full encoder with a linear head.
    report(f"[router] fitting the {corpus.layer_states.shape[1]} layers' classifiers")
    classifiers = fit_classifiers(x_states, y, n_classes, cfg.reference_c, x_text)
    last = classifiers.classify[-1]
    reference = LinearHead(last.weight.detach().numpy().copy(), last.bias.detach().numpy().copy())
    ref_correct = reference.predict(c_states, c_text) == c_labels
    ref_acc = round(float(ref_correct.mean()), 4)

    # 3. DACT: sweep lambda over the halting units; of the heads within the allowed accuracy drop on
    #    every calibration set (chunks, prefixes, sentences: a mix would let fewer layers on one kind of
    #    request hide a loss on another) keep the one that runs the fewest layers (none: the most accurate).
    sweep, heads = [], []
    for lam in sorted(cfg.ponder_lambdas):
        head = train_halting(classifiers, x_states, y, lam, cfg.epochs, cfg.lr, cfg.batch_size, cfg.seed,
                             x_text, cfg.weight_decay)
        out = exit_from_states(head, c_states, c_text)
        correct = out.probabilities.argmax(1) == c_labels
        row = {"lambda": lam, "accuracy": round(float(correct.mean()), 4), "mean_layers": round(float(out.layers.mean()), 3),
               "worst_drop": round(max(float(ref_correct[c_groups == g].mean() - correct[c_groups == g].mean())
                                       for g in np.unique(c_groups)), 4)}
        sweep.append(row)
        report(f"[router] DACT lambda={lam:g}: calibration accuracy {row['accuracy']:.3f}, "
               f"{row['mean_layers']:.2f} of {head.n_layers} layers (full encoder + linear: {ref_acc:.3f}; "
               f"largest drop on one held-out set {row['worst_drop']:+.3f})")
        heads.append((head, row, out))
    good = [h for h in heads if h[1]["worst_drop"] <= cfg.max_accuracy_drop]
    head, chosen, c_exit = (min(good, key=lambda h: h[1]["mean_layers"]) if good
                            else max(heads, key=lambda h: h[1]["accuracy"]))
    dact_temperature = calibration.fit_temperature(np.log(np.clip(c_exit.probabilities, 1e-9, 1)), c_labels)

    # 4. Fast path and its place in the cascade.
    fast = FastPath.fit(x_texts, y, n_classes, cfg.fast_features, cfg.max_query_chars, cfg.fast_c, cfg.seed, text)
    c_fast_logits = fast.logits_batch(c_texts)
    fast.temperature = calibration.fit_temperature(c_fast_logits, c_labels)
    c_fast = _softmax(c_fast_logits / fast.temperature)
    # 5. Fusion of the escalated DACT answer with the fast path's evidence.
    c_dact = _softmax(np.log(np.clip(c_exit.probabilities, 1e-9, 1)) / dact_temperature)
    fusion_weight, fusion_temperature = _fit_fusion(c_dact, c_fast, c_labels)
    c_fused = np.log(np.clip(c_dact, 1e-9, 1)) + fusion_weight * np.log(np.clip(c_fast, 1e-9, 1))
    fast_threshold = calibration.cascade_threshold(c_fast.max(1), c_fast.argmax(1) == c_labels,
                                                   c_fused.argmax(1) == c_labels, cfg.fast_min_precision, c_groups)
    report(f"[router] fast path answers at p >= {fast_threshold if fast_threshold is not None else 'never'}; "
           f"escalated answers fuse DACT with the fast path at weight {fusion_weight:g}")

    settings = cfg.model_dump(mode="json") | {
        "fusion_weight": fusion_weight, "fusion_temperature": fusion_temperature,
        "encoder": getattr(encoder, "name", None), "n_layers": head.n_layers, "hidden": head.hidden, "n_classes": n_classes,
        "text_dims": head.text_dims, "unit_input": head.unit_input,
        "ponder_lambda": chosen["lambda"], "lambda_sweep": sweep, "dact_temperature": dact_temperature,
        "fast_temperature": fast.temperature, "fast_threshold": fast_threshold, "threshold": threshold,
    }
    router = Router(names, fast, fast_threshold, head, dact_temperature, threshold, settings, encoder, profiles, text)

    # 5b. The neighbour vote over the training chunks and their prefix views, fused with the cascade's answer.
    if cfg.neighbour_k > 0:
        voters = np.r_[np.arange(len(train)), len(train) + np.flatnonzero(np.array(views.kinds) == "prefix")]
        router.neighbours = NeighbourVote.fit(
            reference_features(x_states[voters], None if x_text is None else x_text[voters]), y[voters], n_classes,
            cfg.neighbour_k, cfg.neighbour_temperature, cfg.neighbour_rows, cfg.seed)
        c_cascade = router.decide_states(c_texts, c_states).probabilities
        c_vote = router.neighbours.probabilities(reference_features(c_states, c_text))
        weight, temperature = _fit_vote(c_cascade, c_vote, c_labels)
        router.settings |= {"neighbour_weight": weight, "neighbour_fused_temperature": temperature}
        report(f"[router] neighbour vote of {cfg.neighbour_k} among {len(router.neighbours.labels)} training rows, "
               f"fused at weight {weight:g}")

    # 6. Held-out evaluation (the test split was never seen by training or calibration).
    metrics = {"train_rows": len(y), "views": kinds, "calib_rows": len(c_labels), "lambda": chosen["lambda"],
               "lambda_sweep": sweep, "fast_threshold": fast_threshold,
               "reference_calib_accuracy": ref_acc}
    if len(test):
        for s in eval_sets(corpus, test, encoder, cfg.eval_prefix_tokens, report, with_query_views=False):
            cascade = router.decide_states(s.texts, s.states)
            dact = router.decide_states(s.texts, s.states, use_fast_path=False)
            metrics[f"test_{s.name}"] = {
                "rows": len(s.labels),
                "cascade_accuracy": _accuracy(cascade.probabilities.argmax(1), s.labels),
                "dact_accuracy": _accuracy(dact.probabilities.argmax(1), s.labels),
                "full_encoder_accuracy": _accuracy(reference.predict(s.states, unit_text(s.texts)), s.labels),
                "dact_mean_layers": round(float(dact.exit_layer.mean()), 3),
                "cascade_mean_layers": round(float(cascade.exit_layer.mean()), 3),
                "fast_path_share": round(float(np.mean(cascade.exit_layer == 0)), 4),
                "cascade_ece": round(calibration.expected_calibration_error(cascade.probabilities, s.labels), 4),
            }
    return router, metrics, reference


def _fit_fusion(dact: np.ndarray, fast: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The weight of the fast path's log-probabilities that is most accurate on held-out data
    (ties: the smaller weight), and the temperature that calibrates the fused scores."""
    best_w, best_acc = 0.0, -1.0
    for w in (0.0, 0.25, 0.5, 0.75, 1.0, 1.5):
        z = np.log(np.clip(dact, 1e-9, 1)) + w * np.log(np.clip(fast, 1e-9, 1))
        acc = float(np.mean(z.argmax(1) == labels))
        if acc > best_acc + 1e-9:
            best_w, best_acc = w, acc
    z = np.log(np.clip(dact, 1e-9, 1)) + best_w * np.log(np.clip(fast, 1e-9, 1))
    return best_w, calibration.fit_temperature(z, labels)


def _fit_vote(cascade: np.ndarray, vote: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The weight of the neighbour vote's log-probabilities, and the temperature of the fused scores,
    with the lowest held-out negative log-likelihood (a proper score: the runners-up count too)."""
    best = (float("inf"), 0.0, 1.0)
    for w in (0.0, 0.25, 0.5, 0.75, 1.0, 1.5):
        z = np.log(np.clip(cascade, 1e-9, 1)) + w * np.log(np.clip(vote, 1e-9, 1))
        t = calibration.fit_temperature(z, labels)
        p = _softmax(z / t)
        nll = float(-np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, 1)).mean())
        if nll < best[0] - 1e-9:
            best = (nll, w, t)
    return best[1], best[2]


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
