"""The same build on a local store and on an S3 store (a real SeaweedFS server on this machine), side
by side: wall time of `imoe build` for each, and the ratio S3 / local.

    python benchmarks/bench_store_backends.py [--per-domain 12] [--until experts] [--repeat 1] [-o out.json]

Each build runs in its own `imoe build` process that starts its own local Ray, with the same corpus
(a local file: only the store differs), the same settings and a fresh store; the runs alternate
local, S3, local, S3, ... so a busy machine slows both alike. Settings: a tiny base LM and tiny
experts (as the test suite's), so the store's I/O is a large share of the time, which is the worst
case for the object store.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY = ["pretrain.vocab_size=512", "pretrain.hidden_size=32", "pretrain.layers=1", "pretrain.heads=2",
        "pretrain.intermediate_size=64", "pretrain.seq_len=64", "pretrain.epochs=0.5", "experts.epochs=0.5",
        "experts.r=4", "experts.min_chunks=16", "fusion.summarizer=false", "embedding.part_rows=64"]


def timed_build(corpus: Path, store: str, until: str, env: dict, log: Path) -> float:
    cmd = [str(Path(sys.executable).parent / "imoe"), "build", "--corpus", str(corpus), "--text-column", "text",
           "--id-column", "id", "--store", store, "--until", until, *[a for s in TINY for a in ("--set", s)]]
    started = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"build on {store} failed (exit {done.returncode}): see {log}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-domain", type=int, default=12, help="sample-corpus documents per domain")
    parser.add_argument("--until", default="experts", help="last build stage")
    parser.add_argument("--repeat", type=int, default=1, help="builds per store kind")
    parser.add_argument("-o", "--output", type=Path, help="write the figures as JSON")
    args = parser.parse_args()

    from imoe_ray.corpus.sample import build_sample_corpus
    from tests.s3_server import start_s3_server, stop_s3_server

    with tempfile.TemporaryDirectory(prefix="imoe-bench-stores-") as tmp:
        work = Path(tmp)
        corpus = work / "corpus.jsonl"
        build_sample_corpus(corpus, per_domain=args.per_domain, seed=0)
        server = start_s3_server(work / "s3")
        try:
            server.filesystem().create_dir("bench")
            base_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
            env = base_env | server.env() | {"RAY_USAGE_STATS_ENABLED": "0"}
            walls: dict[str, list[float]] = {"local": [], "s3": []}
            for i in range(args.repeat):
                for kind in ("local", "s3"):
                    store = str(work / f"local-{i}") if kind == "local" else f"s3://bench/store-{i}"
                    walls[kind].append(timed_build(corpus, store, args.until, env, work / f"{kind}-{i}.log"))
                    print(f"{kind:<6} run {i + 1}: {walls[kind][-1]:.1f} s", flush=True)
        finally:
            stop_s3_server(server)
    local, s3 = min(walls["local"]), min(walls["s3"])
    print(f"\nimoe build --until {args.until} ({args.per_domain} documents per domain), best of {args.repeat}:")
    print(f"{'store':<8}{'wall s':>10}")
    print(f"{'local':<8}{local:>10.1f}")
    print(f"{'s3':<8}{s3:>10.1f}")
    print(f"ratio s3 / local: {s3 / local:.2f}")
    if args.output:
        args.output.write_text(json.dumps({"until": args.until, "per_domain": args.per_domain, "walls_s": walls,
                                           "ratio": round(s3 / local, 3)}, indent=2))


if __name__ == "__main__":
    main()
