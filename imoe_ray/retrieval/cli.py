"""CLI of the knowledge bases: `imoe kb list|remove` and `imoe eval retrieval` (registered in imoe_ray/cli.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from imoe_ray.store import write_text_atomic

console = Console(stderr=True)
kb_app = typer.Typer(help="The experts' knowledge bases (LanceDB): learned rows.", no_args_is_help=True)
StoreOpt = typer.Option("store", "--store", "-s", help="Store directory (built through the shard stage).")


def _open(store: str):
    from imoe_ray.config import store_config
    from imoe_ray.retrieval.knowledge_base import KnowledgeBase

    cfg = store_config(store)

    def no_encoder(_texts):  # listing and removing never embed
        raise RuntimeError("this command does not encode text")

    from imoe_ray.store.store import is_uri

    kb = f"{store.rstrip('/')}/kb" if is_uri(store) else Path(store) / "kb"
    return KnowledgeBase(kb, no_encoder, cfg.corpus.text_column)


def _tables(store: str, kb, expert: str | None) -> list[str | None]:
    """The tables of an expert (its categories) or of one category; [None]: every table."""
    from imoe_ray.retrieval.serving import expert_categories

    if expert is None:
        return [None]
    tables: list[str | None] = [t for t in expert_categories(store).get(expert, []) if t in kb.names()]
    if not tables:
        kb.table(expert)  # a category's table; raises when there is none, with the names there are
        tables = [expert]
    return tables


@kb_app.command("list")
def kb_list(store: str = StoreOpt,
            expert: Optional[str] = typer.Option(None, "--expert", help="Only this expert's tables (its categories), or one category's."),
            as_json: bool = typer.Option(False, "--json", help="Print JSON lines instead of a table.")) -> None:
    """List the rows learned from answers (id, table, caller, request, time, text)."""
    from imoe_ray.retrieval.learning import list_learned

    kb = _open(store)
    rows = [r for table in _tables(store, kb, expert) for r in list_learned(kb, table)]
    if as_json:
        for r in rows:
            typer.echo(json.dumps(r))
        return
    table = Table(title=f"{len(rows)} learned rows")
    for col in ("id", "table", "caller", "request", "time"):
        table.add_column(col, no_wrap=True)
    table.add_column("text")
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["created_at"])) if r["created_at"] else ""
        table.add_row(r["chunk_id"], r["table"], r["caller"] or "", r["request_id"] or "", when,
                      (r["text"] or "")[:80].replace("\n", " "))
    Console().print(table)


def _when(text: str | None, option: str) -> float | None:
    """A time as epoch seconds: an ISO 8601 date or time (UTC unless it says otherwise) or a number."""
    from datetime import datetime, timezone

    from imoe_ray.retrieval.knowledge_base import KnowledgeBaseError

    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise KnowledgeBaseError(f"{option} {text[:40]!r} is not a time: use ISO 8601 (2026-12-02 or "
                                 "2026-12-02T20:00:00Z) or epoch seconds") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


@kb_app.command("remove")
def kb_remove(ids: Optional[list[str]] = typer.Argument(None, help="Learned row ids (learned-…), as `imoe kb list` shows them."),
              store: str = StoreOpt,
              expert: Optional[str] = typer.Option(None, "--expert", help="Only from this expert's tables (its categories), or one category's."),
              since: Optional[str] = typer.Option(None, "--since", help="Learned rows made at or after this time (ISO 8601 or epoch seconds)."),
              until: Optional[str] = typer.Option(None, "--until", help="Learned rows made before this time."),
              caller: Optional[str] = typer.Option(None, "--caller", help="Learned rows of this caller (as `imoe kb list` shows it)."),
              all_learned: bool = typer.Option(False, "--all-learned", help="Every learned row (of --expert's tables, or all).")) -> None:
    """Remove learned rows: by id, or in bulk by time, caller or all of them; corpus rows are never removed."""
    from imoe_ray.retrieval.knowledge_base import KnowledgeBaseError
    from imoe_ray.retrieval.learning import remove_learned, remove_learned_where

    bulk = since is not None or until is not None or caller is not None or all_learned
    if bool(ids) == bulk:
        raise KnowledgeBaseError("name the rows to remove: learned row ids, or --since/--until/--caller, or --all-learned")
    start, end = _when(since, "--since"), _when(until, "--until")
    kb = _open(store)
    with _locked(store, "kb remove"):
        if bulk:
            removed = {}
            for table in _tables(store, kb, expert):
                removed.update(remove_learned_where(kb, table, start, end, caller))
            console.print(f"removed {sum(removed.values())} learned row(s)"
                          + "".join(f"; {n} from {t}" for t, n in removed.items() if n))
            return
        assert ids is not None  # not bulk: the ids were given (checked above)
        counts: dict[str, int] = dict.fromkeys(ids, 0)
        for table in _tables(store, kb, expert):
            for i, n in remove_learned(kb, ids, table).items():
                counts[i] += n
    missing = [i for i, n in counts.items() if n == 0]
    for i, n in counts.items():
        if n:
            console.print(f"removed {i} from {n} table(s)")
    if missing:
        raise KnowledgeBaseError(f"no learned row with id {', '.join(missing)} (see `imoe kb list`)")


@kb_app.command("compact")
def kb_compact(store: str = StoreOpt,
               older_than_days: Optional[float] = typer.Option(None, "--older-than-days", min=0,
                                                               help="Also drop table versions older than this.")) -> None:
    """Compact the knowledge-base tables (merge the small files that commits leave)."""
    from datetime import timedelta

    from imoe_ray.retrieval.learning import compact

    kb = _open(store)
    with _locked(store, "kb compact"):
        done = compact(kb, None if older_than_days is None else timedelta(days=older_than_days))
    for name, stats in done.items():
        console.print(f"{name}: {stats['fragments_before']} → {stats['fragments_after']} fragments (version {stats['version']})")


def _locked(store: str, purpose: str):
    """The store's one writer lock (a build, an install or another edit holding it: StoreLocked, exit 2)."""
    from imoe_ray.store import Store

    return Store(store).lock(f"imoe {purpose}")


def eval_retrieval(
    store: str = StoreOpt,
    heldout: Optional[str] = typer.Option(None, "--heldout", help="Held-out corpus file (rows with the store's ids); "
                                          "default: the store's own held-out split."),
    text_column: Optional[str] = typer.Option(None, "--text-column", help="Text column of --heldout (default: the corpus's)."),
    encoder: Optional[str] = typer.Option(None, "--encoder", help="Query encoder (HF dir or id); the knowledge base "
                                          "is embedded again with it. Default: the store's encoder."),
    max_queries: int = typer.Option(300, "--max-queries", min=1, help="Held-out query views evaluated."),
    compression_queries: int = typer.Option(100, "--compression-queries", min=0, help="Prompts compressed (0: skip)."),
    output: Path = typer.Option(Path("eval-retrieval.json"), "--output", "-o",
                                help="Where the JSON goes; the plot goes beside it (.png)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML configuration file."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="Override one setting (repeatable)."),
) -> None:
    """Retrieval quality (P@K, R@K, MRR@10, MAP for vector, text, hybrid) on held-out query views whose
    relevant item is their source chunk, and compression (selective vs filler baseline): ratio and R@5 kept.
    JSON on stdout and in --output, a PNG beside it."""
    from imoe_ray.config import store_config
    from imoe_ray.retrieval.evaluate import evaluate_retrieval, plot_retrieval
    from imoe_ray.store import Store

    cfg = store_config(store, config, overrides)
    result = evaluate_retrieval(Store(store), cfg, heldout, text_column, encoder, max_queries, compression_queries,
                                report=lambda m: console.print(m, highlight=False, markup=False))
    text = json.dumps(result, indent=2)
    write_text_atomic(output, text)
    plot_retrieval(result, output.with_suffix(".png"))
    console.print(f"wrote {output} and {output.with_suffix('.png')}")
    typer.echo(text)
