"""cluster.yaml passes Ray's own cluster-config validator, and configs/hetero-gpu.yaml asks for
what its node types advertise."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from afd.orchestrator.config import load_deployment
from jsonschema import ValidationError
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_yaml_is_a_valid_ray_cluster_config() -> None:
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` runs first; raises on a violation
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert types["attention_gpu"]["resources"] == {"afd_attention_host": 1}
    assert types["expert_gpu"]["resources"] == {"afd_expert_host": 1}


def test_the_heterogeneous_deployment_targets_the_cluster_node_types() -> None:
    d = load_deployment(ROOT / "configs" / "hetero-gpu.yaml")
    node_types = yaml.safe_load((ROOT / "cluster.yaml").read_text())["available_node_types"]
    advertised = {r for t in node_types.values() for r in t.get("resources", {})}
    assert set(d.attention.resources) <= advertised and set(d.experts.resources) <= advertised
    assert (d.attention.accelerator_type, d.experts.accelerator_type) == ("H100", "L40S")


def test_the_validator_catches_a_bad_field() -> None:
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["available_node_types"]["expert_gpu"]["min_wrokers"] = 1
    with pytest.raises(ValidationError, match="min_wrokers"):
        validate_config(prepare_config(config))
