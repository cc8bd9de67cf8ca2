"""Hot add / drain for a running server: notice that the store's expert list changed (an install or
a removal rewrote `experts/index.json` and `router/experts.json`) and update routing and the model
list in place, without a restart or retraining."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from imoe_ray.routing.router import ExpertProfile, Router
from imoe_ray.serving.model import installed_experts

WATCHED = (("experts", "index.json"), ("router", "experts.json"))


def sync_router(router: Router, store: str | Path) -> None:
    """Make the router's later-joined profiles equal `router/experts.json`: new ones join by centroid
    and keywords (`Router.add_expert`), removed ones stop being routed to."""
    root = Path(store)
    extras_path = root / "router" / "experts.json"
    extras = json.loads(extras_path.read_text()) if extras_path.is_file() else []
    keep = {p["name"] for p in extras}
    router.profiles = [p for p in router.profiles if p.category is not None or p.name in keep]
    for p in extras:
        router.add_expert(ExpertProfile(**p))
    index_path = root / "experts" / "index.json"
    if index_path.is_file():
        router.served_by = dict(json.loads(index_path.read_text()).get("aliases", {}))


class ExpertsWatcher:
    """Checks the watched files at most every `interval_s`; `refresh` applies a change to a Planner."""

    def __init__(self, store: str | Path, interval_s: float = 1.0):
        self.store = Path(store)
        self.interval_s = interval_s
        self._seen = self._stamp()
        self._checked = time.monotonic()

    def _stamp(self) -> tuple:
        out: list[tuple[int, int, int] | None] = []
        for parts in WATCHED:
            try:
                st = os.stat(self.store.joinpath(*parts))
                out.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                out.append(None)
        return tuple(out)

    def refresh(self, planner) -> dict[str, Path] | None:
        """The new installed experts when something changed (routing and `planner.experts` updated), else None."""
        now = time.monotonic()
        if now - self._checked < self.interval_s:
            return None
        self._checked = now
        stamp = self._stamp()
        if stamp == self._seen:
            return None
        installed = installed_experts(self.store)
        sync_router(planner.router, self.store)
        planner.experts = set(installed)
        if planner.retriever is not None and hasattr(planner.retriever, "experts"):
            from imoe_ray.retrieval.serving import expert_categories

            # in place: the Learner holds the same mapping, so both see the new expert's tables
            mapping = planner.retriever.experts
            mapping.clear()
            mapping.update(expert_categories(self.store))
        self._seen = stamp
        return installed
