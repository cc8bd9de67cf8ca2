"""Learning from answers: (question, answer) rows appended to the chosen experts' knowledge-base tables.

Every learned row carries its provenance (source="learned", request id, time, expert) and the hash
of its normalised text: the same exchange is stored once per table. Appends hold the table's file
lock (fcntl) around check-then-add, so concurrent requests (threads or processes) neither corrupt a
table nor duplicate a row; LanceDB's own versioning keeps every earlier version readable.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass

import numpy as np

from imoe_ray.retrieval.knowledge_base import KnowledgeBase, KnowledgeBaseError, table_lock

LEARNED = "learned"
_TABLE_NAME = re.compile(r"^[A-Za-z0-9][\w.-]{0,127}$")
# Columns the shard stage does not write, added (as SQL expressions for the existing rows) on first use.
PROVENANCE = {"source": "'corpus'", "request_id": "CAST(NULL AS STRING)", "created_at": "CAST(NULL AS DOUBLE)",
              "expert": "CAST(NULL AS STRING)", "text_hash": "CAST(NULL AS STRING)"}


def normalised_hash(text: str) -> str:
    return hashlib.sha256(" ".join(text.lower().split()).encode()).hexdigest()[:32]


def learned_text(question: str, answer: str, max_chars: int = 4000) -> str:
    return f"Q: {question.strip()}\nA: {answer.strip()}"[:max_chars]


def ensure_provenance(kb: KnowledgeBase, name: str) -> None:
    """Add the provenance columns to a table that lacks them (call under the table's lock)."""
    table = kb.table(name)
    missing = {c: expr for c, expr in PROVENANCE.items() if c not in table.schema.names}
    if missing:
        table.add_columns(missing)
        kb.refresh(name)


@dataclass
class Learned:
    chunk_id: str
    added: list[str]        # tables the row was appended to
    duplicate: list[str]    # tables that already held it


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
               pa.field("created_at", pa.float64()), pa.field("expert", pa.string()), pa.field("text_hash", pa.string())]
    with table_lock(kb.dir, name):
        if name not in kb.names():
            kb.db.create_table(name, schema=pa.schema(fields), exist_ok=True)
    return True


def learn(kb: KnowledgeBase, question: str, answer: str, tables: list[str], request_id: str,
          max_chars: int = 4000, vector: np.ndarray | None = None, create: bool = False) -> Learned:
    """Append one exchange to each named table, once per table. Names without a table are skipped,
    or, with `create`, get a new empty table first (an expert installed after the build)."""
    text = learned_text(question, answer, max_chars)
    digest = normalised_hash(text)
    chunk_id = f"{LEARNED}-{digest[:16]}"
    if create and answer.strip():
        for name in dict.fromkeys(tables):
            create_table(kb, name)
    names = [t for t in dict.fromkeys(tables) if t in set(kb.names())]
    if not names or not answer.strip():
        return Learned(chunk_id, [], [])
    if vector is None:
        vector = kb.embed([text])[0]
    added, duplicate = [], []
    for name in names:
        kb.table(name)  # opened (and indexed, which takes the lock itself) before the lock is held
        with table_lock(kb.dir, name):
            ensure_provenance(kb, name)
            table = kb.table(name)
            table.checkout_latest()
            if table.count_rows(f"text_hash = '{digest}'") > 0:
                duplicate.append(name)
                continue
            row = {"chunk_id": chunk_id, "id": request_id, kb.text_column: text,
                   "embedding": np.asarray(vector, np.float32).tolist(), "source": LEARNED,
                   "request_id": request_id, "created_at": time.time(), "expert": name, "text_hash": digest}
            table.add([{c: row.get(c) for c in table.schema.names}])
            added.append(name)
    return Learned(chunk_id, added, duplicate)


def list_learned(kb: KnowledgeBase, table: str | None = None) -> list[dict]:
    """Every learned row (table, chunk_id, request_id, created_at, text), oldest first."""
    names = [table] if table else kb.names()
    rows = []
    for name in names:
        t = kb.table(name)
        if "source" not in t.schema.names:
            continue
        t.checkout_latest()
        found = (t.search().where(f"source = '{LEARNED}'")
                 .select(["chunk_id", "request_id", "created_at", kb.text_column]).limit(None).to_list())
        rows += [{"table": name, "chunk_id": r["chunk_id"], "request_id": r["request_id"],
                  "created_at": r["created_at"], "text": r[kb.text_column]} for r in found]
    return sorted(rows, key=lambda r: (r["created_at"] or 0, r["table"]))


def remove_learned(kb: KnowledgeBase, chunk_ids: list[str], table: str | None = None) -> dict[str, int]:
    """Delete learned rows by chunk id from every table (or one); corpus rows are never touched.
    Returns rows removed per chunk id."""
    for cid in chunk_ids:
        if not cid.startswith(f"{LEARNED}-") or "'" in cid:
            raise KnowledgeBaseError(f"{cid!r} is not a learned row's id (they look like {LEARNED}-<16 hex>; "
                                     f"see `imoe kb list`)")
    removed = dict.fromkeys(chunk_ids, 0)
    quoted = ", ".join(f"'{c}'" for c in chunk_ids)
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
