"""What hostile input costs, ours vs the code before issue 26, side by side.

1. Hostile archives (tests/data/hostile, `python tests/data/make_hostile.py`): for each bomb, a fresh
   process runs `Registry.install` and reports its peak RSS and the bytes it wrote (/proc/self/io
   wchar) until it was refused. The baseline is the same call on the code of commit BASELINE
   (`git archive`'d into a temporary folder), which read archives in tarfile's random-access mode
   and checked the signature after unpacking.
2. Learning: 1,000 answers from one caller into one knowledge-base table (LanceDB, real encoder):
   rows added and LanceDB commits (table versions), ours (LearningBuffer with the default caps) vs
   one `learn()` per answer without caps (what serving did before).

    python benchmarks/bench_untrusted_input.py [--answers 1000] [--baseline-ref 44fb425]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
DATA = REPO / "tests" / "data" / "hostile"
BOMBS = [("longname-bomb", True), ("pax-bomb", True), ("unsigned-bomb", False), ("unsigned-bomb", True)]

PROBE = r"""
import json, resource, sys
from pathlib import Path
from imoe_ray.config import PackagesConfig
from imoe_ray.packaging.registry import Registry

def wchar():
    return int(dict(l.split(": ") for l in Path("/proc/self/io").read_text().splitlines())["wchar"])

store, archive, allow = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
before = wchar()
try:
    Registry(store, PackagesConfig(allow_unsigned=allow)).install(archive)
    error = None
except Exception as e:
    error = str(e)[:300]
written = wchar() - before
# VmHWM, not ru_maxrss: ru_maxrss survives exec and can report the parent's size
hwm_kb = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
print(json.dumps({"rss_mb": hwm_kb / 1024, "written": written,
                  "error": error, "error_chars": len(error or "")}))
"""


def probe(code_root: Path, store: Path, archive: Path, allow: bool) -> dict:
    env = {"PYTHONPATH": str(code_root), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", PROBE, str(store), str(archive), "1" if allow else "0"],
                          capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(), timeout=900)
    if done.returncode != 0:
        return {"rss_mb": float("nan"), "written": -1, "error": done.stderr[-300:], "error_chars": -1}
    return json.loads(done.stdout.splitlines()[-1])


def archives(baseline_ref: str) -> None:
    from test_packaging import _make_store

    with tempfile.TemporaryDirectory(prefix="imoe-bench-") as tmp:
        old = Path(tmp) / "old"
        old.mkdir()
        tar = subprocess.run(["git", "-C", str(REPO), "archive", baseline_ref, "imoe_ray"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(old)], input=tar.stdout, check=True)
        print(f"{'archive':<16} {'allow':<6} {'peak RSS MB ours':>17} {'baseline':>9} {'ratio':>6}   "
              f"{'bytes written ours':>18} {'baseline':>12}   refused with (ours)")
        for i, (name, allow) in enumerate(BOMBS):
            rows = []
            for code in (REPO, old):
                store = _make_store(Path(tmp) / f"store-{i}-{code.name}")
                rows.append(probe(code, store, DATA / f"{name}.expert", allow))
                shutil.rmtree(store)
            ours, base = rows
            ratio = base["rss_mb"] / ours["rss_mb"] if ours["rss_mb"] else float("nan")
            print(f"{name:<16} {str(allow):<6} {ours['rss_mb']:>17.0f} {base['rss_mb']:>9.0f} {ratio:>6.1f}   "
                  f"{ours['written']:>18,} {base['written']:>12,}   {(ours['error'] or 'ACCEPTED')[:90]!r}")


def learning(answers: int) -> None:
    import lancedb
    import pyarrow as pa

    from imoe_ray.config import RetrievalConfig
    from imoe_ray.embedding.encoder import Encoder
    from imoe_ray.retrieval.knowledge_base import KnowledgeBase
    from imoe_ray.retrieval.learning import Caps, Exchange, LearningBuffer, learn

    encoder = Encoder(max_tokens=64, device="cpu")
    rc = RetrievalConfig()
    print(f"\n{answers:,} learned answers from one caller (retrieval.learn_rows_per_caller_hour="
          f"{rc.learn_rows_per_caller_hour}, learn_batch_rows={rc.learn_batch_rows}):")
    print(f"{'':<34} {'rows added':>10} {'commits':>8} {'seconds':>8}")
    results = {}
    for label in ("ours (LearningBuffer, capped)", "baseline (learn() per answer)"):
        with tempfile.TemporaryDirectory(prefix="imoe-bench-kb-") as tmp:
            db = lancedb.connect(tmp)
            seed = encoder.encode(["Aquarium fish need clean water."])
            db.create_table("t", data=pa.table({"chunk_id": ["c0"], "id": ["c0"], "text": ["Aquarium fish need clean water."],
                                                "embedding": pa.FixedSizeListArray.from_arrays(
                                                    pa.array(seed.reshape(-1), pa.float32()), seed.shape[1])}))
            kb = KnowledgeBase(tmp, lambda texts: encoder.encode(texts), "text")
            table = kb.table("t")
            version = table.version
            started = time.perf_counter()
            if label.startswith("ours"):
                buffer = LearningBuffer(kb, rc.learn_max_chars, Caps.of(rc), rc.learn_batch_rows, flush_s=3600)
                for i in range(answers):
                    buffer.add(Exchange(f"question {i}", f"answer {i}", ["t"], f"r{i}", "203.0.113.9"))
                buffer.close()
            else:
                for i in range(answers):
                    learn(kb, f"question {i}", f"answer {i}", ["t"], f"r{i}", caller="203.0.113.9")
            seconds = time.perf_counter() - started
            table.checkout_latest()
            results[label] = (table.count_rows("source = 'learned'"), table.version - version, seconds)
            rows, commits, seconds = results[label]
            print(f"{label:<34} {rows:>10,} {commits:>8,} {seconds:>8.1f}")
    (o_rows, o_commits, _), (b_rows, b_commits, _) = results.values()
    print(f"{'ratio baseline / ours':<34} {b_rows / max(o_rows, 1):>10.1f} {b_commits / max(o_commits, 1):>8.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--answers", type=int, default=1000)
    parser.add_argument("--baseline-ref", default="44fb425", help="the commit before issue 26's changes")
    parser.add_argument("--skip-learning", action="store_true")
    args = parser.parse_args()
    archives(args.baseline_ref)
    if not args.skip_learning:
        learning(args.answers)
