"""`imoe`: one command line for every stage of IMoE-Ray.

Every command reads the one configuration: the settings a store was built with (DIR/config.yaml),
then `--config FILE`, then `--set section.field=value`, then the command's own options.
"""

from __future__ import annotations

import enum
import json
import sys
from pathlib import Path
from typing import Any, Optional

import click
import typer
import yaml
from rich.console import Console
from rich.table import Table

from imoe_ray.config import Config, ConfigError, store_config

console = Console(stderr=True)
app = typer.Typer(
    help="IMoE-Ray: turn a raw text corpus into a served mixture of experts, on Ray.\n\n"
         "Start with `imoe sample-corpus corpus.jsonl`, then "
         "`imoe build --corpus corpus.jsonl --store store`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
eval_app = typer.Typer(help="Measure a built store against held-out data.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")
from imoe_ray.retrieval import cli as _retrieval_cli  # noqa: E402 - the knowledge bases' commands

app.add_typer(_retrieval_cli.kb_app, name="kb")
eval_app.command("retrieval")(_retrieval_cli.eval_retrieval)
from imoe_ray.encoders import cli as _encoders_cli  # noqa: E402 - the MoE encoder's commands

app.command("train-encoder")(_encoders_cli.train_encoder)
eval_app.command("encoder")(_encoders_cli.eval_encoder)

from imoe_ray.packaging import cli as _packaging_cli  # noqa: E402 - .expert packages and the registry

app.add_typer(_packaging_cli.keys_app, name="keys")
from imoe_ray.serving import cli as _serving_cli  # noqa: E402 - API keys of the served API

app.add_typer(_serving_cli.keys_app, name="api-keys")
app.add_typer(_packaging_cli.experts_app, name="experts")

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML configuration file.")
SetOpt = typer.Option(None, "--set", help="Override one setting, e.g. --set discovery.threshold=0.3 (repeatable).")
StoreOpt = typer.Option("store", "--store", "-s", help="Store directory or URI: where every stage writes.")


def resolve_config(store: str, config: Optional[Path], overrides: Optional[list[str]], **fields: Any) -> Config:
    """The configuration a command runs with (see the module docstring for precedence)."""
    return store_config(store, config, overrides, **fields)


def _categories_table(store_uri: str) -> Table:
    from imoe_ray.discovery.stage import ASSIGNMENTS, load_model
    from imoe_ray.store import Store

    store = Store(store_uri)
    model = load_model(store)
    top = store.read_table(*ASSIGNMENTS, columns=["top_category"]).column("top_category").to_numpy()
    table = Table(title=f"{len(model.categories)} categories discovered (t_C = {model.threshold:.2f})")
    for col, kw in (("id", {"justify": "right"}), ("name", {}), ("chunks", {"justify": "right"}),
                    ("share", {"justify": "right"}), ("top keywords", {})):
        table.add_column(col, **kw)  # type: ignore[arg-type]  # kw is {} or {"justify": "right"}
    for c in model.categories:
        n = int((top == c.id).sum())
        table.add_row(str(c.id), c.name, str(n), f"{n / max(1, len(top)):.1%}", ", ".join(c.keywords[:6]))
    none = int((top < 0).sum())
    table.add_row("-1", "(none: goes to every expert)", str(none), f"{none / max(1, len(top)):.1%}", "", style="dim")
    return table


from imoe_ray.build import STAGE_NAMES  # noqa: E402 - light: the stage list, no stage imported

_Stage = enum.Enum("Stage", {name: name for name in STAGE_NAMES}, type=str)  # type: ignore[misc]  # members: STAGE_NAMES


@app.command()
def build(
    corpus: Optional[str] = typer.Option(None, "--corpus", help="HF dataset id/path, .txt/.jsonl/.parquet file or directory."),
    store: str = StoreOpt,
    text_column: Optional[str] = typer.Option(None, "--text-column", help="Column holding the text (default: text)."),
    id_column: Optional[str] = typer.Option(None, "--id-column", help="Column holding stable ids (default: id); generated if absent."),
    until: _Stage = typer.Option("summarizer", "--until", case_sensitive=False, help="Last stage to run."),
    force: bool = typer.Option(False, "--force", help="Re-run stages even when up to date."),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Run the pipeline: read → chunk → embed → discover categories → train the router → shard per category
    → base LM → one expert adapter per category (and the dense baseline) → the summarizer (fusion.summarizer)."""
    from imoe_ray.build import build as run_build

    until_name = str(getattr(until, "value", until))  # other commands call this function with a stage name
    cfg = resolve_config(store, config, overrides, corpus__path=corpus, corpus__text_column=text_column,
                         corpus__id_column=id_column)
    manifests = run_build(cfg, until=until_name, force=force, report=lambda m: console.print(m, highlight=False, markup=False))
    if "discover" in manifests:
        console.print(_categories_table(cfg.store))
    console.print(f"[green]build finished[/] up to '{until_name}' in store {cfg.store}")


@app.command()
def discover(
    store: str = StoreOpt,
    corpus: Optional[str] = typer.Option(None, "--corpus", help="Corpus, if the store has not read one yet."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw a 2-D map of the chunks coloured by "
                                        "category, with the categories' names, into this PNG."),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Discover the corpus's categories (runs what discovery needs first) and show them as a table."""
    build(corpus=corpus, store=store, text_column=None, id_column=None, until=_Stage("discover"), force=False,
          config=config, overrides=overrides)
    if plot is not None:
        from imoe_ray.discovery.plot import plot_categories
        from imoe_ray.store import Store

        cfg = resolve_config(store, config, overrides)
        drawn = plot_categories(Store(cfg.store, cache_dir=cfg.cache_dir), cfg, plot)
        console.print(f"wrote {plot}: {drawn['points']} chunks, {drawn['categories']} categories")


@app.command("train-router")
def train_router(
    store: str = StoreOpt,
    force: bool = typer.Option(False, "--force", help="Retrain even when the router is up to date."),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Train the router (fast path + DACT early-exit classifier) on a store's discovered categories."""
    from imoe_ray.build import build as run_build
    from imoe_ray.store import Store

    if not (Path(store) / "config.yaml").is_file() and "://" not in store:
        raise ConfigError(f"{store} is not a built store (no config.yaml): run `imoe build --corpus ... --store {store}` first")
    cfg = resolve_config(store, config, overrides)
    run_build(cfg, until="router", force=False, force_stages=("router",) if force else (),
              report=lambda m: console.print(m, highlight=False, markup=False))
    console.print(_router_table(Store(cfg.store, cache_dir=cfg.cache_dir)))


def _router_table(store) -> Table:
    from imoe_ray.routing.stage import MODEL

    meta = store.read_json(*MODEL)
    s, metrics = meta["settings"], meta["metrics"]
    threshold = s["fast_threshold"]
    table = Table(title=f"router: {len(meta['names'])} categories, DACT lambda={s['ponder_lambda']:g}, "
                        f"fast path answers at p >= {threshold:.3f}" if threshold is not None else "fast path off")
    for col in ("held-out set", "rows", "cascade acc", "DACT acc", "DACT layers", "full encoder acc", "fast-path share"):
        table.add_column(col, justify="right" if col != "held-out set" else "left")
    for name, m in metrics.items():
        if name.startswith("test_"):
            table.add_row(name[5:], str(m["rows"]), f"{m['cascade_accuracy']:.3f}", f"{m['dact_accuracy']:.3f}",
                          f"{m['dact_mean_layers']:.2f} / {s['n_layers']}", f"{m['full_encoder_accuracy']:.3f}",
                          f"{m['fast_path_share']:.0%}")
    return table


@app.command()
def route(
    text: Optional[str] = typer.Argument(None, help="The request to route (or use --input)."),
    store: str = StoreOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the decision as JSON (default for a single text)."),
    input: Optional[Path] = typer.Option(None, "--input", help="JSONL of requests, each with a text field (and an id)."),
    output: Optional[Path] = typer.Option(None, "--output", help="Where --input's decisions go (JSONL); stdout if absent."),
    text_field: str = typer.Option("text", "--text-field", help="Field of --input rows holding the request."),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Route requests to experts: categories (most probable first), probabilities, experts, exit layer, latency."""
    from imoe_ray.store import Store

    if (text is None) == (input is None):
        raise ConfigError("give either a TEXT to route or --input FILE.jsonl, not both and not neither")
    cfg = resolve_config(store, config, overrides)
    rows = _read_requests(input, text_field) if input is not None else []  # a bad file fails before the router loads
    from imoe_ray.routing.stage import load_router

    router = load_router(Store(cfg.store, cache_dir=cfg.cache_dir), cfg)
    if text is not None:
        router.route(text)  # the first call pays for lazy set-up; report a warm latency
        typer.echo(json.dumps(router.route(text).to_json(), indent=2 if not as_json else None))
        return
    out = open(output, "w") if output else sys.stdout
    try:
        for row in rows:
            decision = router.route(row[text_field]).to_json()
            out.write(json.dumps({"id": row.get("id")} | decision) + "\n")
    finally:
        if output:
            out.close()
    if output:
        console.print(f"routed {len(rows)} requests → {output}")


def _read_requests(path: Path, text_field: str) -> list[dict]:
    """Every row first, so a bad line stops the run before any output is written."""
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    from imoe_ray.corpus.readers import read_jsonl_rows

    rows = read_jsonl_rows(path)
    for n, row in enumerate(rows, 1):
        if not isinstance(row.get(text_field), str):
            raise ConfigError(f"{path}: request {n} has no text field {text_field!r}")
    return rows


@app.command("sample-corpus")
def sample_corpus(
    out: Path = typer.Argument(..., help="Output file (.jsonl or .parquet)."),
    per_domain: int = typer.Option(150, "--per-domain", min=1, help="Passages per domain."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Build an offline multi-domain corpus of real documentation text found on this machine."""
    from imoe_ray.corpus.sample import build_sample_corpus

    summary = build_sample_corpus(out, per_domain=per_domain, seed=seed)
    table = Table(title=f"sample corpus: {summary['rows']} passages in {summary['seconds']:.1f}s → {summary['path']}")
    table.add_column("domain (evaluation only)")
    table.add_column("passages", justify="right")
    for domain, n in summary["domains"].items():
        table.add_row(domain, str(n))
    console.print(table)


# The quickstart's smaller run (so that build + serve finish in under 10 minutes on 2 CPU cores);
# `imoe build` with the defaults trains longer and gives the README's perplexity figures.
QUICKSTART_SETTINGS = ["discovery.max_categories=6", "pretrain.epochs=2", "experts.dense_baseline=false"]
QUICKSTART_QUESTIONS = [
    "How do I plot a histogram with matplotlib and label the axes?",
    "How do I select the rows of a pandas DataFrame where a column is above a value?",
    "How does a LoRA adapter change the weights of a language model?",
    "How do I parametrize a pytest fixture?",
    "What does the backlog argument of socket listen mean?",
    "How do I wait for the futures of a thread pool executor?",
]


@app.command()
def quickstart(
    store: str = typer.Option("store", "--store", "-s", help="Store directory to build into."),
    per_domain: int = typer.Option(40, "--per-domain", min=1, help="Sample-corpus passages per domain."),
    port: int = typer.Option(8000, "--port", "-p", help="HTTP port of the API."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Keep serving until Ctrl-C (default) or stop after the table."),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Everything on the embedded defaults, end to end: make the sample corpus, build the store
    (categories, router, base LM, experts), start Ray Serve, ask a few questions from different
    domains, print question → categories → experts → latency → answer, and keep serving."""
    import time as _time

    from imoe_ray.cluster import init_ray
    from imoe_ray.evaluation.discovery import evaluate_discovery
    from imoe_ray.store import Store

    started = _time.perf_counter()
    settings = QUICKSTART_SETTINGS + list(overrides or [])
    init_ray(resolve_config(store, config, settings).ray, dashboard=True)
    corpus = Path(store) / "sample-corpus.jsonl"
    if not corpus.exists():
        Path(store).mkdir(parents=True, exist_ok=True)
        sample_corpus(out=corpus, per_domain=per_domain, seed=0)
    build(corpus=str(corpus), store=store, text_column="text", id_column="id", until=_Stage("experts"), force=False,
          config=config, overrides=settings)
    cfg = resolve_config(store, config, settings)
    scores = evaluate_discovery(Store(store), cfg, str(corpus), "domain")
    console.print(f"discovery against the sample corpus's domains: NMI {scores['nmi']}, ARI {scores['ari']}, "
                  f"{scores['n_categories']} categories for {scores['n_labels']} domains, "
                  f"{scores['noise_fraction']:.1%} in no category")
    url = _start_serving(cfg, store, config, settings, port, None)
    console.print(_ask(url, QUICKSTART_QUESTIONS), crop=False)
    if cfg.experts.base_model is None:
        console.print("[yellow]The answers come from the embedded base LM, a tiny model pre-trained on this corpus in a "
                      "minute: read the routing and the citations, not the prose.[/] For real answers, build on a real "
                      "base model: --set experts.base_model=Qwen/Qwen2.5-0.5B (any Hugging Face causal LM id or directory).")
    console.print(f"quickstart took {_time.perf_counter() - started:.0f}s; try: curl {url}/chat/completions "
                  f"-H 'Content-Type: application/json' -d '{{\"model\": \"imoe\", \"messages\": "
                  f"[{{\"role\": \"user\", \"content\": \"How do I read a CSV file?\"}}]}}'")
    if wait:
        _serve_until_signal(url)
    else:
        from ray import serve as ray_serve

        ray_serve.shutdown()


def _ask(url: str, questions: list[str]) -> Table:
    """Send each question to the routed model (`optimized`: retrieval and citations) with the official
    openai client; one table row each: the router's categories with their probabilities, the experts
    with their weights, the best cited passage and the answer."""
    import time as _time

    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="unused", max_retries=1)
    table = Table(title=f"sample questions → {url}", show_lines=True,
                  width=None if console.is_terminal else 170)  # a log file gets the whole table
    for column, ratio in (("question", 3), ("categories (p)", 2), ("experts (weight)", 2), ("best cited passage", 4),
                          ("latency", 1), ("answer", 3)):
        table.add_column(column, overflow="fold", ratio=ratio)
    for question in questions:
        started = _time.perf_counter()
        reply = client.chat.completions.create(model="imoe", max_tokens=40, temperature=0.8, top_p=0.9, seed=0,
                                               messages=[{"role": "user", "content": question}],
                                               extra_body={"imoe": {"mode": "optimized"}})
        ms = (_time.perf_counter() - started) * 1000
        imoe = reply.model_extra["imoe"]
        categories = ", ".join(f"{c} {p:.2f}" for c, p in zip(imoe["categories"], imoe["probabilities"])) or "-"
        if imoe.get("fallback"):
            categories += f" [dim](fallback: {imoe['fallback']})[/]"
        experts = ", ".join(f"{e} {w:.2f}" for e, w in imoe["weights"].items())
        cited = imoe.get("citations") or []
        passage = f"[dim]{cited[0]['table']}:[/] {_shorten(cited[0].get('text', ''), 160)}" if cited else "-"
        table.add_row(question, categories, experts, passage, f"{ms:.0f} ms",
                      (reply.choices[0].message.content or "").strip())
    return table


def _shorten(text: str, limit: int) -> str:
    from rich.markup import escape

    text = " ".join(text.split())
    return escape(text if len(text) <= limit else text[: limit - 1].rsplit(" ", 1)[0] + "…")


@app.command()
def serve(
    store: str = StoreOpt,
    port: Optional[int] = typer.Option(None, "--port", "-p", help="HTTP port (default: serve.port, 8000)."),
    host: Optional[str] = typer.Option(None, "--host", help="HTTP host (default: serve.host, 127.0.0.1)."),
    write_config: Optional[Path] = typer.Option(None, "--write-config", help="Write the `serve deploy` YAML for "
                                                "this store (as `serve build` makes it) and exit."),
    insecure: bool = typer.Option(False, "--insecure", help="Serve on an address other than the loopback with "
                                  "no API keys (everyone who reaches the port may call the API)."),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Serve a built store on this machine: the OpenAI-compatible API at http://HOST:PORT/v1 (ready
    when GET /healthz answers 200), until Ctrl-C or SIGTERM. Once `imoe api-keys create` made a key,
    every endpoint but /healthz needs `Authorization: Bearer KEY`."""
    cfg = resolve_config(store, config, overrides)
    _check_exposure(store, host or cfg.serve.host, insecure)
    if write_config:
        from serve_apps.imoe import deploy_config

        text = yaml.safe_dump(deploy_config(store, str(config) if config else None, overrides), sort_keys=False)
        write_config.write_text(f"# `serve deploy {write_config}` on a running cluster (made by imoe serve --write-config)\n{text}")
        console.print(f"wrote {write_config}")
        return
    url = _start_serving(cfg, store, config, overrides, port, host)
    _serve_until_signal(url)


def _check_exposure(store: str, host: str, insecure: bool) -> None:
    """No keys: serve on the loopback only (and say that the API is open), unless --insecure."""
    import ipaddress

    from imoe_ray.serving.auth import load_keys
    from imoe_ray.store import Store

    if load_keys(Store(store, create=False)).keys:
        return
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not insecure:
        raise click.UsageError(f"refusing to serve on {host} with no API keys: create one with "
                               f"`imoe api-keys create NAME --store {store}`, or pass --insecure")
    console.print("[yellow]no API keys in this store: the API is open to every caller that reaches "
                  f"{host}[/] (imoe api-keys create NAME --store {store} turns authentication on)")


def _start_serving(cfg: Config, store: str, config: Optional[Path], overrides: Optional[list[str]],
                   port: Optional[int], host: Optional[str]) -> str:
    import signal

    from ray import serve as ray_serve

    from imoe_ray.cluster import dashboard_url, init_ray
    from serve_apps.imoe import start

    def interrupt(*_) -> None:
        raise KeyboardInterrupt

    init_ray(cfg.ray, dashboard=True)  # before the handlers: ray.init installs its own for SIGTERM
    for sig in (signal.SIGINT, signal.SIGTERM):  # stopped while starting: what was deployed is removed
        signal.signal(sig, interrupt)
    try:
        with console.status("starting Ray Serve (router ingress + expert replicas)…"):
            url = start(store, str(config) if config else None, overrides, port=port, host=host)
    except KeyboardInterrupt:
        console.print("stopped before the server was ready")
        ray_serve.shutdown()
        raise typer.Exit(0) from None
    console.print(f"[bold green]serving[/] {url}  (OpenAI-compatible; model 'imoe' is routed)")
    console.print(f"Ray dashboard: {dashboard_url() or 'not running'}  (metrics: imoe_requests, imoe_adapter_loads, "
                  f"imoe_routing_latency_ms, imoe_queue_depth)")
    return url


def _serve_until_signal(url: str) -> None:
    import signal
    import threading

    from ray import serve as ray_serve

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    console.print("Ctrl-C stops the server.")
    stop.wait()
    console.print("stopping…")
    ray_serve.shutdown()
    console.print(f"stopped {url}")


@app.command()
def status(store: str = StoreOpt) -> None:
    """Show which stages of a store are complete, with their timings and metrics."""
    from imoe_ray.build import STAGE_NAMES
    from imoe_ray.store import StageManifest, Store

    from imoe_ray.store import StoreError

    s = Store(store, create=False)
    if not s.exists():
        raise StoreError(f"no store at {s.uri}: build one with `imoe build --corpus ... --store {store}`")
    table = Table(title=f"store {s.uri}")
    for col in ("stage", "state", "seconds", "finished", "metrics"):
        table.add_column(col)
    for name in STAGE_NAMES:
        m, partial = StageManifest.load(s, name), StageManifest.load(s, name, partial=True)
        if m is None and partial is None:
            table.add_row(name, "not run", "", "", "")
            continue
        state = "[yellow]running or interrupted[/]" if partial else "complete"
        metrics = {k: v for k, v in (m.metrics if m else {}).items() if not isinstance(v, (dict, list))}
        table.add_row(name, state, str(m.timings_s.get("total", "")) if m else "", (m.finished_at or "") if m else "",
                      json.dumps(metrics))
    console.print(table)


@app.command("config")
def show_config(
    store: str = StoreOpt,
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Print the resolved configuration as YAML, each field with its description (a starting point for --config)."""
    typer.echo(resolve_config(store, config, overrides).to_yaml(comments=True))


@eval_app.command("discovery")
def eval_discovery(
    store: str = StoreOpt,
    labels: str = typer.Option(..., "--labels", help="Corpus file with a label column (kept only for evaluation)."),
    label_column: str = typer.Option("domain", "--label-column"),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Compare discovered categories with known labels: prints JSON with nmi, ari, n_categories, noise_fraction."""
    from imoe_ray.evaluation.discovery import evaluate_discovery
    from imoe_ray.store import Store

    cfg = resolve_config(store, config, overrides)
    typer.echo(json.dumps(evaluate_discovery(Store(store), cfg, labels, label_column), indent=2))


@eval_app.command("lm")
def eval_lm(
    store: str = StoreOpt,
    heldout: Optional[str] = typer.Option(None, "--heldout", help="Held-out corpus file or directory; default: the "
                                          "store's own held-out split (the router's test rows, which no model trained on)."),
    text_column: Optional[str] = typer.Option(None, "--text-column", help="Text column of --heldout (default: the corpus's)."),
    category_column: Optional[str] = typer.Option(None, "--category-column",
                                                  help="Group --heldout by this column; default: by the router's category."),
    route_tokens: int = typer.Option(32, "--route-tokens", min=1, help="LM tokens the router sees; perplexity is on the rest."),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=1, help="Experts in the mixture (default: experts.top_k)."),
    max_texts: Optional[int] = typer.Option(None, "--max-texts", min=1, help="Evaluate only the first N texts."),
    output: Path = typer.Option(Path("eval-lm.json"), "--output", "-o", help="Where the JSON goes; the plot goes beside it (.png)."),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    quiet: bool = typer.Option(False, "--quiet", help="Print the table only, not the JSON."),
) -> None:
    """Held-out perplexity of the base model, the dense baseline, the routed top-1 expert and the top-k
    mixture, overall and per category: JSON on stdout and in --output, and a PNG bar chart beside it."""
    from imoe_ray.evaluation.lm import evaluate_lm, plot_lm
    from imoe_ray.store import Store

    cfg = resolve_config(store, config, overrides)
    result = evaluate_lm(Store(store, cache_dir=cfg.cache_dir), cfg, heldout, text_column, category_column, route_tokens, top_k, max_texts,
                         report=lambda m: console.print(m, highlight=False, markup=False))
    _publish_eval(result, output, plot_lm, _lm_table, quiet)


@eval_app.command("route")
def eval_route(
    store: str = StoreOpt,
    heldout: Optional[str] = typer.Option(None, "--heldout", help="Held-out corpus file; default: the store's own "
                                          "held-out split (the router's test rows, which it never trained on)."),
    text_column: Optional[str] = typer.Option(None, "--text-column", help="Text column of --heldout (default: the corpus's)."),
    category_column: Optional[str] = typer.Option(None, "--category-column",
                                                  help="Column of --heldout holding each text's category name."),
    max_texts: Optional[int] = typer.Option(None, "--max-texts", min=1, help="Evaluate only the first N texts."),
    split: str = typer.Option("test", "--split", help="The store's split without --heldout: 'test' (the result) or "
                              "'calib' (the validation split request-time settings such as t_C are tuned on)."),
    output: Path = typer.Option(Path("eval-route.json"), "--output", "-o", help="Where the JSON goes; the plot goes beside it (.png)."),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    quiet: bool = typer.Option(False, "--quiet", help="Print the table only, not the JSON."),
) -> None:
    """Routing accuracy by query length, the confusion matrix and the calibration of the router's
    probabilities: JSON on stdout and in --output (`accuracy` per length), a PNG beside it."""
    from imoe_ray.evaluation.routing import evaluate_routing, plot_routing
    from imoe_ray.store import Store

    cfg = resolve_config(store, config, overrides)
    result = evaluate_routing(Store(store, cache_dir=cfg.cache_dir), cfg, heldout, text_column, category_column,
                              max_texts=max_texts, report=lambda m: console.print(m, highlight=False, markup=False),
                              split=split)
    _publish_eval(result, output, plot_routing, _route_table, quiet)


def _route_table(result: dict) -> Table:
    table = Table(title=f"routing on {result['texts']} held-out texts (t_C {result['threshold_policy']}; "
                        f"calibration ECE {result['calibration']['ece']:.3f})")
    for col in ("query length (tokens)", "accuracy", "experts / request", "category's expert served",
                "mean exit layer", "p50 latency ms"):
        table.add_column(col, justify="right")
    for length, row in result["by_length"].items():
        table.add_row(length, f"{row['accuracy']:.3f}", f"{row['mean_experts']:.2f}", f"{row['gold_served']:.3f}",
                      f"{row['mean_exit_layer']:.2f}", f"{row['p50_latency_ms']:.2f}")
    return table


def _publish_eval(result: dict, output: Path, plot, table, quiet: bool) -> None:
    """An evaluation's JSON written to `output` (atomically), its PNG beside it, its table on the
    console, and the JSON on stdout unless `quiet`."""
    from imoe_ray.store import write_text_atomic

    text = json.dumps(result, indent=2)
    write_text_atomic(output, text)
    plot(result, output.with_suffix(".png"))
    console.print(table(result))
    console.print(f"wrote {output} and {output.with_suffix('.png')}")
    if not quiet:
        typer.echo(text)


def _lm_table(result: dict) -> Table:
    from imoe_ray.evaluation.lm import LABELS

    models = list(result["perplexity"])
    table = Table(title=f"held-out perplexity ({result['texts']} texts, {result['tokens_scored']:,} tokens; "
                        f"routed on the first {result['route_tokens']} tokens)")
    table.add_column("category")
    table.add_column("texts", justify="right")
    for m in models:
        table.add_column(LABELS[m], justify="right")
    for name, row in result["per_category"].items():
        table.add_row(name, str(row["texts"]), *[f"{row[m]:.2f}" for m in models])
    table.add_row("overall", str(result["texts"]), *[f"{result['perplexity'][m]:.2f}" for m in models], style="bold")
    if "ratio_to_dense" in result:
        table.add_row("÷ dense", "", *[f"{result['ratio_to_dense'].get(m, 1.0):.3f}" for m in models], style="bold")
    return table


@eval_app.command("summarizer")
def eval_summarizer(
    store: str = StoreOpt,
    cases: Optional[int] = typer.Option(None, "--cases", min=1, help="Held-out fusion cases (default: fusion.eval_cases)."),
    max_new_tokens: int = typer.Option(40, "--max-new-tokens", min=1, help="Longest generated answer, in LM tokens."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Where the JSON goes (default: "
                                          "STORE/fusion/eval-summarizer.json); the plot goes beside it (.png)."),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    quiet: bool = typer.Option(False, "--quiet", help="Print the table only, not the JSON."),
) -> None:
    """Does the summarizer ground a task draft and a constraint draft in one answer that obeys both? On held-out
    synthetic cases: required terms present, length bound kept, faithfulness to the task, for the summarizer, the
    base model on the same prompt, each draft alone, the best single draft and the concatenated drafts."""
    from imoe_ray.evaluation.summarizer import evaluate_summarizer, plot_summarizer
    from imoe_ray.store import Store

    cfg = resolve_config(store, config, overrides)
    s = Store(cfg.store, cache_dir=cfg.cache_dir)
    result = evaluate_summarizer(s, cfg, cases, max_new_tokens, report=lambda m: console.print(m, highlight=False, markup=False))
    if output is None:
        output = s.local_path("fusion", "eval-summarizer.json") if s.is_local else Path("eval-summarizer.json")
    _publish_eval(result, output, plot_summarizer, _summarizer_table, quiet)


def _summarizer_table(result: dict) -> Table:
    from imoe_ray.evaluation.summarizer import LABELS, METRICS

    table = Table(title=f"summarizer on {result['cases']} held-out fusion cases ({result['with_terms']} with required "
                        f"terms, {result['with_length_bound']} with a length bound)")
    table.add_column("answer")
    for m in METRICS + ("reference_nll",):
        table.add_column(m.replace("_", " "), justify="right")
    for name, row in result["systems"].items():
        table.add_row(LABELS[name], *["-" if row.get(m) is None else f"{row[m]:.3f}" for m in METRICS + ("reference_nll",)],
                      style="bold" if name == "constrained" else None)
    return table


_USER_ERRORS = (("imoe_ray.corpus.readers", "CorpusError"), ("imoe_ray.embedding.encoder", "EncoderError"),
                ("imoe_ray.store.store", "StoreError"), ("imoe_ray.retrieval.knowledge_base", "KnowledgeBaseError"))


def _user_errors() -> tuple[type[BaseException], ...]:
    """The user-error classes of the modules this run loaded: a module never imported raised nothing,
    and importing it now (torch, LanceDB) would only delay the message by seconds."""
    loaded = [getattr(sys.modules[module], name) for module, name in _USER_ERRORS if module in sys.modules]
    return (ConfigError, FileNotFoundError, *loaded)


def _click_error(e: BaseException):
    """A click usage or parameter error, from click itself or from the copy typer vendors (typer >= 0.24
    raises its own `ClickException`, not click's): recognised by its interface, not its class."""
    return e if callable(getattr(e, "format_message", None)) and isinstance(getattr(e, "exit_code", None), int) \
        and any(c.__name__ == "ClickException" for c in type(e).__mro__) else None


def main() -> None:
    """Entry point: user errors become one clear message and exit status 2 (a usage error, as click
    says it: `imoe build --bogus`), never a traceback."""
    if sys.argv[1:] in (["--version"], ["-V"]):
        from importlib.metadata import version

        print(f"imoe {version('imoe-ray')}")
        sys.exit(0)
    try:
        app(standalone_mode=False)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        console.print("[red]aborted[/]")
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs below
        usage = _click_error(e)
        if usage is not None:
            ctx = getattr(usage, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            from rich.markup import escape

            console.print(f"[red]error:[/] {escape(usage.format_message() + hint)}", highlight=False, soft_wrap=True)
            sys.exit(usage.exit_code)
        if isinstance(e, _user_errors()):
            console.print(f"[red]error:[/] {e}", highlight=False)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
