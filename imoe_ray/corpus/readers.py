"""Reading a corpus into one Arrow table: `id` (string), the text column, every other column untouched.

Accepted: a Hugging Face dataset (hub id, or a local `save_to_disk` / dataset directory), a `.txt`
file (documents separated by blank lines), `.jsonl` / `.json` (one JSON object per line), `.parquet`,
or a directory of these (recursive, in sorted order; each `.txt` file in a directory is one document).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SUPPORTED = (".txt", ".jsonl", ".json", ".parquet")


class CorpusError(ValueError):
    """The corpus cannot be read; the message names the file, line or column at fault."""


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise CorpusError(f"{path}: undecodable bytes at byte {e.start} (line {line}); the corpus must be UTF-8") from None


def _read_txt(path: Path, whole_file: bool) -> pa.Table:
    text = _decode(path, path.read_bytes())
    docs = [text] if whole_file else [d.strip() for d in text.replace("\r\n", "\n").split("\n\n")]
    docs = [d for d in docs if d.strip()]
    return pa.table({"text": docs, "source_file": [path.name] * len(docs)})


def read_jsonl_rows(path: Path) -> list[dict]:
    """Every JSON object of a .jsonl file; a bad line is a CorpusError naming the file and line."""
    rows = []
    for n, line in enumerate(_decode(path, path.read_bytes()).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise CorpusError(f"{path}:{n}: each line must be a JSON object, not {type(row).__name__}")
        rows.append(row)
    return rows


def _read_jsonl(path: Path) -> pa.Table:
    rows = read_jsonl_rows(path)
    if not rows:
        return pa.table({})
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise CorpusError(f"{path}: rows have inconsistent types ({e})") from None


def _read_parquet(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise CorpusError(f"{path}: not a readable Parquet file ({e})") from None


def _read_file(path: Path, in_directory: bool) -> pa.Table:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _read_txt(path, whole_file=in_directory)
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise CorpusError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(SUPPORTED)}")


def _is_hf_dataset_dir(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "state.json").exists() or (path / "dataset_dict.json").exists()


def _read_hf(path: str, split: str) -> pa.Table:
    import datasets

    try:
        if Path(path).is_dir():
            ds = datasets.load_from_disk(path)
        else:
            ds = datasets.load_dataset(path, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; all mean "cannot read this"
        raise CorpusError(f"cannot load Hugging Face dataset {path!r} (split {split!r}): {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise CorpusError(f"dataset {path!r} has no split {split!r}; splits: {', '.join(ds)}")
        ds = ds[split]
    return ds.data.table if hasattr(ds.data, "table") else ds.with_format("arrow")[:]


def _read_directory(path: Path) -> pa.Table:
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in SUPPORTED
                   and not any(part.startswith(".") for part in f.relative_to(path).parts))
    if not files:
        raise CorpusError(f"{path}: no corpus files ({', '.join(SUPPORTED)}) in this directory")
    tables = []
    for f in files:
        t = _read_file(f, in_directory=True)
        if t.num_rows:
            if "source_file" in t.column_names:
                t = t.set_column(t.column_names.index("source_file"), "source_file",
                                 pa.array([str(f.relative_to(path))] * t.num_rows))
            tables.append(t)
    if not tables:
        return pa.table({})
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise CorpusError(f"{path}: files have incompatible columns ({e})") from None


def _load_raw(path: str, split: str) -> pa.Table:
    p = Path(path).expanduser()
    if p.is_dir():
        return _read_hf(str(p), split) if _is_hf_dataset_dir(p) else _read_directory(p)
    if p.is_file():
        return _read_file(p, in_directory=False)
    if p.suffix.lower() in SUPPORTED or path.startswith((".", "/", "~")):
        raise CorpusError(f"corpus not found: {path}")
    return _read_hf(path, split)  # anything else is taken as a Hugging Face hub id


def _stable_ids(texts: list[str]) -> list[str]:
    """Ids from the text itself (plus the occurrence number for repeated texts): stable across runs."""
    seen: dict[str, int] = {}
    ids = []
    for t in texts:
        digest = hashlib.sha1(t.encode("utf-8")).hexdigest()[:16]
        k = seen.get(digest, 0)
        seen[digest] = k + 1
        ids.append(digest if k == 0 else f"{digest}-{k}")
    return ids


def _with_ids(table: pa.Table, id_column: str | None, text_column: str, path: str) -> pa.Table:
    """Put a unique string `id` first. A named id column other than `id` is kept as it is too;
    a column called `id` that is not the id column is kept as `original_id`."""
    if id_column and id_column in table.column_names:
        ids = pc.cast(table.column(id_column), pa.string())
        if ids.null_count:
            raise CorpusError(f"{path}: {ids.null_count} rows have no {id_column!r}")
        counts = pc.value_counts(ids)
        dup = counts.filter(pc.greater(counts.field("counts"), 1))
        if len(dup):
            raise CorpusError(f"{path}: id column {id_column!r} has duplicates, e.g. {dup[0]['values'].as_py()!r}")
    elif id_column and id_column != "id":
        raise CorpusError(f"id column {id_column!r} not in {path}; columns: {', '.join(table.column_names)}")
    else:
        ids = pa.array(_stable_ids(table.column(text_column).to_pylist()), pa.string())
    if "id" in table.column_names:
        table = table.drop_columns(["id"]) if id_column == "id" else table.rename_columns(
            [c if c != "id" else "original_id" for c in table.column_names])
    return table.add_column(0, "id", ids)


def read_corpus_table(path: str | Path, text_column: str = "text", id_column: str | None = "id",
                      split: str = "train") -> pa.Table:
    """Read, validate and normalise a corpus. Rows with empty text are dropped (counted in the schema metadata)."""
    if path is None or str(path).strip() == "":
        raise CorpusError("no corpus given: pass --corpus PATH")
    path = str(path)
    table = _load_raw(path, split)
    if table.num_rows == 0:
        raise CorpusError(f"corpus is empty: {path}")
    if text_column not in table.column_names:
        raise CorpusError(f"text column {text_column!r} not in {path}; columns: {', '.join(table.column_names)}")
    if not pa.types.is_string(table.schema.field(text_column).type) and not pa.types.is_large_string(
            table.schema.field(text_column).type):
        raise CorpusError(f"text column {text_column!r} of {path} holds {table.schema.field(text_column).type}, not text")
    keep = pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(table.column(text_column))), 0), False)
    dropped = table.num_rows - int(pc.sum(keep).as_py() or 0)
    table = table.filter(keep)
    if table.num_rows == 0:
        raise CorpusError(f"corpus is empty: every row of {path} has an empty {text_column!r}")
    table = _with_ids(table, id_column, text_column, path)
    return table.replace_schema_metadata({**(table.schema.metadata or {}), b"imoe.dropped_empty": str(dropped).encode()})


def read_corpus_dataset(path: str | Path, text_column: str = "text", id_column: str | None = "id",
                        split: str = "train", blocks: int = 8) -> "ray.data.Dataset":  # noqa: F821
    """The corpus as a Ray Dataset of a few blocks (validated in the driver first, so errors are immediate)."""
    import ray

    table = read_corpus_table(path, text_column, id_column, split)
    rows = max(1, -(-table.num_rows // blocks))
    return ray.data.from_arrow([table.slice(i, rows) for i in range(0, table.num_rows, rows)])
