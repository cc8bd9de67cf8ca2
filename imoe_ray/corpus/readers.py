"""Reading a corpus where it lies: a local path or any URI that `pyarrow.fs` opens (s3://, gs://, file://).

Accepted: a Hugging Face dataset (hub id, or a local `save_to_disk` / dataset directory), a `.txt`
file (documents separated by blank lines), `.jsonl` / `.json` (one JSON object per line), `.parquet`,
or a directory / object-store prefix of these (recursive, in sorted order; each `.txt` file in a
directory is one document). S3 endpoint and credentials come from the standard AWS_* variables.

Two ways in, one set of rules (`normalise_batch`): a unique string `id` first, the text column,
every other column untouched, rows with empty text dropped.
- `inspect_corpus` + `corpus_dataset`: a streaming Ray Dataset for the ingest stage. The driver only
  lists files and peeks at the first rows of the first file of each kind, so the common mistakes
  (missing corpus, unknown scheme, missing column, malformed JSON) fail in seconds, before Ray
  starts; the rows themselves are read by Ray Data's readers on the workers. Columns are those of
  the first rows peeked (a later file's extra columns are not added). Files of one kind are read in
  sorted order; a directory that mixes kinds interleaves them block by block (deterministically).
- `read_corpus_table`: one Arrow table in this process, for the small files evaluation reads.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

if TYPE_CHECKING:
    import datasets
    import ray

SUPPORTED = (".txt", ".jsonl", ".json", ".parquet")
KINDS = {".txt": "txt", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
PEEK_BYTES = 1 << 20  # how much of the first JSON / text file the driver reads to check it
PEEK_ROWS = 1000  # rows of the first Parquet file the driver reads to check it
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")

# Reading and parsing the corpus claim no CPU: they must run whatever the chunking actors hold (actors
# of a failed run linger until their dataset is collected), or the pipeline waits on itself. The
# chunking pool leaves a CPU free for them (`corpus.stage.chunk_plan`).
PARSE_TASKS = {"num_cpus": 0}


class CorpusError(ValueError):
    """The corpus cannot be read; the message names the file, line or column at fault."""


# ---------------------------------------------------------------------------------------------- where it lies

@dataclass(frozen=True)
class CorpusFile:
    path: str  # the filesystem's own path
    size: int
    mtime_ns: int | None
    relative: str  # relative to the corpus root; the file name for a single-file corpus


@dataclass(frozen=True)
class CorpusSource:
    """A corpus resolved to a filesystem and a sorted listing (or a Hugging Face hub id: `fs` is None)."""
    spec: str
    fs: pafs.FileSystem | None
    root: str
    is_dir: bool
    hf: bool
    files: tuple[CorpusFile, ...]  # the corpus files, sorted by relative path
    listing: tuple[CorpusFile, ...]  # every file under the root: what the fingerprint covers

    def of_kind(self, kind: str) -> list[CorpusFile]:
        return [f for f in self.files if KINDS[_suffix(f.path)] == kind]


def _suffix(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    return "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""


def corpus_filesystem(spec: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI, opened as the store opens its own (S3 from the
    standard AWS_* variables, which `init_ray` hands to the workers); an unknown scheme is a CorpusError."""
    from imoe_ray.store.store import StoreError, open_filesystem

    try:
        fs, path, _ = open_filesystem(spec)
    except StoreError as e:
        raise CorpusError(f"cannot open corpus {spec}: {e}") from None
    return fs, path.rstrip("/") or path


def _file_info(fs: pafs.FileSystem, path: str | pafs.FileSelector, spec: str):
    try:
        return fs.get_file_info(path)
    except OSError as e:  # unreachable endpoint, missing credentials or bucket
        raise CorpusError(f"cannot read corpus {spec}: {str(e).splitlines()[0]}") from None


def locate_corpus(spec: str | Path | None) -> CorpusSource:
    """Resolve the corpus and list its files (names, sizes, modification times); reads no contents."""
    if spec is None or str(spec).strip() == "":
        raise CorpusError("no corpus given: pass --corpus PATH (or run `imoe sample-corpus OUT` to make one)")
    spec = str(spec)
    fs, root = corpus_filesystem(spec)
    info = _file_info(fs, root, spec)
    shown = spec.rstrip("/")
    if info.type == pafs.FileType.Directory:
        infos = _file_info(fs, pafs.FileSelector(root, recursive=True), spec)
        listing = tuple(sorted((CorpusFile(i.path, i.size, i.mtime_ns, i.path[len(root):].lstrip("/"))
                                for i in infos if i.type == pafs.FileType.File), key=lambda f: f.relative.split("/")))
        names = {f.relative for f in listing}
        hf = any(m in names for m in HF_MARKERS)
        if hf and not isinstance(fs, pafs.LocalFileSystem):
            raise CorpusError(f"{shown}: a saved Hugging Face dataset must be a local directory")
        files = () if hf else tuple(
            f for f in listing if _suffix(f.path) in SUPPORTED and not any(p.startswith(".") for p in f.relative.split("/")))
        if not hf and not files:
            raise CorpusError(f"{shown}: no corpus files ({', '.join(SUPPORTED)}) in this directory")
        return CorpusSource(spec, fs, root, True, hf, files, listing)
    if info.type == pafs.FileType.File:
        if _suffix(root) not in SUPPORTED:
            raise CorpusError(f"{shown}: unsupported file type {_suffix(root)!r}; use one of {', '.join(SUPPORTED)}")
        f = CorpusFile(info.path, info.size, info.mtime_ns, root.rsplit("/", 1)[-1])
        return CorpusSource(spec, fs, root, False, False, (f,), (f,))
    if "://" in spec or _suffix(spec) in SUPPORTED or spec.startswith((".", "/", "~")):
        raise CorpusError(f"corpus not found: {spec}")
    return CorpusSource(spec, None, spec, False, True, (), ())  # anything else is taken as a Hugging Face hub id


def listing_fingerprint(source: CorpusSource, split: str, hf_dataset=None) -> str:
    """Changes whenever the corpus files (names, sizes, modification times) or the reading settings change.
    For a local path the text hashed is the same as before URIs were accepted, so existing stores stay up to date."""
    h = hashlib.sha256(f"{source.spec}|{split}".encode())
    files = list(source.listing)
    if hf_dataset is not None and not files:  # a hub dataset: the files of its local cache
        for cache in hf_dataset.cache_files:
            info = pafs.LocalFileSystem().get_file_info(cache["filename"])
            files.append(CorpusFile(info.path, info.size, info.mtime_ns, info.path))
    local = isinstance(source.fs, pafs.LocalFileSystem) and "://" not in source.spec
    for f in files:
        if local and source.is_dir:
            name = str(Path(source.spec) / f.relative)
        elif local and not source.hf:
            name = str(Path(source.spec))
        else:
            name = f.path
        h.update(f"{name}|{f.size}|{f.mtime_ns}".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- one file

def _read(fs: pafs.FileSystem, path: str, limit: int | None = None) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read(limit) if limit else f.read()


def _decode(where: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise CorpusError(f"{where}: undecodable bytes at byte {e.start} (line {line}); the corpus must be UTF-8") from None


def txt_documents(text: str, whole_file: bool) -> list[str]:
    """The documents of one .txt file: the whole file (in a directory), or its blank-line-separated paragraphs."""
    docs = [text] if whole_file else [d.strip() for d in text.replace("\r\n", "\n").split("\n\n")]
    return [d for d in docs if d.strip()]


def parse_jsonl(where: str, data: bytes) -> list[dict]:
    """Every JSON object of JSON-lines bytes; a bad line is a CorpusError naming the file and line."""
    rows = []
    for n, line in enumerate(_decode(where, data).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{where}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise CorpusError(f"{where}:{n}: each line must be a JSON object, not {type(row).__name__}")
        rows.append(row)
    return rows


def read_jsonl_rows(path: str | Path) -> list[dict]:
    """Every JSON object of a local .jsonl file (or a URI)."""
    fs, where = corpus_filesystem(str(path))
    return parse_jsonl(str(path), _read(fs, where))


def _rows_table(where: str, rows: list[dict]) -> pa.Table:
    if not rows:
        return pa.table({})
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise CorpusError(f"{where}: rows have inconsistent types ({e})") from None


def _read_parquet(fs: pafs.FileSystem, f: CorpusFile, where: str, rows: int | None = None) -> pa.Table:
    try:
        if rows is None:
            return pq.read_table(f.path, filesystem=fs)
        pf = pq.ParquetFile(f.path, filesystem=fs)
        head = next(pf.iter_batches(batch_size=rows), None)
        return pa.Table.from_batches([head]) if head is not None else pf.schema_arrow.empty_table()
    except (pa.ArrowInvalid, OSError) as e:
        raise CorpusError(f"{where}: not a readable Parquet file ({e})") from None


def _read_file(source: CorpusSource, f: CorpusFile) -> pa.Table:
    where = f.path if "://" not in source.spec else f"{source.spec.rstrip('/')}/{f.relative}" if source.is_dir else source.spec
    kind = KINDS[_suffix(f.path)]
    if kind == "txt":
        docs = txt_documents(_decode(where, _read(source.fs, f.path)), whole_file=source.is_dir)
        return pa.table({"text": pa.array(docs, pa.string()), "source_file": pa.array([f.relative] * len(docs), pa.string())})
    if kind == "json":
        return _rows_table(where, parse_jsonl(where, _read(source.fs, f.path)))
    return _read_parquet(source.fs, f, where)


# ---------------------------------------------------------------------------------------------- the rules

def stable_ids(texts: list[str]) -> list[str]:
    """Ids from the text itself (plus the occurrence number for repeated texts): stable across runs."""
    seen: dict[str, int] = {}
    ids = []
    for digest in text_digests(texts):
        k = seen.get(digest, 0)
        seen[digest] = k + 1
        ids.append(digest if k == 0 else f"{digest}-{k}")
    return ids


def text_digests(texts: list[str]) -> list[str]:
    return [hashlib.sha1(t.encode("utf-8")).hexdigest()[:16] for t in texts]


def _conform(batch: pa.Table, schema: pa.Schema, where: str) -> pa.Table:
    """Give a batch exactly `schema`'s columns and types (missing columns as nulls)."""
    columns = []
    for field in schema:
        if field.name not in batch.column_names:
            columns.append(pa.nulls(batch.num_rows, field.type))
            continue
        column = batch.column(field.name)
        if column.type != field.type:
            try:
                column = column.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                raise CorpusError(f"{where}: column {field.name!r} holds {column.type} in some rows "
                                  f"and {field.type} in the first rows read") from None
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)


def check_text_column(schema: pa.Schema, text_column: str, where: str) -> None:
    if text_column not in schema.names:
        raise CorpusError(f"text column {text_column!r} not in {where}; columns: {', '.join(schema.names)}")
    kind = schema.field(text_column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise CorpusError(f"text column {text_column!r} of {where} holds {kind}, not text")


def normalise_batch(batch: pa.Table, text_column: str, id_column: str | None, where: str,
                    schema: pa.Schema | None = None, number_repeats: bool = True) -> pa.Table:
    """Empty texts dropped, a string `id` first. A named id column other than `id` is kept as it is too;
    a column called `id` that is not the id column is kept as `original_id`. Generated ids number
    repeated texts within `batch` only when `number_repeats` (the stream numbers them globally)."""
    if schema is not None:
        batch = _conform(batch, schema, where)
    check_text_column(batch.schema, text_column, where)
    keep = pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(batch.column(text_column))), 0), False)
    batch = batch.filter(keep)
    if id_column and id_column in batch.column_names:
        ids = pc.cast(batch.column(id_column), pa.string()).combine_chunks()
        if ids.null_count:
            raise CorpusError(f"{where}: {ids.null_count} rows have no {id_column!r}")
    elif id_column and id_column != "id":
        raise CorpusError(f"id column {id_column!r} not in {where}; columns: {', '.join(batch.column_names)}")
    else:
        texts = batch.column(text_column).to_pylist()
        ids = pa.array(stable_ids(texts) if number_repeats else text_digests(texts), pa.string())
    if "id" in batch.column_names:
        batch = batch.drop_columns(["id"]) if id_column == "id" else batch.rename_columns(
            [c if c != "id" else "original_id" for c in batch.column_names])
    return batch.add_column(0, "id", ids)


def duplicate_ids(ids: pa.ChunkedArray | pa.Array) -> list:
    counts = pc.value_counts(ids)
    return counts.filter(pc.greater(counts.field("counts"), 1)).field("values").to_pylist()


def _empty_error(where: str, text_column: str) -> CorpusError:
    return CorpusError(f"corpus is empty: every row of {where} has an empty {text_column!r}")


# ---------------------------------------------------------------------------------------------- in this process

def load_hf_dataset(source: CorpusSource, split: str) -> "datasets.Dataset":
    """A Hugging Face dataset (memory-mapped by `datasets`, not read into memory)."""
    import datasets

    try:
        ds = datasets.load_from_disk(source.root) if source.is_dir else datasets.load_dataset(source.spec, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; all mean "cannot read this"
        raise CorpusError(f"cannot load Hugging Face dataset {source.spec!r} (split {split!r}): {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise CorpusError(f"dataset {source.spec!r} has no split {split!r}; splits: {', '.join(ds)}")
        ds = ds[split]
    return ds


def _hf_table(ds, rows: int | None = None) -> pa.Table:
    part = ds if rows is None else ds.select(range(min(rows, len(ds))))
    return part.with_format("arrow")[:]


def read_corpus_table(path: str | Path, text_column: str = "text", id_column: str | None = "id",
                      split: str = "train") -> pa.Table:
    """Read, validate and normalise a whole corpus in this process (for small files: held-out sets, labels).
    Rows with empty text are dropped (counted in the schema metadata)."""
    source = locate_corpus(path)
    if source.hf:
        table = _hf_table(load_hf_dataset(source, split))
    else:
        tables = [t for t in (_read_file(source, f) for f in source.files) if t.num_rows]
        try:
            table = pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise CorpusError(f"{source.spec}: files have incompatible columns ({e})") from None
    where = source.spec
    if table.num_rows == 0:
        raise CorpusError(f"corpus is empty: {where}")
    check_text_column(table.schema, text_column, where)
    out = normalise_batch(table, text_column, id_column, where)
    if out.num_rows == 0:
        raise _empty_error(where, text_column)
    if id_column and id_column in table.column_names:
        dup = duplicate_ids(out.column("id"))
        if dup:
            raise CorpusError(f"{where}: id column {id_column!r} has duplicates, e.g. {dup[0]!r}")
    dropped = table.num_rows - out.num_rows
    return out.replace_schema_metadata({**(out.schema.metadata or {}), b"imoe.dropped_empty": str(dropped).encode()})


# ---------------------------------------------------------------------------------------------- streaming, on Ray Data

@dataclass(frozen=True)
class CorpusPlan:
    """What the driver learnt from the listing and a peek at the first rows: enough to read the rest on Ray."""
    source: CorpusSource
    text_column: str
    id_column: str | None
    split: str
    schemas: dict[str, pa.Schema]  # per kind of file ('json', 'parquet', 'txt', 'hf'): the columns as read
    schema: pa.Schema  # the corpus's columns before normalisation (every kind conformed to it)
    columns: list[str]  # the columns after normalisation, `id` first
    generated_ids: bool

    def fingerprint(self) -> str:
        return listing_fingerprint(self.source, self.split)


def _peek_json(source: CorpusSource, files: list[CorpusFile]) -> tuple[pa.Table, pa.Schema | None, bool]:
    """(the first rows, the schema pyarrow infers for them, whether they are the whole file)."""
    for f in files:
        if f.size == 0:
            continue
        data = _read(source.fs, f.path, PEEK_BYTES)
        whole = len(data) < PEEK_BYTES
        if not whole:
            data = data[: data.rfind(b"\n") + 1] or data
        where = f.path if "://" not in source.spec else source.spec
        rows = parse_jsonl(where, data)
        if not rows:
            continue
        table = _rows_table(where, rows)
        try:
            inferred = pajson.read_json(io.BytesIO(data)).schema
        except pa.ArrowInvalid as e:
            raise CorpusError(f"{where}: not valid JSON lines ({str(e).splitlines()[0]})") from None
        # A column that is null in every peeked row gets a type once a value turns up: text is the likeliest.
        inferred = pa.schema([pa.field(x.name, pa.string()) if pa.types.is_null(x.type) else x for x in inferred])
        return table, inferred, whole and len(files) == 1
    return pa.table({}), None, True


def inspect_corpus(path: str | Path | None, text_column: str = "text", id_column: str | None = "id",
                   split: str = "train") -> CorpusPlan:
    """Check a corpus in seconds without reading it whole: the listing, then the first rows of the first
    file of each kind (Parquet: its schema and first rows; JSON lines: the first MiB; text: the first MiB)."""
    source = locate_corpus(path)
    where = source.spec
    schemas: dict[str, pa.Schema] = {}
    heads: list[pa.Table] = []
    complete = True  # the peek saw every row of the corpus
    if source.hf:
        ds = load_hf_dataset(source, split)
        head = _hf_table(ds, PEEK_ROWS)
        schemas["hf"] = head.schema
        heads.append(head)
        complete = len(ds) <= PEEK_ROWS
    else:
        if all(f.size == 0 for f in source.files):
            raise CorpusError(f"corpus is empty: {where}")
        json_files, parquet_files, txt_files = (source.of_kind(k) for k in ("json", "parquet", "txt"))
        if json_files:
            head, inferred, whole = _peek_json(source, json_files)
            complete &= whole
            if inferred is not None:
                schemas["json"] = inferred
                heads.append(head)
        if parquet_files:
            f = parquet_files[0]
            head = _read_parquet(source.fs, f, f.path if "://" not in where else where, PEEK_ROWS)
            schemas["parquet"] = pq.read_schema(f.path, filesystem=source.fs)
            heads.append(head)
            complete = False
        if txt_files:
            f = txt_files[0]
            data = _read(source.fs, f.path, PEEK_BYTES)
            if len(data) == PEEK_BYTES:
                data = data[: data.rfind(b"\n") + 1] or data[:-4]  # never cut a character in two
            _decode(f.path if "://" not in where else where, data)
            schemas["txt"] = pa.schema([("text", pa.string()), ("source_file", pa.string())])
            docs = txt_documents(data.decode("utf-8", "ignore"), source.is_dir)
            heads.append(pa.table({"text": pa.array(docs, pa.string()),
                                   "source_file": pa.array([f.relative] * len(docs), pa.string())}))
            complete = False
        if not schemas:
            raise CorpusError(f"corpus is empty: {where}")
    try:
        schema = pa.unify_schemas(list(schemas.values()), promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise CorpusError(f"{where}: files have incompatible columns ({e})") from None
    check_text_column(schema, text_column, where)
    heads = [h for h in heads if h.num_rows]
    head = pa.concat_tables([_conform(h, schema, where) for h in heads]) if heads else schema.empty_table()
    out = normalise_batch(head, text_column, id_column, where, number_repeats=True)
    generated = not (id_column and id_column in schema.names)
    if not generated:
        dup = duplicate_ids(out.column("id"))
        if dup:
            raise CorpusError(f"{where}: id column {id_column!r} has duplicates, e.g. {dup[0]!r}")
    if complete and out.num_rows == 0:
        raise _empty_error(where, text_column)
    return CorpusPlan(source, text_column, id_column, split, schemas, schema, out.column_names, generated)


def _txt_batch(batch: pa.Table, root: str, whole_file: bool) -> pa.Table:
    """Ray Data's binary-file rows (bytes, path) → documents (text, source_file)."""
    texts, sources = [], []
    for data, path in zip(batch.column("bytes").to_pylist(), batch.column("path").to_pylist()):
        relative = path[len(root):].lstrip("/") if whole_file else path.rsplit("/", 1)[-1]
        docs = txt_documents(_decode(path, data), whole_file)
        texts += docs
        sources += [relative] * len(docs)
    return pa.table({"text": pa.array(texts, pa.string()), "source_file": pa.array(sources, pa.string())})


class UniqueIds:
    """The one place that sees every id, in corpus order (a single actor of an order-preserving stream):
    a repeated id column value is an error; a generated id of a repeated text gets its occurrence number,
    exactly as `stable_ids` numbers them. Holds one 8-byte hash per document, not the documents."""

    def __init__(self, id_column: str | None, generated: bool, where: str):
        self.id_column = id_column
        self.generated = generated
        self.where = where
        self.seen: dict[int, int] = {}

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch.column("id").to_pylist()
        out = []
        for i in ids:
            key = int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little")
            k = self.seen.get(key, 0)
            self.seen[key] = k + 1
            if k and not self.generated:
                raise CorpusError(f"{self.where}: id column {self.id_column!r} has duplicates, e.g. {i!r}")
            out.append(i if k == 0 else f"{i}-{k}")
        return batch.set_column(0, "id", pa.array(out, pa.string())) if self.generated else batch


def corpus_dataset(plan: CorpusPlan) -> "ray.data.Dataset":
    """The corpus as a streaming Ray Dataset of normalised documents, read by the workers where it lies.
    Run it with `DataContext.execution_options.preserve_order` so ids and row order are deterministic.
    The one exception is a Hugging Face dataset that Ray Data cannot read from the Hub's Parquet files
    (a local or cached one): `from_huggingface` then ships its memory-mapped table from the driver."""
    import ray

    source, where = plan.source, plan.source.spec
    parts = []
    if source.hf:
        parts.append(ray.data.from_huggingface(load_hf_dataset(source, plan.split)))
    for kind in dict.fromkeys(KINDS[_suffix(f.path)] for f in source.files):
        paths = [f.path for f in source.of_kind(kind)]
        if kind == "json":
            ds = ray.data.read_json(paths, filesystem=source.fs, file_extensions=None,
                                    parse_options=pajson.ParseOptions(explicit_schema=plan.schemas["json"],
                                                                      unexpected_field_behavior="ignore"),
                                    ray_remote_args=PARSE_TASKS)
        elif kind == "parquet":
            ds = ray.data.read_parquet(paths, filesystem=source.fs, file_extensions=None, ray_remote_args=PARSE_TASKS)
        else:
            ds = ray.data.read_binary_files(paths, filesystem=source.fs, include_paths=True,
                                            ray_remote_args=PARSE_TASKS).map_batches(
                _txt_batch, fn_kwargs=dict(root=source.root, whole_file=source.is_dir), batch_format="pyarrow",
                **PARSE_TASKS)
        parts.append(ds)
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    normalise = functools.partial(normalise_batch, text_column=plan.text_column, id_column=plan.id_column,
                                  where=where, schema=plan.schema, number_repeats=False)
    ds = ds.map_batches(normalise, batch_format="pyarrow", **PARSE_TASKS)
    return ds.map_batches(UniqueIds, fn_constructor_kwargs=dict(id_column=plan.id_column, generated=plan.generated_ids,
                                                                where=where),
                          batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0,
                          # in submission order, and never silently restarted with an empty memory of ids
                          allow_out_of_order_execution=False, max_restarts=0)


def read_corpus_dataset(path: str | Path, text_column: str = "text", id_column: str | None = "id",
                        split: str = "train") -> "ray.data.Dataset":
    """The corpus as a streaming Ray Dataset (checked by `inspect_corpus` first, so errors are immediate)."""
    return corpus_dataset(inspect_corpus(path, text_column, id_column, split))


def corpus_error_in(error: BaseException, where: str) -> CorpusError | None:
    """The CorpusError (or file-reading error) behind an exception that came back from Ray workers, as one line."""
    seen = set()
    stack: list[BaseException | None] = [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # ray.exceptions.RayTaskError keeps the worker's exception here
        if isinstance(e, CorpusError) and not hasattr(e, "cause"):
            return CorpusError(str(e.args[0]) if e.args else str(e))
        if isinstance(cause, CorpusError):
            return CorpusError(str(cause.args[0]) if cause.args else str(cause))
        for bad in (e, cause):
            if isinstance(bad, (pa.ArrowInvalid, json.JSONDecodeError, UnicodeDecodeError)) and not hasattr(bad, "cause"):
                return CorpusError(f"cannot read corpus {where}: {str(bad).strip().splitlines()[-1]}")
        stack += [cause, e.__cause__, e.__context__]
    # A CorpusError raised inside an actor reaches us only as text: pickling drops exception chains.
    found = re.findall(r"CorpusError: ([^\n]+)", str(error))
    return CorpusError(found[-1].strip()) if found else None
