"""Learning from answers: (question, answer) rows added to the chosen experts' knowledge-base tables.

Every learned row carries its provenance (source="learned", the caller, the request id, the time,
the expert) and the hash of its normalised text: the same exchange is stored once per table. What
one caller may add is capped (rows per hour, per table) and so is every table's learned total.
Rows are written in batches: one `merge_insert` on the text hash per table (one LanceDB commit),
under the table's file lock so that the caps hold across processes; `LearningBuffer` gathers a
serving replica's answers and flushes them every few seconds or when a batch is full.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np

from imoe_ray.retrieval.knowledge_base import KnowledgeBase, KnowledgeBaseError, table_lock

LEARNED = "learned"
HOUR_S = 3600.0
_TABLE_NAME = re.compile(r"^[A-Za-z0-9][\w.-]{0,127}$")
# Columns the shard stage does not write, added (as SQL expressions for the existing rows) on first use.
PROVENANCE = {"source": "'corpus'", "request_id": "CAST(NULL AS STRING)", "created_at": "CAST(NULL AS DOUBLE)",
              "expert": "CAST(NULL AS STRING)", "text_hash": "CAST(NULL AS STRING)", "caller": "CAST(NULL AS STRING)"}


def normalised_hash(text: str) -> str:
    return hashlib.sha256(" ".join(text.lower().split()).encode()).hexdigest()[:32]


def learned_text(question: str, answer: str, max_chars: int = 4000) -> str:
    return f"Q: {question.strip()}\nA: {answer.strip()}"[:max_chars]


def sql_string(text: str) -> str:
    """A SQL string literal (quotes doubled): callers and ids come from clients."""
    return "'" + str(text).replace("'", "''") + "'"


def ensure_provenance(kb: KnowledgeBase, name: str) -> None:
    """Add the provenance columns to a table that lacks them (call under the table's lock)."""
    table = kb.table(name)
    table.checkout_latest()
    missing = {c: expr for c, expr in PROVENANCE.items() if c not in table.schema.names}
    if missing:
        table.add_columns(missing)
        kb.refresh(name)


@dataclass
class Caps:
    """What learning may add: rows per caller per hour (per table) and learned rows per table."""
    rows_per_caller_hour: int | None = None
    max_rows: int | None = None

    @classmethod
    def of(cls, retrieval_cfg) -> "Caps":
        return cls(retrieval_cfg.learn_rows_per_caller_hour, retrieval_cfg.learn_max_rows)


@dataclass
class Exchange:
    question: str
    answer: str
    tables: list[str]
    request_id: str
    caller: str | None = None
    created_at: float = field(default_factory=time.time)


@dataclass
class Learned:
    chunk_id: str
    added: list[str]        # tables the row was added to
    duplicate: list[str]    # tables that already held it
    capped: list[str] = field(default_factory=list)   # tables a cap kept it out of


def create_table(kb: KnowledgeBase, name: str) -> bool:
    """An empty table for an expert that has none (one installed from a package after the build),
    shaped like the shard stage's tables plus the provenance columns. False when the name is not a
    safe file name or there is no table to copy the embedding width from."""
    import pyarrow as pa

    existing = kb.names()
    if name in existing:
        return True
    if not _TABLE_NAME.match(name) or not existing:
        return False
    like = kb.table(existing[0]).schema
    fields = [like.field(c) for c in ("chunk_id", "id", kb.text_column, "embedding")]
    fields += [pa.field("source", pa.string()), pa.field("request_id", pa.string()),
               pa.field("created_at", pa.float64()), pa.field("expert", pa.string()), pa.field("text_hash", pa.string()),
               pa.field("caller", pa.string())]
    with table_lock(kb.dir, name):
        if name not in kb.names():
            kb.db.create_table(name, schema=pa.schema(fields), exist_ok=True)
    return True


def learn(kb: KnowledgeBase, question: str, answer: str, tables: list[str], request_id: str,
          max_chars: int = 4000, vector: np.ndarray | None = None, create: bool = False,
          caller: str | None = None, caps: Caps | None = None) -> Learned:
    """Add one exchange to each named table, once per table. Names without a table are skipped,
    or, with `create`, get a new empty table first (an expert installed after the build)."""
    vectors = None if vector is None else np.asarray([vector], np.float32)
    return learn_many(kb, [Exchange(question, answer, tables, request_id, caller)], max_chars, caps, create, vectors)[0]


def learn_many(kb: KnowledgeBase, exchanges: list[Exchange], max_chars: int = 4000, caps: Caps | None = None,
               create: bool = False, vectors: np.ndarray | None = None) -> list[Learned]:
    """Add many exchanges: their texts embedded in one call, one commit per table."""
    caps = caps or Caps()
    texts = [learned_text(e.question, e.answer, max_chars) for e in exchanges]
    digests = [normalised_hash(t) for t in texts]
    results = [Learned(f"{LEARNED}-{d[:16]}", [], []) for d in digests]
    wanted: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(exchanges):
        if not e.answer.strip():
            continue
        for name in dict.fromkeys(e.tables):
            if create:
                create_table(kb, name)
            wanted[name].append(i)
    known = set(kb.names())
    wanted = {name: idx for name, idx in wanted.items() if name in known}
    if not wanted:
        return results
    if vectors is None:
        needed = sorted({i for idx in wanted.values() for i in idx})
        embedded = kb.embed([texts[i] for i in needed])
        vectors = np.zeros((len(exchanges), np.asarray(embedded).shape[1]), np.float32)
        vectors[needed] = np.asarray(embedded, np.float32)
    for name, idx in wanted.items():
        _learn_into(kb, name, idx, exchanges, texts, digests, np.asarray(vectors, np.float32), caps, results)
    return results


def _learn_into(kb: KnowledgeBase, name: str, idx: list[int], exchanges: list[Exchange], texts: list[str],
                digests: list[str], vectors: np.ndarray, caps: Caps, results: list[Learned]) -> None:
    import pyarrow as pa

    kb.table(name)  # opened (and indexed, which takes the lock itself) before the lock is held
    with table_lock(kb.dir, name):
        ensure_provenance(kb, name)
        table = kb.table(name)
        table.checkout_latest()
        hashes = sorted({digests[i] for i in idx})
        present = {r["text_hash"] for r in table.search().where(f"text_hash IN ({', '.join(map(sql_string, hashes))})")
                   .select(["text_hash"]).limit(None).to_list()}
        room = None if caps.max_rows is None else max(0, caps.max_rows - table.count_rows(f"source = '{LEARNED}'"))
        used: dict[str | None, int] = {}
        rows, taken = [], set(present)
        for i in idx:
            e = exchanges[i]
            if digests[i] in taken:
                results[i].duplicate.append(name)
                continue
            if caps.rows_per_caller_hour is not None:
                if e.caller not in used:
                    used[e.caller] = _rows_in_last_hour(table, e.caller, e.created_at)
                if used[e.caller] >= caps.rows_per_caller_hour:
                    results[i].capped.append(name)
                    continue
                used[e.caller] += 1
            if room is not None:
                if room <= 0:
                    results[i].capped.append(name)
                    continue
                room -= 1
            taken.add(digests[i])
            rows.append({"chunk_id": results[i].chunk_id, "id": e.request_id, kb.text_column: texts[i],
                         "embedding": vectors[i].tolist(), "source": LEARNED, "request_id": e.request_id,
                         "created_at": e.created_at, "expert": name, "text_hash": digests[i], "caller": e.caller})
            results[i].added.append(name)
        if rows:
            schema = table.schema
            data = pa.Table.from_pylist([{c: r.get(c) for c in schema.names} for r in rows], schema=schema)
            table.merge_insert("text_hash").when_not_matched_insert_all().execute(data)


def _rows_in_last_hour(table, caller: str | None, now: float) -> int:
    who = "caller IS NULL" if caller is None else f"caller = {sql_string(caller)}"
    return table.count_rows(f"source = '{LEARNED}' AND {who} AND created_at >= {now - HOUR_S!r}")


class LearningBuffer:
    """A serving replica's learned answers, held in memory and written in batches: when `batch_rows`
    are waiting, or every `flush_s` seconds (a background thread). A caller over its hourly cap is
    dropped here already, so one client cannot fill the buffer."""

    def __init__(self, kb: KnowledgeBase, max_chars: int = 4000, caps: Caps | None = None, batch_rows: int = 128,
                 flush_s: float = 5.0, create: bool = True):
        self.kb, self.max_chars, self.caps, self.batch_rows, self.create = kb, max_chars, caps or Caps(), batch_rows, create
        self._pending: list[Exchange] = []
        self._recent: dict[str | None, deque] = defaultdict(deque)
        self._lock = threading.Lock()
        self._writing = threading.Lock()
        self._stop = threading.Event()
        self.dropped = 0
        self._thread = threading.Thread(target=self._loop, args=(flush_s,), daemon=True, name="learning-flush")
        self._thread.start()

    def add(self, exchange: Exchange) -> bool:
        """Queue an exchange; False when its caller is over the hourly cap (it is not learned)."""
        with self._lock:
            recent = self._recent[exchange.caller]
            while recent and recent[0] < exchange.created_at - HOUR_S:
                recent.popleft()
            cap = self.caps.rows_per_caller_hour
            if cap is not None and len(recent) >= cap:
                self.dropped += 1
                return False
            recent.append(exchange.created_at)
            self._pending.append(exchange)
            full = len(self._pending) >= self.batch_rows
        if full:
            self.flush()
        return True

    def flush(self) -> list[Learned]:
        with self._writing:
            with self._lock:
                batch, self._pending = self._pending, []
            return learn_many(self.kb, batch, self.max_chars, self.caps, self.create) if batch else []

    def _loop(self, flush_s: float) -> None:
        import logging

        while not self._stop.wait(flush_s):
            try:
                self.flush()
            except Exception as e:  # noqa: BLE001 - a failed batch is logged; serving goes on
                logging.getLogger(__name__).warning("learning: a batch could not be written: %r", e)

    def close(self) -> list[Learned]:
        self._stop.set()
        self._thread.join(timeout=60)
        return self.flush()


def list_learned(kb: KnowledgeBase, table: str | None = None) -> list[dict]:
    """Every learned row (table, chunk_id, caller, request_id, created_at, text), oldest first."""
    names = [table] if table else kb.names()
    rows = []
    for name in names:
        t = kb.table(name)
        t.checkout_latest()
        columns = set(t.schema.names)
        if "source" not in columns:
            continue
        wanted = ["chunk_id", "request_id", "created_at", kb.text_column] + (["caller"] if "caller" in columns else [])
        found = t.search().where(f"source = '{LEARNED}'").select(wanted).limit(None).to_list()
        rows += [{"table": name, "chunk_id": r["chunk_id"], "source": LEARNED, "caller": r.get("caller"),
                  "request_id": r["request_id"], "created_at": r["created_at"], "text": r[kb.text_column]} for r in found]
    return sorted(rows, key=lambda r: (r["created_at"] or 0, r["table"]))


def remove_learned(kb: KnowledgeBase, chunk_ids: list[str], table: str | None = None) -> dict[str, int]:
    """Delete learned rows by chunk id from every table (or one); corpus rows are never touched.
    Returns rows removed per chunk id."""
    for cid in chunk_ids:
        if not re.fullmatch(rf"{LEARNED}-[0-9a-f]{{16}}", cid):
            raise KnowledgeBaseError(f"{cid[:60]!r} is not a learned row's id (they look like {LEARNED}-<16 hex>; "
                                     f"see `imoe kb list`)")
    removed = dict.fromkeys(chunk_ids, 0)
    quoted = ", ".join(sql_string(c) for c in chunk_ids)
    for name in ([table] if table else kb.names()):
        t = kb.table(name)
        if "source" not in t.schema.names:
            continue
        where = f"source = '{LEARNED}' AND chunk_id IN ({quoted})"
        with table_lock(kb.dir, name):
            t.checkout_latest()
            hits = t.search().where(where).select(["chunk_id"]).limit(None).to_list()
            if hits:
                t.delete(where)
        for h in hits:
            removed[h["chunk_id"]] += 1
    return removed


def remove_learned_where(kb: KnowledgeBase, table: str | None = None, since: float | None = None,
                         until: float | None = None, caller: str | None = None) -> dict[str, int]:
    """Delete, in one commit per table, the learned rows made in [since, until) by `caller` (each
    filter optional; none: every learned row). Returns rows removed per table."""
    where = [f"source = '{LEARNED}'"]
    if since is not None:
        where.append(f"created_at >= {float(since)!r}")
    if until is not None:
        where.append(f"created_at < {float(until)!r}")
    if caller is not None:
        where.append(f"caller = {sql_string(caller)}")
    removed = {}
    for name in ([table] if table else kb.names()):
        t = kb.table(name)
        columns = set(t.schema.names)
        if "source" not in columns or (caller is not None and "caller" not in columns):
            continue
        with table_lock(kb.dir, name):
            t.checkout_latest()
            n = t.count_rows(" AND ".join(where))
            if n:
                t.delete(" AND ".join(where))
        removed[name] = n
    return removed


def compact(kb: KnowledgeBase, older_than: timedelta | None = None) -> dict[str, dict]:
    """Compact every table's files (one small fragment per commit otherwise) and, with `older_than`,
    drop versions older than that. Returns fragments before and after, per table."""
    out = {}
    for name in kb.names():
        t = kb.table(name)
        with table_lock(kb.dir, name):
            t.checkout_latest()
            before = len(t.to_lance().get_fragments())
            t.optimize(cleanup_older_than=older_than)
            t.checkout_latest()
            out[name] = {"fragments_before": before, "fragments_after": len(t.to_lance().get_fragments()),
                         "version": t.version}
    return out
