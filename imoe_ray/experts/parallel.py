"""Many independent TorchTrainers at once: Ray Tune schedules one trial per job, and each trial
runs its own `TorchTrainer.fit()` (the pattern of Ray's "Hyperparameter Tuning with Ray Tune"
guide for Train V2). Tune starts a job only when all its workers fit, shows every job's progress
in one table, and isolates failures: a job that fails after its FailureConfig retries is reported
while the others finish.

A job's run directory is `<storage>/<name>`; re-running a job with the same name continues from
its last checkpoint (Train V2 reloads the run's checkpoint snapshot), which is how a killed build
resumes. When a job finishes, `on_done(name, metrics, checkpoint_dir)` runs inside the trial, so
its result is stored before the next job starts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import ray

from imoe_ray.experts.train_loop import train_loop
from imoe_ray.store import Store

OnDone = Callable[[str, dict, str], dict]


@dataclass
class TrainJob:
    name: str                      # unique and stable: the run directory, for resumption
    loop_config: dict              # what train_loop reads (blocks as an ObjectRef)
    label: str = ""                # what the progress table shows (default: name)
    workers: int = 1
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)  # custom resources (config `ray.resources`)


class JobsFailed(RuntimeError):
    def __init__(self, failures: dict[str, str]):
        self.failures = failures
        super().__init__("training failed for " + ", ".join(f"{k} ({v})" for k, v in failures.items()))


@dataclass(frozen=True)
class Storage:
    """Where the runs' checkpoints go: a folder of the store, on its own filesystem (an object store's
    too), so a worker on any node writes them and a restarted one reads them back."""
    store: Store
    parts: tuple[str, ...]

    def run_config_args(self) -> dict:
        if self.store.is_local:
            return {"storage_path": self.store.path(*self.parts)}
        return {"storage_path": self.store.path(*self.parts), "storage_filesystem": self.store.fs}


def _trainer(job: TrainJob, storage: Storage, max_failures: int, callbacks: list):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": job.cpus_per_worker} | ({"GPU": job.gpus_per_worker} if job.gpus_per_worker else {})
    return TorchTrainer(
        train_loop,
        train_loop_config=job.loop_config,
        scaling_config=ScalingConfig(num_workers=job.workers, use_gpu=job.gpus_per_worker > 0,
                                     resources_per_worker=resources | job.resources),
        run_config=RunConfig(name=job.name, callbacks=callbacks, **storage.run_config_args(),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )


def run_one(job: TrainJob, storage: Storage, max_failures: int, on_done: OnDone) -> dict:
    """A single job, without Tune (the base model's pre-training)."""
    result = _trainer(job, storage, max_failures, []).fit()
    with result.checkpoint.as_directory() as d:
        return on_done(job.name, dict(result.metrics), d)


def run_parallel(jobs: list[TrainJob], storage: Storage, max_concurrent: int | None, max_failures: int,
                 on_done: OnDone, verbose: int = 1) -> dict[str, dict]:
    """Run the jobs as concurrent Tune trials; returns {name: on_done's result}; raises JobsFailed
    (after every other job finished) when some could not be trained."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    by_label = {j.label or j.name: j for j in jobs}

    def trial(config: dict) -> dict:
        job = by_label[config["job"]]
        started = time.perf_counter()
        result = _trainer(job, storage, max_failures, [TuneReportCallback()]).fit()
        with result.checkpoint.as_directory() as d:
            out = on_done(job.name, dict(result.metrics) | {"wall_s": round(time.perf_counter() - started, 2)}, d)
        return {"done": True, **{k: v for k, v in out.items() if isinstance(v, (int, float, str))}}

    tuner = tune.Tuner(
        # A trial only drives its trainer, whose workers hold the CPUs/GPUs; Tune needs a non-empty
        # bundle, so the driver asks for one byte of memory instead of a CPU it would not use.
        tune.with_resources(trial, {"memory": 1}),
        param_space={"job": tune.grid_search(list(by_label))},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent or len(jobs)),
        run_config=tune.RunConfig(name=f"tune-{int(time.time())}", verbose=verbose, **storage.run_config_args(),
                                  # a trial whose driver died with its node starts again and its trainer
                                  # continues from the run's last checkpoint in the store
                                  failure_config=tune.FailureConfig(max_failures=max_failures)),
    )
    grid = tuner.fit()
    results, failures = {}, {}
    for r in grid:
        name = by_label[r.config["job"]].name
        if r.error is not None:
            failures[name] = str(r.error).strip().splitlines()[-1][:300] if str(r.error).strip() else type(r.error).__name__
        else:
            results[name] = r.metrics
    if failures:
        raise JobsFailed(failures)
    return results


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 1))


def node_cpus(resources: dict[str, float] | None = None) -> float:
    """The CPUs of the biggest alive node that offers `resources` (one worker never spans nodes)."""
    wanted = resources or {}
    sizes = [n["Resources"].get("CPU", 0.0) for n in ray.nodes()
             if n.get("Alive") and all(n["Resources"].get(k, 0.0) >= v for k, v in wanted.items())]
    return float(max(sizes, default=cluster_cpus()))


def worker_cpus(requested: int | None, workers: int, resources: dict[str, float] | None = None) -> int:
    """CPUs per Train worker: as asked, else the cluster's CPUs over the workers, at most one node's."""
    return requested or max(1, min(int(cluster_cpus()) // workers, int(node_cpus(resources))))
