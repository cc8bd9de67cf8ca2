"""How well discovered categories match known labels (kept only for evaluation)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from imoe_ray.config import Config
from imoe_ray.corpus.readers import CorpusError, read_corpus_table
from imoe_ray.discovery.stage import ASSIGNMENTS
from imoe_ray.store import Store
from imoe_ray.store.store import StoreError


def read_labels(path: str, label_column: str, cfg: Config) -> dict[str, str]:
    """id → label, reading the labels file the way the corpus was read (same id rules)."""
    table = read_corpus_table(path, text_column=cfg.corpus.text_column, id_column=cfg.corpus.id_column,
                              split=cfg.corpus.split)
    if label_column not in table.column_names:
        raise CorpusError(f"label column {label_column!r} not in {path}; columns: {', '.join(table.column_names)}")
    return dict(zip(table.column("id").to_pylist(), [str(v) for v in table.column(label_column).to_pylist()]))


def evaluate_discovery(store: Store, cfg: Config, labels_path: str, label_column: str) -> dict:
    """NMI and ARI of `top_category` (none = its own label) against the labels, per chunk."""
    if not store.exists(*ASSIGNMENTS):
        raise StoreError(f"no {ASSIGNMENTS[0]} in {store.uri}: run `imoe build --until discover` first")
    assignments: pa.Table = store.read_table(*ASSIGNMENTS, columns=["id", "top_category"])
    labels = read_labels(labels_path, label_column, cfg)
    return label_scores(assignments.column("id").to_pylist(), assignments.column("top_category").to_numpy(),
                        labels, labels_path)


def label_scores(ids: list[str], predicted: np.ndarray, labels: dict[str, str], source: str) -> dict:
    """NMI and ARI of per-chunk categories (`ids`: each chunk's document id; -1 = none, its own label)
    against the labels of the documents that have one."""
    known = np.array([i in labels for i in ids])
    if not known.any():
        raise CorpusError(f"no id of {source} matches the store's chunks: is it the same corpus?")
    truth = [labels[i] for i, k in zip(ids, known) if k]
    pred = np.asarray(predicted)[known]
    clustered = pred >= 0
    truth_arr = np.array(truth)
    return {
        "nmi": round(float(normalized_mutual_info_score(truth, pred)), 4),
        "ari": round(float(adjusted_rand_score(truth, pred)), 4),
        "nmi_clustered_only": round(float(normalized_mutual_info_score(truth_arr[clustered], pred[clustered])), 4)
        if clustered.sum() > 1 else None,
        "n_categories": int(len(set(predicted[predicted >= 0].tolist()))),
        "n_labels": int(len(set(truth))),
        "noise_fraction": round(float(np.mean(pred < 0)), 4),
        "rows_evaluated": int(known.sum()),
        "rows_without_label": int((~known).sum()),
    }
