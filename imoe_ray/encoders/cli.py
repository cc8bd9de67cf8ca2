"""CLI of the MoE encoder: `imoe train-encoder` and `imoe eval encoder` (registered in imoe_ray/cli.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from imoe_ray.store import write_text_atomic

console = Console(stderr=True)
StoreOpt = typer.Option("store", "--store", "-s", help="Store directory (built through at least the ingest stage).")
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML configuration file.")
SetOpt = typer.Option(None, "--set", help="Override one setting, e.g. --set moe_encoder.steps=50 (repeatable).")


def _report(message: str) -> None:
    console.print(message, highlight=False, markup=False)


def _write(text: str, output: Optional[Path]) -> None:
    if output:
        write_text_atomic(output, text)


def train_encoder(store: str = StoreOpt, config: Optional[Path] = ConfigOpt,
                  overrides: Optional[list[str]] = SetOpt) -> None:
    """Upcycle the store's encoder into a sparse-MoE encoder, train it contrastively on pairs mined
    from the corpus (Ray Train), save it at STORE/encoders/moe (usable as `embedding.encoder: DIR`)."""
    from imoe_ray.cluster import init_ray
    from imoe_ray.config import store_config
    from imoe_ray.encoders.train import require_chunks, train_encoder as run
    from imoe_ray.store import Store

    cfg = store_config(store, config, overrides)
    require_chunks(Store(store), cfg)  # before Ray starts
    init_ray(cfg.ray)
    manifest = run(Store(store), cfg, report=_report)
    typer.echo(json.dumps({"path": str(Path(store) / "encoders" / "moe"), "metrics": manifest["metrics"],
                           "utilisation": manifest["utilisation"]}, indent=2))


def eval_encoder(
    store: str = StoreOpt,
    encoder: Optional[str] = typer.Option(None, "--encoder", help="MoE encoder directory (default: STORE/encoders/moe)."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Dense encoder to compare with (default: the store's)."),
    max_queries: int = typer.Option(600, "--max-queries", min=1, help="Held-out query views evaluated."),
    label_column: Optional[str] = typer.Option(None, "--label-column", help="Also compare discovery NMI against this "
                                               "label column (of the store's chunks, or of --labels)."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Corpus file the store was built from, holding "
                                         "--label-column (default: the store's chunks)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the expert-utilisation bar plot (PNG) here."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Also write the JSON here."),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Dense vs MoE encoder on held-out query→chunk retrieval (P@K, R@K, MRR@10, MAP among all chunks),
    encode_ms_per_passage of both, the MoE's expert utilisation and, with --label-column, the discovery
    NMI of each (the store's discovery run on each encoder's embeddings)."""
    from imoe_ray.config import ConfigError, store_config
    from imoe_ray.evaluation.encoder import compare_encoders, plot_utilisation
    from imoe_ray.store import Store

    cfg = store_config(store, config, overrides)
    path = encoder or str(Path(store) / "encoders" / "moe")
    if not Path(path).is_dir():
        raise FileNotFoundError(f"no encoder at {path}: run `imoe train-encoder --store {store}` first")
    if labels and not label_column:
        raise ConfigError("--labels needs --label-column (the column holding the labels)")
    result = compare_encoders(Store(store), cfg, path, baseline, max_queries, report=_report,
                              label_column=label_column, labels_path=labels)
    if plot:
        plot_utilisation(result["encoders"]["moe"]["utilisation"], plot)
        result["plot"] = str(plot)
    text = json.dumps(result, indent=2)
    _write(text, output)
    typer.echo(text)
