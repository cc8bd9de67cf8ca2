"""cluster.yaml is checked with the Ray cluster launcher's own schema and defaults."""

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]


def test_cluster_yaml_is_a_valid_launcher_config():
    cfg = prepare_config(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    validate_config(cfg)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert "GPU" not in head["resources"]
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types and all(t["max_workers"] > t["min_workers"] for t in gpu_types)  # autoscaling GPU workers
    assert any("pip install" in c and "imoe-ray" in c for c in cfg["setup_commands"])
