"""Job queue benchmarks against a running `imoe serve` (its `jobs.*` settings as started):

1. preemption latency: every slot busy with long low-priority jobs, a high-priority job arrives;
   its submission → first token (`telemetry.first_token_ms`), against the same job on an idle queue
   and the duration of one generation step (a running job's run_ms / its steps);
2. throughput with mixed priorities vs a plain FIFO (every job priority 0, one class): the same jobs,
   tokens/s over the whole run and the high-priority jobs' completion time, side by side with the ratio.

    imoe serve --store store --port 8000 &
    python benchmarks/bench_jobs.py --url http://127.0.0.1:8000/v1 [--reps 5] [--jobs 12]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import requests


def submit(url: str, **body) -> str:
    r = requests.post(f"{url}/jobs", json=body, timeout=60)
    r.raise_for_status()
    return r.json()["id"]


def wait(url: str, job_id: str, states=("succeeded", "failed", "cancelled"), timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        view = requests.get(f"{url}/jobs/{job_id}", timeout=30).json()
        if view["state"] in states:
            return view
        time.sleep(0.02)
    raise TimeoutError(view)


def bench_preemption(url: str, slots: int, reps: int, prompt: str, long_tokens: int, step_tokens: int) -> dict:
    idle, busy, steps = [], [], []
    for _ in range(reps):
        idle.append(wait(url, submit(url, agent="probe", priority=9, prompt=prompt, max_tokens=4))
                    ["telemetry"]["first_token_ms"])
        lows = [submit(url, agent=f"low{i}", priority=0, prompt=prompt, max_tokens=long_tokens) for i in range(slots)]
        for j in lows:
            wait(url, j, states=("running",))
        time.sleep(0.05)
        high = wait(url, submit(url, agent="high", priority=9, prompt=prompt, max_tokens=4))
        busy.append(high["telemetry"]["first_token_ms"])
        views = [wait(url, j) for j in lows]
        assert sum(v["telemetry"]["preemptions"] for v in views) >= 1, views
        for view in views:
            t = view["telemetry"]
            if t["preemptions"] == 0:  # a run without a pause: run_ms over its steps is one step's time
                steps.append(t["run_ms"] / (1 + -(-(t["tokens"] - 1) // step_tokens)))  # 1-token first step
    step = statistics.median(steps) if steps else float("nan")
    p50 = statistics.median(busy)
    p90 = sorted(busy)[min(len(busy) - 1, int(0.9 * len(busy)))]
    return {"first_token_ms_idle_p50": round(statistics.median(idle), 1), "first_token_ms_preempting_p50": round(p50, 1),
            "first_token_ms_preempting_p90": round(p90, 1), "first_token_ms_preempting_max": round(max(busy), 1),
            "first_token_ms_preempting_all": sorted(round(b, 1) for b in busy),
            "generation_step_ms_p50": round(step, 1), "target_ms (step + 50)": round(step + 50, 1),
            "met_p50": p50 <= step + 50, "within_target": f"{sum(b <= step + 50 for b in busy)}/{len(busy)}"}


def run_mix(url: str, n: int, prompt: str, max_tokens: int, mixed: bool) -> dict:
    started = time.time()
    ids, high = [], set()
    for i in range(n):
        is_high = i % 3 == 2
        j = submit(url, agent=f"agent{i % 4}", priority=9 if (mixed and is_high) else 0, prompt=prompt,
                   max_tokens=max_tokens)
        ids.append(j)
        if is_high:
            high.add(j)
    views = {j: wait(url, j) for j in ids}
    wall = max(v["updated"] for v in views.values()) - started
    tokens = sum(v["telemetry"]["tokens"] for v in views.values())
    done_s = [views[j]["updated"] - views[j]["created"] for j in high]
    return {"tokens_per_s": round(tokens / wall, 1), "jobs_per_s": round(n / wall, 2),
            "high_priority_completion_s_p50": round(statistics.median(done_s), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--slots", type=int, default=2, help="the server's jobs.slots")
    p.add_argument("--step-tokens", type=int, default=8, help="the server's jobs.step_tokens")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--jobs", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--prompt", default="the server sends the request and")
    a = p.parse_args()
    out = {"preemption": bench_preemption(a.url, a.slots, a.reps, a.prompt, a.max_tokens, a.step_tokens)}
    fifo = run_mix(a.url, a.jobs, a.prompt, a.max_tokens, mixed=False)
    mixed = run_mix(a.url, a.jobs, a.prompt, a.max_tokens, mixed=True)
    out["throughput"] = {"fifo": fifo, "mixed_priorities": mixed,
                         "ratio_tokens_per_s (mixed/fifo)": round(mixed["tokens_per_s"] / fifo["tokens_per_s"], 3),
                         "ratio_high_completion (fifo/mixed)": round(fifo["high_priority_completion_s_p50"]
                                                                     / mixed["high_priority_completion_s_p50"], 2)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
