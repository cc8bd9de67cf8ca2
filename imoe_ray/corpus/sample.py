"""The sample corpus: real documentation text that every machine running IMoE-Ray already has.

Passages come from the docstrings of the Python standard library and of the libraries this project
installs (PyTorch, transformers, Ray, pandas, SciPy, scikit-learn, matplotlib, ...), read from their
source files with `ast` (nothing is imported, so it is fast), grouped into technical domains. The
`domain` column is kept for evaluation only; the pipeline never reads it.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import random
import re
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# domain → modules or packages (a package means its .py files, recursively)
DOMAINS: dict[str, list[str]] = {
    "networking": ["http", "urllib", "email", "smtplib", "imaplib", "poplib", "ftplib", "socket", "ssl",
                   "socketserver", "xmlrpc", "mailbox", "ipaddress", "aiohttp", "requests"],
    "concurrency": ["asyncio", "threading", "multiprocessing", "concurrent", "queue", "selectors", "sched",
                    "subprocess", "signal", "_threading_local", "joblib", "contextvars"],
    "statistics": ["statistics", "random", "scipy.stats", "numpy.random"],
    "numerical-methods": ["scipy.linalg", "scipy.optimize", "scipy.integrate", "scipy.interpolate",
                          "scipy.sparse", "numpy.linalg", "numpy.polynomial", "decimal", "_pydecimal", "fractions"],
    "deep-learning": ["torch.nn", "torch.optim", "torch.autograd", "torch.distributions"],
    "language-models": ["transformers.generation", "transformers.pipelines", "transformers.tokenization_utils_base",
                        "transformers.trainer", "transformers.training_args", "transformers.modeling_utils", "peft"],
    "dataframes": ["pandas.core", "pandas.io"],
    "machine-learning": ["sklearn.ensemble", "sklearn.linear_model", "sklearn.cluster", "sklearn.model_selection",
                         "sklearn.metrics", "sklearn.svm", "sklearn.tree", "sklearn.decomposition", "sklearn.neighbors"],
    "distributed-computing": ["ray.data", "ray.train", "ray.serve", "ray.tune", "ray.util", "ray.actor",
                              "ray.remote_function"],
    "plotting": ["matplotlib"],
    "testing-debugging": ["unittest", "doctest", "pdb", "bdb", "logging", "trace", "cProfile", "profile",
                          "pstats", "tracemalloc", "faulthandler", "warnings", "_pytest"],
    "files-formats": ["json", "csv", "xml", "html", "configparser", "tomllib", "zipfile", "tarfile", "gzip",
                      "bz2", "lzma", "shutil", "pathlib", "glob", "fnmatch", "plistlib", "netrc", "io", "_pyio",
                      "pickle", "shelve", "dbm", "codecs", "base64", "tempfile", "filecmp", "yaml"],
}
_ROLE = re.compile(r":(?:[a-z]+:)*`~?([^`<]*?)(?:\s*<[^>]*>)?`")  # :func:`name <target>` → name
_CODE_CHARS = set("{}[]()=<>_*/\\|#$@;")


def _module_files(name: str) -> list[Path]:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError, AttributeError):
        return []
    if spec is None:
        return []
    if spec.submodule_search_locations:
        files: list[Path] = []
        for loc in spec.submodule_search_locations:
            files.extend(p for p in sorted(Path(loc).rglob("*.py")) if "tests" not in p.parts and "test" not in p.parts)
        return files
    return [Path(spec.origin)] if spec.origin and spec.origin.endswith(".py") else []


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="strict"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return [d for d in (ast.get_docstring(n, clean=True) for n in nodes) if d]


def _prose_lines(doc: str) -> list[str]:
    """Keep the prose of a docstring: no doctests, code blocks, rules, directives or tables."""
    out, in_code = [], False
    for raw in doc.splitlines():
        line = raw.strip()
        if not line:
            in_code = False
            out.append("")
            continue
        if in_code or line.startswith((">>>", "...", "..", "$ ", "%")) or set(line) <= set("-=~^*+#|` "):
            continue
        if line.endswith("::"):
            in_code = True
            line = line[:-1]
        line = _ROLE.sub(r"\1", line).replace("``", "").replace("`", "")
        if len(line) > 3 and sum(c in _CODE_CHARS for c in line) / len(line) > 0.08:
            continue
        out.append(line)
    return out


def _sentences(doc: str) -> list[str]:
    paragraphs = " ".join(l if l else "\n" for l in _prose_lines(doc)).split("\n")
    sentences: list[str] = []
    for para in paragraphs:
        para = re.sub(r"\s+", " ", para).strip()
        if len(para.split()) < 4:
            continue
        sentences.extend(s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", para) if len(s.split()) >= 4)
    return sentences


def _pack(sentences: list[str], min_words: int, max_words: int) -> list[str]:
    """Greedy packing of consecutive sentences into passages of min..max words."""
    passages: list[str] = []
    current: list[str] = []
    words = 0
    for s in sentences:
        n = len(s.split())
        if n > max_words:
            continue
        if words + n > max_words:
            if words >= min_words:
                passages.append(" ".join(current))
            current, words = [], 0
        current.append(s)
        words += n
    if words >= min_words:
        passages.append(" ".join(current))
    return passages


def _module_name(path: Path) -> str:
    parts = list(path.with_suffix("").parts)
    for anchor in ("site-packages", "dist-packages"):
        if anchor in parts:
            return ".".join(parts[parts.index(anchor) + 1:])
    return ".".join(parts[-3:])


def domain_passages(modules: list[str], enough: int, rng: random.Random, min_words: int = 80,
                    max_words: int = 160) -> list[tuple[str, str]]:
    """(passage, source module) pairs of one domain, repeated sentences removed; files are visited in a
    seeded random order until `enough` passages are found (so a small corpus is quick to make)."""
    files = [f for m in modules for f in _module_files(m)]
    rng.shuffle(files)
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for f in files:
        if len(out) >= enough:
            break
        sentences = []
        for doc in _docstrings(f):
            for s in _sentences(doc):
                key = s.lower()
                if key not in seen:
                    seen.add(key)
                    sentences.append(s)
        out.extend((p, _module_name(f)) for p in _pack(sentences, min_words, max_words))
    return out


def _write(rows: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(f".tmp-{out.name}")
    if out.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), temp)
    else:
        temp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    temp.replace(out)


def build_sample_corpus(out_path: str | Path, per_domain: int = 150, seed: int = 0, min_words: int = 80,
                        max_words: int = 160) -> dict:
    """Write the sample corpus (`id`, `text`, `domain`, `source`) as JSONL or Parquet; returns a summary."""
    started = time.perf_counter()
    rng = random.Random(seed)
    rows, counts = [], {}
    for domain, modules in DOMAINS.items():
        passages = domain_passages(modules, 2 * per_domain, rng, min_words, max_words)
        chosen = rng.sample(passages, min(per_domain, len(passages)))
        counts[domain] = len(chosen)
        for text, source in chosen:
            rows.append({"id": f"{domain}-{hashlib.sha1(text.encode()).hexdigest()[:12]}", "text": text,
                         "domain": domain, "source": source})
    available = [d for d, n in counts.items() if n > 0]
    if len(available) < 3:
        raise RuntimeError(f"only {len(available)} documentation domains found on this machine; need at least 3")
    rng.shuffle(rows)
    out = Path(out_path)
    _write(rows, out)
    return {"path": str(out), "rows": len(rows), "domains": counts, "seconds": round(time.perf_counter() - started, 2)}
