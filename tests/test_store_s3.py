"""The store contract on a real S3 server (SeaweedFS, the session's `s3` fixture): atomic commits,
the writer lock, one-line errors, the serving mirror and the registry's checkout."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest

from imoe_ray.store import Store, StoreError, StoreLocked
from imoe_ray.store.checkout import checkout
from imoe_ray.store.mirror import StoreMirror


@pytest.fixture()
def s3_env(s3, monkeypatch):
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    s3.filesystem().create_dir("unit")
    return s3


def test_writes_reads_and_directory_commits_on_s3(s3_env, tmp_path):
    s = Store("s3://unit/a")
    s.write_json({"v": 1}, "x", "y.json")
    s.write_table(pa.table({"v": [1, 2]}), "t.parquet")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "w.bin").write_bytes(b"one")
    s.put_dir(tmp_path / "d", "experts", "e")
    (tmp_path / "d" / "w.bin").write_bytes(b"two")
    s.put_dir(tmp_path / "d", "experts", "e")  # replaces the old folder
    assert s.read_json("x", "y.json") == {"v": 1}
    assert s.read_table("t.parquet").column("v").to_pylist() == [1, 2]
    assert s.read_bytes("experts", "e", "w.bin") == b"two"
    assert s.listdir("experts") == ["e"] and s.uri_of("t.parquet") == "s3://unit/a/t.parquet"


def test_one_line_errors_for_a_missing_bucket_and_a_wrong_key(s3_env, monkeypatch):
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' .* does not exist"):
        Store("s3://no-such-bucket/store")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(StoreError, match="cannot reach the store s3://unit/a"):
        Store("s3://unit/a")


def test_the_lock_on_s3_refuses_a_second_writer(s3_env):
    s = Store("s3://unit/locked")
    with s.lock("imoe build"):
        with pytest.raises(StoreLocked, match="locked by 'imoe build'"):
            with Store("s3://unit/locked").lock("imoe experts install"):
                pass
    with s.lock("imoe experts install"):  # released: free again
        pass


def test_the_mirror_follows_the_store(s3_env, tmp_path):
    s = Store("s3://unit/served", cache_dir=tmp_path / "cache")
    s.write_json({"experts": [{"name": "a"}]}, "experts", "index.json")
    s.write_bytes(b"A", "experts", "a", "adapter_model.safetensors")
    mirror = StoreMirror(s)
    assert (mirror.root / "experts" / "a" / "adapter_model.safetensors").read_bytes() == b"A"
    assert not mirror.refresh(interval_s=0)
    s.write_json({"experts": [{"name": "b"}]}, "experts", "index.json")
    s.remove("experts", "a")
    s.write_bytes(b"B", "experts", "b", "adapter_model.safetensors")
    assert mirror.refresh(interval_s=0)
    assert not (mirror.root / "experts" / "a").joinpath("adapter_model.safetensors").exists()
    assert (mirror.root / "experts" / "b" / "adapter_model.safetensors").read_bytes() == b"B"
    assert str(mirror.root).startswith(str(tmp_path / "cache"))


def test_a_checkout_commits_edits_and_nothing_after_an_error(s3_env):
    s = Store("s3://unit/registry")
    s.write_json({"experts": []}, "experts", "index.json")
    s.write_bytes(b"old", "registry", "a", "1.0.0", "w")
    parts, last = [("registry",), ("experts",)], [("experts", "index.json")]
    with checkout(s, parts, last) as root:
        (root / "registry" / "b" / "1.0.0").mkdir(parents=True)
        (root / "registry" / "b" / "1.0.0" / "w").write_bytes(b"new")
        os.remove(root / "registry" / "a" / "1.0.0" / "w")
        os.rmdir(root / "registry" / "a" / "1.0.0")
        os.rmdir(root / "registry" / "a")
        (root / "experts" / "index.json").write_text(json.dumps({"experts": [{"name": "b"}]}))
    assert s.listdir("registry") == ["b"] and s.read_bytes("registry", "b", "1.0.0", "w") == b"new"
    assert s.read_json("experts", "index.json") == {"experts": [{"name": "b"}]}
    with pytest.raises(RuntimeError):
        with checkout(s, parts, last) as root:
            (root / "experts" / "index.json").write_text("{}")
            raise RuntimeError("refused")
    assert s.read_json("experts", "index.json") == {"experts": [{"name": "b"}]}
