"""Driver memory as the corpus grows: peak RSS of the `imoe build` driver on a 1x and a kx corpus.

The 1x corpus is the sample corpus (`imoe sample-corpus`), the kx corpus the same rows replicated
k times with new ids. Each build is a driver in its own subprocess that joins one Ray head node
started for the benchmark (`ray start --head`, `--cpus` CPUs, as on a cluster) and stops after
`--until` (ingest by default; embed is affordable only for a small corpus on a CPU-only machine).
The driver's peak RSS is the kernel's high-water mark (VmHWM in /proc/PID/status), read every 20 ms
while it runs: the last reading before it exits is its peak.

    python benchmarks/bench_driver_memory.py                      # 1x = 150 passages per domain, 10x
    python benchmarks/bench_driver_memory.py --per-domain 10 --until embed
    python benchmarks/bench_driver_memory.py --src OLD   # the same on older code: git archive COMMIT | tar -x -C OLD
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def replicate(source: Path, out: Path, times: int) -> int:
    """The corpus `times` over, each copy with new ids; streamed line by line."""
    rows = 0
    with out.open("w") as f:
        for k in range(times):
            with source.open() as src:
                for line in src:
                    row = json.loads(line)
                    row["id"] = f"{row['id']}~{k}"
                    f.write(json.dumps(row) + "\n")
                    rows += 1
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head(work: Path, cpus: int, src: Path | None) -> tuple[subprocess.Popen, dict[str, str]]:
    """A private Ray head node (its own ports, temp dir and auth token); (process, env for drivers)."""
    token = work / "auth_token"
    token.write_text(secrets.token_hex(32))
    port = free_port()
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    if src is not None:  # another version of the code, for the head's workers and the drivers alike
        env["PYTHONPATH"] = str(src)
    ray = Path(sys.executable).parent / "ray"
    head = subprocess.Popen([str(ray), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             f"--num-cpus={cpus}", "--num-gpus=0", "--include-dashboard=false",
                             f"--temp-dir={work / 'ray'}", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    deadline = time.time() + 300
    while subprocess.run([str(ray), "status", f"--address=127.0.0.1:{port}"], env=env,
                         capture_output=True).returncode != 0:
        if head.poll() is not None or time.time() > deadline:
            raise RuntimeError("the Ray head node did not start")
        time.sleep(2)
    return head, env


def peak_rss_of_build(corpus: Path, store: Path, until: str, settings: list[str],
                      env: dict[str, str]) -> tuple[float, float]:
    """(peak RSS of the driver in MiB, wall seconds) of one `imoe build` in its own process."""
    cmd = [sys.executable, "-m", "imoe_ray.cli", "build", "--corpus", str(corpus), "--store", str(store),
           "--until", until, *[a for s in settings for a in ("--set", s)]]
    started = time.perf_counter()
    log = store.with_suffix(".log")
    with log.open("w") as out:
        # Run from the store's folder: `python -m` puts the working directory first on the path.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=store.parent)
        peak_kib = 0
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak_kib = max(peak_kib, int(line.split()[1]))
            except (FileNotFoundError, ProcessLookupError):
                break
            time.sleep(0.02)
    if proc.wait() != 0:
        raise RuntimeError(f"build failed on {corpus}: {log.read_text()[-2000:]}")
    return peak_kib / 1024, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-domain", type=int, default=150, help="passages per domain of the 1x sample corpus")
    parser.add_argument("--factor", type=int, default=10, help="how many times larger the big corpus is")
    parser.add_argument("--until", default="ingest", choices=["ingest", "embed"])
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of each build's local Ray")
    parser.add_argument("--set", dest="settings", action="append", default=[], help="extra config settings")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--src", type=Path, default=None,
                        help="run another version of imoe_ray (a source tree, e.g. `git archive` of an older commit)")
    args = parser.parse_args()
    from imoe_ray.corpus.sample import build_sample_corpus

    work = args.workdir or Path(tempfile.mkdtemp(prefix="imoe-bench-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    small = work / "corpus-1x.jsonl"
    if not small.exists():
        build_sample_corpus(small, per_domain=args.per_domain, seed=0)
    big = work / f"corpus-{args.factor}x.jsonl"
    rows_small = sum(1 for _ in small.open())
    rows_big = replicate(small, big, args.factor)
    head, env = start_head(work, args.cpus, args.src)
    results = {}
    try:
        for name, corpus, rows in (("1x", small, rows_small), (f"{args.factor}x", big, rows_big)):
            store = work / f"store-{name}{'-src' if args.src else ''}"
            results[name] = (rows, corpus.stat().st_size / 2**20,
                             *peak_rss_of_build(corpus, store, args.until, args.settings, env))
    finally:
        head.terminate()
        head.wait(60)
    print(f"driver peak RSS, imoe build --until {args.until}, a {args.cpus}-CPU Ray head node {' '.join(args.settings)}"
          + (f", code from {args.src}" if args.src else ""))
    print(f"{'corpus':>8} {'documents':>10} {'size MiB':>9} {'peak RSS MiB':>13} {'wall s':>8}")
    for name, (rows, size, rss, wall) in results.items():
        print(f"{name:>8} {rows:>10} {size:>9.1f} {rss:>13.0f} {wall:>8.1f}")
    (r1, _, rss1, _), (rk, _, rssk, _) = results.values()
    print(f"ratio {args.factor}x / 1x peak RSS: {rssk / rss1:.3f} (target <= 1.2)")


if __name__ == "__main__":
    main()
