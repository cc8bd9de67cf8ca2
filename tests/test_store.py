from pathlib import Path

import pyarrow as pa
import pytest

from imoe_ray.store import StageManifest, Store
from imoe_ray.store.store import StoreError


def test_atomic_writes_leave_no_temporaries(tmp_path):
    s = Store(tmp_path / "st")
    s.write_json({"a": 1}, "x", "y.json")
    s.write_table(pa.table({"v": [1, 2]}), "t.parquet")
    assert s.read_json("x", "y.json") == {"a": 1}
    assert s.read_table("t.parquet").column("v").to_pylist() == [1, 2]
    assert not [p for p in (tmp_path / "st").rglob("*") if ".tmp-" in p.name]


def test_replacing_keeps_old_until_commit(tmp_path):
    s = Store(tmp_path)
    s.write_bytes(b"old", "f")
    temp = s.temp_path("f")
    s.fs.create_dir(temp)  # a stage writing a directory in place of a file
    assert s.read_bytes("f") == b"old"
    s.commit(temp, "f")
    assert (tmp_path / "f").is_dir()


def test_clean_temps_and_listdir_hide_leftovers(tmp_path):
    s = Store(tmp_path)
    s.write_bytes(b"1", "d", "part-0")
    leftover = s.temp_path("d", "part-1")
    with s.fs.open_output_stream(leftover) as f:
        f.write(b"half")
    assert s.listdir("d") == ["part-0"]
    s.clean_temps("d")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["part-0"]


def test_missing_reads_are_clear(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        Store(tmp_path).read_json("nope.json")


def test_manifest_partial_then_complete(tmp_path):
    s = Store(tmp_path)
    old = StageManifest("embed", "h0", {"upstream": "u"})
    old.finish(s)
    m = StageManifest("embed", "h1", {"upstream": "u"})
    m.start(s)
    assert StageManifest.load(s, "embed").config_hash == "h0"  # a running stage keeps the last complete one
    assert StageManifest.load(s, "embed", partial=True).matches("h1", {"upstream": "u"})
    m.metrics = {"rows": 3}
    m.finish(s)
    loaded = StageManifest.load(s, "embed")
    assert loaded.complete and loaded.matches("h1", {"upstream": "u"}) and loaded.metrics == {"rows": 3}
    assert StageManifest.load(s, "embed", partial=True) is None
    assert not loaded.matches("h2", {"upstream": "u"}) and not loaded.matches("h1", {"upstream": "v"})
    assert loaded.fingerprint() == StageManifest("embed", "h1", {"upstream": "u"}).fingerprint()


def test_uri_store(tmp_path):
    s = Store(f"file://{tmp_path}/u")
    s.write_json([1], "a.json")
    assert s.read_json("a.json") == [1] and s.is_local


def test_a_relative_store_path_becomes_absolute(tmp_path, monkeypatch):
    """Ray workers (Tune trials) run in another working directory: the URI they get must be absolute."""
    monkeypatch.chdir(tmp_path)
    store = Store("store")
    assert store.uri == str(tmp_path / "store") and Path(store.uri).is_absolute()
    monkeypatch.chdir("/")
    Store(store.uri).write_json({"ok": 1}, "x.json")
    assert (tmp_path / "store" / "x.json").is_file()
