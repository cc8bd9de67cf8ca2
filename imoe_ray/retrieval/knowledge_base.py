"""Per-category knowledge bases: the LanceDB tables the shard stage writes (`STORE/kb/<category>.lance`).

Search is vector (cosine on the embedding column), full-text (LanceDB's native BM25 index, no
tantivy needed; built lazily when a table lacks it) or hybrid: both lists fused (`fusion.py`: a
weighted sum of max-normalised scores, the weight calibrated per store), across every table
searched, with duplicates (a chunk in several categories) kept once.
Every hit carries its cosine similarity to the query, which is what the relevance floor reads in
every mode (BM25 and RRF scores are not comparable across queries).
"""

from __future__ import annotations

import fcntl
import os
import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np

from imoe_ray.retrieval.fusion import Fusion, fuse, load_fusion

SearchMode = Literal["hybrid", "vector", "text"]
LOCKS = ".locks"
_FTS_SAFE = re.compile(r"[^\w\s]+")


class KnowledgeBaseError(ValueError):
    """A knowledge base, table or query that cannot be used."""


@dataclass
class Passage:
    chunk_id: str
    id: str
    text: str
    table: str
    score: float            # the mode's own score: cosine (vector), BM25 (text), fused (hybrid)
    similarity: float       # cosine of the passage's embedding and the query's
    source: str = "corpus"  # "learned": appended from an answer

    def citation(self) -> dict:
        """What a response cites: the passage's ids, scores and its text."""
        out = asdict(self)
        out["score"], out["similarity"] = round(self.score, 5), round(self.similarity, 4)
        return out


@contextmanager
def table_lock(kb_dir: str | Path, table: str) -> Iterator[None]:
    """An exclusive lock on one table across threads and processes (flock: per open file). A knowledge
    base on an object store has no local file to lock: there LanceDB's own versioned commits decide."""
    from imoe_ray.store.store import is_uri

    if is_uri(kb_dir):
        yield
        return
    locks = Path(kb_dir) / LOCKS
    locks.mkdir(exist_ok=True)
    fd = os.open(locks / f"{table}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def fts_query(text: str) -> str:
    """The query as plain words: the FTS parser must not read user text as query syntax."""
    return " ".join(_FTS_SAFE.sub(" ", text).split())


class KnowledgeBase:
    """The tables of one store's `kb/` directory; `embed` turns query texts into L2-normalised vectors.
    Hybrid search fuses with `fusion`, by default the one calibrated for this knowledge base."""

    def __init__(self, kb_dir: str | Path, embed: Callable[[list[str]], np.ndarray], text_column: str = "text",
                 consistency_s: float = 0.0, fusion: Fusion | None = None):
        import lancedb  # imported late: its runtime must not be loaded before Ray forks workers

        from imoe_ray.store.store import Store, is_uri

        location = str(kb_dir)
        self.dir: str | Path = location.rstrip("/") if is_uri(location) else Path(location)
        found = Store(location, create=False).exists() if is_uri(location) else Path(location).is_dir()
        if not found:
            raise KnowledgeBaseError(f"no knowledge base at {self.dir}: build the store through the shard stage "
                                     f"(`imoe build --until shard`) with sharding.write_lancedb=true")
        options = Store(location, create=False).storage_options() if is_uri(location) else {}
        self.db = lancedb.connect(str(self.dir), read_consistency_interval=timedelta(seconds=consistency_s),
                                  storage_options=options or None)
        self.embed = embed
        self.text_column = text_column
        self.fusion = fusion or load_fusion(self.dir) or Fusion()
        self._tables: dict[str, object] = {}
        self._schemas: dict[int, set[str]] = {}
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kb")

    def names(self) -> list[str]:
        if isinstance(self.dir, Path):
            return sorted(p.name[: -len(".lance")] for p in self.dir.glob("*.lance"))
        return sorted(self.db.list_tables().tables)

    def table(self, name: str):
        if name not in self._tables:
            if name not in self.names():
                raise KnowledgeBaseError(f"no table {name!r} in {self.dir}; tables: {', '.join(self.names())}")
            table = self.db.open_table(name)
            self._ensure_fts(name, table)
            self._tables[name] = table
        return self._tables[name]

    def _ensure_fts(self, name: str, table) -> None:
        if any(ix.index_type == "FTS" for ix in table.list_indices()):
            return
        with table_lock(self.dir, name):
            table.checkout_latest()
            if not any(ix.index_type == "FTS" for ix in table.list_indices()):
                table.create_fts_index(self.text_column, use_tantivy=False, replace=True)

    def search(self, query: str, tables: list[str] | None = None, k: int = 4, mode: SearchMode = "hybrid",
               min_similarity: float | None = None, where: str | None = None, candidates: int = 20,
               fusion: Fusion | None = None, vector: np.ndarray | None = None) -> list[Passage]:
        """The top-k passages of the named tables (all tables when None or empty) for `query`.
        `where` is a SQL filter on the table's columns (e.g. "source = 'learned'"), applied before ranking."""
        if mode not in ("hybrid", "vector", "text"):
            raise KnowledgeBaseError(f"search mode must be hybrid, vector or text, not {mode!r}")
        depth = max(k, candidates)
        by_vector, by_text = self.candidates(query, tables, depth, mode, where, vector)
        ranked = by_vector if mode == "vector" else by_text if mode == "text" else fuse(by_vector, by_text,
                                                                                         fusion or self.fusion, depth)
        if min_similarity is not None:
            ranked = [p for p in ranked if p.similarity >= min_similarity]
        return ranked[:k]

    def candidates(self, query: str, tables: list[str] | None = None, n: int = 20, mode: SearchMode = "hybrid",
                   where: str | None = None, vector: np.ndarray | None = None) -> tuple[list[Passage], list[Passage]]:
        """The best `n` of each list (by vector, by text; the one `mode` does not use is empty),
        over every named table, each chunk once."""
        known = self.names()
        names = [t for t in tables if t in known] if tables else known
        if vector is None:
            vector = self.embed([query])[0]
        vector = np.asarray(vector, np.float32)
        tasks = []
        for name in names:
            table = self.table(name)
            if mode != "text":
                tasks.append(("vector", lambda t=table, m=name: self._vector_hits(t, m, vector, n, where)))
            if mode != "vector" and fts_query(query):
                tasks.append(("text", lambda t=table, m=name: self._text_hits(t, m, query, vector, n, where)))
        # LanceDB releases the GIL while it scans: the tables' queries run side by side
        results = list(self._pool.map(lambda task: task[1](), tasks)) if len(tasks) > 1 else [t[1]() for t in tasks]
        by_vector = [p for (kind, _), hits in zip(tasks, results) if kind == "vector" for p in hits]
        by_text = [p for (kind, _), hits in zip(tasks, results) if kind == "text" for p in hits]
        return _unique(sorted(by_vector, key=lambda p: -p.score))[:n], _unique(sorted(by_text, key=lambda p: -p.score))[:n]

    def candidates_many(self, queries: list[str], vectors: np.ndarray, n: int = 20) -> list[tuple[list[Passage], list[Passage]]]:
        """`candidates` of many queries over every table, as `calibrate` needs them: one batched
        vector search per table (one LanceDB call for all queries), full-text one query at a time."""
        vectors = np.asarray(vectors, np.float32)
        by_vector: list[list[Passage]] = [[] for _ in queries]
        for name in self.names():
            table = self.table(name)
            q = table.search(vectors, vector_column_name="embedding").distance_type("cosine").limit(n)
            for r in _rows(q.select([c for c in self._columns(table) if c != "embedding"] + ["_distance"])):
                by_vector[int(r.get("query_index", 0))].append(self._passage(r, name, 1.0 - float(r["_distance"])))
        return [(_unique(sorted(hits, key=lambda p: -p.score))[:n], self.candidates(query, None, n, "text", vector=v)[1])
                for query, v, hits in zip(queries, vectors, by_vector)]

    def _columns(self, table) -> list[str]:
        if id(table) not in self._schemas:  # reading the schema costs a round trip: once per table
            self._schemas[id(table)] = set(table.schema.names)
        return [c for c in ("chunk_id", "id", self.text_column, "embedding", "source") if c in self._schemas[id(table)]]

    def refresh(self, name: str) -> None:
        """Forget what is cached about a table (after its schema changed)."""
        table = self._tables.get(name)
        if table is not None:
            self._schemas.pop(id(table), None)

    def _vector_hits(self, table, name: str, vector: np.ndarray, n: int, where: str | None) -> list[Passage]:
        q = table.search(vector, vector_column_name="embedding").distance_type("cosine").limit(n)
        q = q.select([c for c in self._columns(table) if c != "embedding"] + ["_distance"])
        if where:
            q = q.where(where, prefilter=True)
        return [self._passage(r, name, 1.0 - float(r["_distance"])) for r in _rows(q)]

    def _text_hits(self, table, name: str, query: str, vector: np.ndarray, n: int, where: str | None) -> list[Passage]:
        q = table.search(fts_query(query), query_type="fts", fts_columns=self.text_column).limit(n)
        q = q.select(self._columns(table) + ["_score"])
        if where:
            q = q.where(where, prefilter=True)
        return [self._passage(r, name, float(r["_score"]), _cosine(r["embedding"], vector)) for r in _rows(q)]

    def _passage(self, row: dict, name: str, score: float, similarity: float | None = None) -> Passage:
        return Passage(row["chunk_id"], str(row["id"]), row[self.text_column] or "", name, score,
                       score if similarity is None else similarity, row.get("source") or "corpus")


def _cosine(embedding, vector: np.ndarray) -> float:
    emb = np.asarray(embedding, np.float32)
    return float(emb @ vector / max(float(np.linalg.norm(emb) * np.linalg.norm(vector)), 1e-9))


def _rows(query) -> list[dict]:
    try:
        return query.to_list()
    except Exception as e:  # a bad `where` surfaces here, as a LanceDB/DataFusion error
        if "No field named" in str(e) and "source" in str(e):
            return []  # a filter on provenance: this table has no learned rows yet, so nothing matches
        raise KnowledgeBaseError(f"knowledge base query failed: {e}") from None


def _unique(passages: list[Passage]) -> list[Passage]:
    seen: set[str] = set()
    out = []
    for p in passages:
        if p.chunk_id not in seen:
            seen.add(p.chunk_id)
            out.append(p)
    return out


def open_knowledge_base(store_root: str | Path, encoder_name: str, max_tokens: int = 256, text_column: str = "text",
                        consistency_s: float = 0.0, threads: int | None = None) -> KnowledgeBase:
    """The store's knowledge base with its query encoder (the embedding stage's, or another one)."""
    from imoe_ray.embedding.encoder import Encoder

    encoder = Encoder(encoder_name, max_tokens=max_tokens, device="cpu", num_threads=threads)
    from imoe_ray.store.store import is_uri

    kb = f"{str(store_root).rstrip('/')}/kb" if is_uri(store_root) else Path(store_root) / "kb"
    return KnowledgeBase(kb, lambda texts: encoder.encode(texts, batch_size=64), text_column, consistency_s)
