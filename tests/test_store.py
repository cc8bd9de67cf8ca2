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


def test_commit_replaces_a_file_atomically_and_never_deletes_first(tmp_path, monkeypatch):
    """A kill between the steps of a commit leaves the old file or the new one, never none."""
    import os

    s = Store(tmp_path)
    s.write_bytes(b"old", "config.yaml")
    removed = []
    monkeypatch.setattr(Store, "remove", lambda self, *parts: removed.append(parts))
    temp = s.temp_path("config.yaml")
    with s.fs.open_output_stream(temp) as f:
        f.write(b"new")
    real_replace = os.replace

    def killed(src, dst):
        raise KeyboardInterrupt  # the process dies where the file would move into place

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        s.commit(temp, "config.yaml")
    assert (tmp_path / "config.yaml").read_bytes() == b"old" and not removed
    monkeypatch.setattr(os, "replace", real_replace)
    s.commit(temp, "config.yaml")
    assert (tmp_path / "config.yaml").read_bytes() == b"new"


def test_a_directory_commit_cut_off_midway_is_repaired(tmp_path, monkeypatch):
    import os

    s = Store(tmp_path)
    old = s.temp_path("experts", "a")
    os.makedirs(old)
    Path(old, "w").write_text("old")
    s.commit(old, "experts", "a")
    new = s.temp_path("experts", "a")
    os.makedirs(new)
    Path(new, "w").write_text("new")
    real_replace, calls = os.replace, []

    def second_rename_killed(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", second_rename_killed)
    with pytest.raises(KeyboardInterrupt):
        s.commit(new, "experts", "a")
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (tmp_path / "experts" / "a").exists()  # moved aside when the kill came
    s.clean_temps("experts")
    assert (tmp_path / "experts" / "a" / "w").read_text() == "old"
    assert s.listdir("experts") == ["a"]


def test_the_writer_lock_refuses_a_second_writer_and_frees_a_dead_ones(tmp_path):
    import json
    import socket

    from imoe_ray.store import StoreLocked

    s = Store(tmp_path)
    with s.lock("imoe build"):
        with pytest.raises(StoreLocked, match="locked by 'imoe build'"):
            with Store(tmp_path).lock("imoe experts install"):
                pass
    assert not (tmp_path / "locks" / "writer.json").exists()
    dead = {"owner": "x", "purpose": "imoe build", "host": socket.gethostname(), "pid": 2**22 + 17,
            "since": "then", "expires": 4e9}
    (tmp_path / "locks" / "writer.json").write_text(json.dumps(dead))
    with s.lock("imoe kb remove"):  # its holder's process is gone: the lease is free
        assert json.loads((tmp_path / "locks" / "writer.json").read_text())["purpose"] == "imoe kb remove"


def _race_for_the_lock(root: str, attempted, release, results) -> None:
    from imoe_ray.store import StoreLocked

    try:
        with Store(root).lock("racer"):
            attempted.release()
            release.wait(60)  # held until every racer has tried
            results.put("won")
    except StoreLocked:
        attempted.release()
        results.put("refused")


def test_racing_writers_on_a_local_disk_get_exactly_one_lease(tmp_path):
    """Racers that all find the lease free: one wins, the rest are refused (flock orders the
    read-then-write; no settle wait on a local disk)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    attempted, release, results = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    racers = [ctx.Process(target=_race_for_the_lock, args=(str(tmp_path), attempted, release, results)) for _ in range(4)]
    for p in racers:
        p.start()
    for _ in racers:
        assert attempted.acquire(timeout=120)
    release.set()
    outcomes = sorted(results.get(timeout=60) for _ in racers)
    for p in racers:
        p.join(60)
    assert outcomes == ["refused"] * 3 + ["won"]
    assert not (tmp_path / "locks" / "writer.json").exists()


def test_bad_store_uris_fail_in_one_line(monkeypatch):
    with pytest.raises(StoreError, match="unknown URI scheme 'foo'"):
        Store("foo://bucket/store")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with pytest.raises(StoreError, match="no S3 credentials"):
        Store("s3://bucket/store")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    with pytest.raises(StoreError, match="cannot reach the store s3://bucket/store"):
        Store("s3://bucket/store")
