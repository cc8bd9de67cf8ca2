"""Starting or joining Ray: a local cluster on demand, the same code on a real cluster."""

from __future__ import annotations

import logging
import os

import ray

from imoe_ray.config import RayConfig


# What an object store needs on every node: the standard AWS variables, when the driver has them.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE")


# Set by `ray job submit` in its driver: the submission's runtime env, which Ray merges with ours and
# refuses when both name the same variable.
SUBMITTED_JOB_CONFIG = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def worker_env() -> dict[str, str]:
    """The driver's object-store settings, handed to the job's workers (a cluster's nodes may have
    none of their own, e.g. a local S3 server or a laptop's credentials). A submitted job's workers
    get the submission's runtime env instead (`ray job submit --runtime-env-json`)."""
    if SUBMITTED_JOB_CONFIG in os.environ:
        return {}
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def init_ray(cfg: RayConfig, dashboard: bool = False) -> None:
    """Join the configured cluster, or the one Ray itself points at (RAY_ADDRESS is set by
    `ray job submit` and `ray start`), else start a local one sized by the config. The job's workers
    get the driver's AWS_* variables, so a store on an object store opens the same everywhere."""
    if ray.is_initialized():
        return
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # progress bars stay; per-dataset INFO lines go
    env = worker_env()
    runtime_env = {"env_vars": env} if env else None
    if cfg.address or os.environ.get("RAY_ADDRESS"):
        context = ray.init(address=cfg.address, runtime_env=runtime_env)
    else:
        context = ray.init(num_cpus=cfg.num_cpus, include_dashboard=cfg.include_dashboard or dashboard,
                           runtime_env=runtime_env)
    _context["dashboard_url"] = context.dashboard_url


_context: dict[str, str | None] = {}


def dashboard_url() -> str | None:
    """The Ray dashboard's URL, when the cluster `init_ray` joined runs one."""
    url = _context.get("dashboard_url")
    return f"http://{url}" if url and not url.startswith("http") else (url or None)
