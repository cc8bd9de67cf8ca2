"""Starting or joining Ray: a local cluster on demand, the same code on a real cluster."""

from __future__ import annotations

import logging
import os

import ray

from imoe_ray.config import RayConfig


def init_ray(cfg: RayConfig, dashboard: bool = False) -> None:
    """Join the configured cluster, or the one Ray itself points at (RAY_ADDRESS is set by
    `ray job submit` and `ray start`), else start a local one sized by the config."""
    if ray.is_initialized():
        return
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # progress bars stay; per-dataset INFO lines go
    if cfg.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.address)
    else:
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=cfg.include_dashboard or dashboard)


def dashboard_url() -> str | None:
    """The Ray dashboard's URL, when this cluster runs one."""
    url = ray._private.worker.get_dashboard_url()
    return f"http://{url}" if url and not url.startswith("http") else (url or None)
