import pytest

from imoe_ray.config import Config, ConfigError, load_config


def test_defaults_work_offline():
    cfg = load_config()
    assert cfg.embedding.encoder == "embedded:all-MiniLM-L6-v2"
    assert cfg.discovery.max_categories is None  # n_C is never required


def test_yaml_then_overrides_then_fields(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("corpus:\n  chunk_tokens: 128\ndiscovery:\n  threshold: 0.3\n")
    cfg = load_config(f, ["discovery.threshold=0.4", "corpus.chunk_overlap=8"], corpus__text_column="body")
    assert (cfg.corpus.chunk_tokens, cfg.corpus.chunk_overlap, cfg.corpus.text_column) == (128, 8, "body")
    assert cfg.discovery.threshold == 0.4


def test_base_settings_are_lowest_precedence(tmp_path):
    cfg = load_config(None, ["corpus.chunk_tokens=64"], base={"corpus": {"chunk_tokens": 99, "text_column": "t"}})
    assert cfg.corpus.chunk_tokens == 64 and cfg.corpus.text_column == "t"


@pytest.mark.parametrize("overrides, needle", [
    (["corpus.chunk_tokns=3"], "corpus.chunk_tokns: unknown field"),
    (["discovery.threshold=2"], "discovery.threshold"),
    (["corpus.chunk_overlap=300"], "chunk_overlap"),
    (["nonsense"], "section.field=value"),
])
def test_bad_settings_name_the_field(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert needle in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("corpus: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_fields_hash_tracks_only_named_settings():
    a, b = Config(), load_config(None, ["embedding.batch_size=8"])
    assert a.fields_hash("corpus", "embedding.encoder") == b.fields_hash("corpus", "embedding.encoder")
    assert a.fields_hash("embedding") != b.fields_hash("embedding")
    assert Config.model_validate(a.model_dump()).fields_hash("discovery") == a.fields_hash("discovery")


def test_a_store_built_with_a_retired_setting_still_loads(tmp_path):
    """Older stores recorded router.aux_weight (DACT's classifiers are fit by logistic regression now):
    their config.yaml loads; naming the setting yourself is still an error."""
    from imoe_ray.config import store_config

    (tmp_path / "config.yaml").write_text(Config().model_copy().to_yaml().replace("router:\n", "router:\n  aux_weight: 0.5\n", 1))
    assert "aux_weight" in (tmp_path / "config.yaml").read_text()
    assert store_config(str(tmp_path)).router.reference_c == Config().router.reference_c
    with pytest.raises(ConfigError, match="aux_weight"):
        store_config(str(tmp_path), overrides=["router.aux_weight=0.5"])
