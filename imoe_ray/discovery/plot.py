"""A picture of what discovery found: every chunk on a 2-D map of its embedding (UMAP, cosine),
coloured by its category, each category's name at its centre; chunks in no category in grey."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imoe_ray.config import Config
from imoe_ray.store import Store


def plot_categories(store: Store, cfg: Config, path: str | Path, max_points: int = 20_000) -> dict:
    """Write the map to `path` (PNG); returns {"points", "categories"} drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import umap

    from imoe_ray.discovery.stage import ASSIGNMENTS, load_chunks_with_embeddings, load_model

    model = load_model(store)
    chunks, embeddings = load_chunks_with_embeddings(store, cfg)
    top_of = dict(zip(*[store.read_table(*ASSIGNMENTS, columns=["chunk_id", "top_category"]).column(c).to_pylist()
                        for c in ("chunk_id", "top_category")]))
    top = np.array([top_of.get(c, -1) for c in chunks.column("chunk_id").to_pylist()])
    rng = np.random.default_rng(cfg.discovery.seed)
    keep = np.sort(rng.choice(len(top), max_points, replace=False)) if len(top) > max_points else np.arange(len(top))
    points = umap.UMAP(n_components=2, n_neighbors=min(cfg.discovery.n_neighbors, len(keep) - 1), min_dist=0.1,
                       metric="cosine", random_state=cfg.discovery.seed).fit_transform(embeddings[keep])
    top = top[keep]
    fig, ax = plt.subplots(figsize=(10, 8))
    noise = top < 0
    ax.scatter(points[noise, 0], points[noise, 1], s=6, c="#c8c8c8", label=f"no category ({noise.sum()})")
    colours = plt.get_cmap("tab20")
    for i, category in enumerate(model.categories):
        mine = top == category.id
        if not mine.any():
            continue
        ax.scatter(points[mine, 0], points[mine, 1], s=8, color=colours(i % 20), label=f"{category.name} ({mine.sum()})")
        x, y = np.median(points[mine], axis=0)
        ax.annotate(category.name, (x, y), ha="center", fontsize=9, weight="bold",
                    bbox={"boxstyle": "round,pad=0.2", "fc": "white", "alpha": 0.75, "lw": 0})
    ax.set_title(f"{len(model.categories)} categories discovered in {len(top)} chunks (UMAP of the embeddings)")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, loc="best", markerscale=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"points": int(len(top)), "categories": len(model.categories)}
