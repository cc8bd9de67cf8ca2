"""The build: stages run in order over one store; each is skipped when its manifest says it is
up to date, and resumed (not redone) when a previous run was cut off."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from imoe_ray.cluster import init_ray
from imoe_ray.config import Config
from imoe_ray.corpus import stage as ingest
from imoe_ray.discovery import stage as discover
from imoe_ray.embedding import stage as embed
from imoe_ray.experts import stage as experts
from imoe_ray.fusion import stage as fusion
from imoe_ray.routing import stage as router
from imoe_ray.sharding import stage as shard
from imoe_ray.store import StageManifest, Store

Report = Callable[[str], None]


@dataclass(frozen=True)
class Stage:
    name: str
    settings: tuple[str, ...]  # config fields whose change invalidates the stage
    run: Callable[..., dict]
    summary: str
    resumable: bool = False  # keeps partial work across a kill, recorded in a partial manifest
    starts_ray: bool = False  # joins Ray itself, once its input is known to be good (bad input fails in seconds)


HELD_OUT = ("router.calib_fraction", "router.test_fraction")  # the held-out rows no LM trains on
STAGES: tuple[Stage, ...] = (
    Stage("ingest", ("corpus", "embedding.encoder", "embedding.max_tokens"), ingest.run,
          "read and chunk the corpus", starts_ray=True),
    Stage("embed", ("embedding.encoder", "embedding.max_tokens"), embed.run, "embed every chunk (Ray Data actor pool)",
          resumable=True),
    Stage("discover", ("discovery", "corpus.chunk_tokens"), discover.run, "discover categories (HDBSCAN)"),
    Stage("router", ("embedding.encoder",) + router.TRAINING_FIELDS, router.run,
          "train the router (fast path + DACT early-exit classifier), calibrate on held-out chunks"),
    Stage("shard", ("sharding", "router"), shard.run, "route every chunk, write per-category Parquet shards and LanceDB tables"),
    Stage("base", ("experts.base_model", "pretrain") + HELD_OUT, experts.run_base,
          "the base LM: the configured one, or a tokenizer and a small Llama pre-trained on the corpus (Ray Train)",
          resumable=True),
    Stage("experts", ("experts", "pretrain.seq_len") + HELD_OUT, experts.run_experts,
          "one PEFT adapter per category, each a Ray Train job, in parallel; and the dense baseline", resumable=True),
    Stage("summarizer", ("fusion", "pretrain.seq_len") + HELD_OUT, fusion.run,
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
    store = Store(cfg.store)
    upstream = ingest.corpus_fingerprint(cfg)
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
    manifest = StageManifest(stage.name, config_hash, inputs)
    if not stage.starts_ray:
        init_ray(cfg.ray)  # only once a stage has work to do: an up-to-date store needs no cluster
    if stage.resumable:
        manifest.start(store)
    started = time.perf_counter()
    manifest.metrics = stage.run(store, cfg, resume, report)
    manifest.timings_s = {"total": round(time.perf_counter() - started, 3)}
    manifest.finish(store)
    report(f"[{stage.name}] done in {manifest.timings_s['total']:.1f}s")
    return manifest
