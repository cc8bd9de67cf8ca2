"""The build: stages run in order over one store; each is skipped when its manifest says it is
up to date, and resumed (not redone) when a previous run was cut off."""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from typing import Callable

from imoe_ray.config import ROUTER_TRAINING_FIELDS, Config
from imoe_ray.store import StageManifest, Store

Report = Callable[[str], None]


@dataclass(frozen=True)
class Stage:
    name: str
    settings: tuple[str, ...]  # config fields whose change invalidates the stage
    entry: str  # "module:function", imported when the stage runs: a skipped stage or bad input loads no torch
    summary: str
    resumable: bool = False  # keeps partial work across a kill, recorded in a partial manifest
    starts_ray: bool = False  # joins Ray itself, once its input is known to be good (bad input fails in seconds)

    def run(self, *args) -> dict:
        module, function = self.entry.split(":")
        return getattr(importlib.import_module(module), function)(*args)


HELD_OUT = ("router.calib_fraction", "router.test_fraction")  # the held-out rows no LM trains on
STAGES: tuple[Stage, ...] = (
    Stage("ingest", ("corpus", "embedding.encoder", "embedding.max_tokens"), "imoe_ray.corpus.stage:run",
          "read and chunk the corpus", starts_ray=True),
    Stage("embed", ("embedding.encoder", "embedding.max_tokens"), "imoe_ray.embedding.stage:run",
          "embed every chunk (Ray Data actor pool)", resumable=True),
    Stage("discover", ("discovery", "corpus.chunk_tokens"), "imoe_ray.discovery.stage:run",
          "discover categories (HDBSCAN)"),
    Stage("router", ("embedding.encoder",) + ROUTER_TRAINING_FIELDS, "imoe_ray.routing.stage:run",
          "train the router (fast path + DACT early-exit classifier), calibrate on held-out chunks"),
    Stage("shard", ("sharding", "router"), "imoe_ray.sharding.stage:run",
          "route every chunk, write per-category Parquet shards and LanceDB tables"),
    Stage("base", ("experts.base_model", "pretrain") + HELD_OUT, "imoe_ray.experts.stage:run_base",
          "the base LM: the configured one, or a tokenizer and a small Llama pre-trained on the corpus (Ray Train)",
          resumable=True),
    Stage("experts", ("experts", "pretrain.seq_len") + HELD_OUT, "imoe_ray.experts.stage:run_experts",
          "one PEFT adapter per category, each a Ray Train job, in parallel; and the dense baseline", resumable=True),
    Stage("summarizer", ("fusion", "pretrain.seq_len") + HELD_OUT, "imoe_ray.fusion.stage:run",
          "the summarizer: a LoRA adapter that grounds several experts' drafts in one answer (Ray Train)",
          resumable=True),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def build(cfg: Config, until: str = STAGE_NAMES[-1], force: bool = False, report: Report = print,
          force_stages: tuple[str, ...] = ()) -> dict[str, StageManifest]:
    """Run every stage up to and including `until` (re-running all of them with `force`, or the
    named `force_stages`); returns the manifests of the stages run or skipped."""
    if until not in STAGE_NAMES:
        raise ValueError(f"unknown stage {until!r}; choose one of {', '.join(STAGE_NAMES)}")
    from imoe_ray.corpus.stage import corpus_fingerprint

    upstream = corpus_fingerprint(cfg)
    store = Store(cfg.store, cache_dir=cfg.cache_dir)
    with store.lock(f"imoe build --until {until}"):
        return _build(store, cfg, upstream, until, force, report, force_stages)


def _build(store: Store, cfg: Config, upstream: str, until: str, force: bool, report: Report,
           force_stages: tuple[str, ...]) -> dict[str, StageManifest]:
    done: dict[str, StageManifest] = {}
    for stage in STAGES:
        manifest = _run_stage(stage, store, cfg, upstream, force or stage.name in force_stages, report)
        done[stage.name] = manifest
        upstream = manifest.fingerprint()
        if stage.name == STAGES[0].name:  # the corpus was readable: these are now the store's settings
            store.write_bytes(cfg.to_yaml().encode(), "config.yaml")
        if stage.name == until:
            break
    return done


def _run_stage(stage: Stage, store: Store, cfg: Config, upstream: str, force: bool, report: Report) -> StageManifest:
    config_hash = cfg.fields_hash(*stage.settings)
    inputs = {"upstream": upstream}
    previous = StageManifest.load(store, stage.name)
    if previous and previous.matches(config_hash, inputs) and not force:
        report(f"[{stage.name}] up to date, skipped ({stage.summary})")
        return previous
    partial = StageManifest.load(store, stage.name, partial=True) if stage.resumable else None
    resume = bool(partial and partial.matches(config_hash, inputs) and not force)
    report(f"[{stage.name}] {'resuming' if resume else 'running'}: {stage.summary}")
    rerun = force and previous is not None and previous.matches(config_hash, inputs)
    manifest = StageManifest(stage.name, config_hash, inputs, reruns=previous.reruns + 1 if rerun and previous is not None else 0)
    if previous:  # its output is about to be overwritten: a kill from here on must not leave it "up to date"
        store.remove(*StageManifest.location(stage.name))
    if not stage.starts_ray:
        from imoe_ray.cluster import init_ray

        init_ray(cfg.ray)  # only once a stage has work to do: an up-to-date store needs no cluster
    if stage.resumable:
        manifest.start(store)
    started = time.perf_counter()
    manifest.metrics = stage.run(store, cfg, resume, report)
    manifest.timings_s = {"total": round(time.perf_counter() - started, 3)}
    manifest.finish(store)
    report(f"[{stage.name}] done in {manifest.timings_s['total']:.1f}s")
    return manifest
