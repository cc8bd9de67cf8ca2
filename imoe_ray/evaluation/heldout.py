"""The held-out texts every evaluation reads, with their category: the router's test split of the
store's own chunks (no model trained on them), or a file the user gives."""

from __future__ import annotations

from imoe_ray.config import Config
from imoe_ray.corpus.readers import CorpusError, read_corpus_table
from imoe_ray.store import Store


def store_heldout(store: Store, cfg: Config, split: str = "test") -> tuple[list[str], list[str]]:
    """The store's held-out chunks with the discovered category of each ("none": in no category).
    `split` "test" (default) is the router's test split; "calib" its calibration split, the
    validation set on which request-time settings (t_C) are tuned, never reported as a result."""
    from imoe_ray.discovery.stage import ASSIGNMENTS, load_model
    from imoe_ray.experts.stage import split_chunks

    if split not in ("test", "calib"):
        raise CorpusError(f"split must be 'test' or 'calib', not {split!r}")
    rows = split_chunks(store, cfg, split)
    texts, chunk_ids = [r[0] for r in rows], [r[1] for r in rows]
    names = {c.id: c.name for c in load_model(store).categories}
    table = store.read_table(*ASSIGNMENTS, columns=["chunk_id", "top_category"])
    top = dict(zip(table.column("chunk_id").to_pylist(), table.column("top_category").to_pylist()))
    return texts, [names.get(top.get(c, -1), "none") for c in chunk_ids]


def file_heldout(path: str, text_column: str, category_column: str | None) -> tuple[list[str], list[str] | None]:
    """A file's texts (any corpus format) and, when `category_column` is given, each one's category."""
    table = read_corpus_table(path, text_column=text_column, id_column=None)
    if category_column and category_column not in table.column_names:
        raise CorpusError(f"category column {category_column!r} not in {path}; columns: {', '.join(table.column_names)}")
    texts = [t or "" for t in table.column(text_column).to_pylist()]
    cats = [str(c) for c in table.column(category_column).to_pylist()] if category_column else None
    return texts, cats
