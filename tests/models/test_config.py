from __future__ import annotations

import json
from pathlib import Path

import pytest
from afd.models.config import ConfigError, load_config, parse_config
from afd.models.tiny import tiny_config


def _write(tmp_path: Path, raw: dict) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


def test_unsupported_model_type_names_the_field_and_the_supported_types(tmp_path: Path) -> None:
    raw = {**tiny_config("qwen3_moe", 100, 2, 4, 2, 32), "model_type": "llama"}
    with pytest.raises(
        ConfigError,
        match=r"config.json: field 'model_type' is 'llama'; supported: qwen3_moe, qwen2_moe, mixtral, olmoe",
    ):
        load_config(_write(tmp_path, raw))


@pytest.mark.parametrize(
    ("arch", "field"),
    [
        ("mixtral", "num_local_experts"),
        ("qwen3_moe", "moe_intermediate_size"),
        ("qwen2_moe", "shared_expert_intermediate_size"),
        ("olmoe", "hidden_size"),
    ],
)
def test_missing_field_is_named_with_the_file(arch: str, field: str, tmp_path: Path) -> None:
    raw = tiny_config(arch, 100, 2, 4, 2, 32)
    del raw[field]
    with pytest.raises(ConfigError, match=rf"{tmp_path}/config.json: missing field '{field}'"):
        load_config(_write(tmp_path, raw))


def test_missing_config_and_bad_json_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)


def test_unsupported_rope_type_is_rejected() -> None:
    raw = {
        **tiny_config("qwen3_moe", 100, 2, 4, 2, 32),
        "rope_scaling": {"rope_type": "longrope", "factor": 2.0},
    }
    with pytest.raises(
        ConfigError, match="rope type 'longrope' is not supported; supported: default, linear, yarn"
    ):
        parse_config(raw)


def test_qwen2_moe_dense_layers_follow_mlp_only_layers_and_sparse_step() -> None:
    raw = {
        **tiny_config("qwen2_moe", 100, 6, 4, 2, 32),
        "mlp_only_layers": [0],
        "decoder_sparse_step": 2,
    }
    config = parse_config(raw)
    assert config.dense_layers == {
        0,
        2,
        4,
    }  # layer 0 listed; even layers are not on the sparse step
    assert config.moe_layers == [1, 3, 5]
    assert config.shared_expert_size > 0


def test_transformers_v5_rope_parameters_are_read() -> None:
    raw = tiny_config("mixtral", 100, 2, 4, 2, 32)
    del raw["rope_theta"]
    raw["rope_parameters"] = {"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0}
    rope = parse_config(raw).rope
    assert (rope.theta, rope.rope_type, rope.factor) == (5e5, "linear", 2.0)


def test_mixtral_normalises_top_k_and_qwen3_follows_norm_topk_prob() -> None:
    assert parse_config(tiny_config("mixtral", 100, 2, 4, 2, 32)).renormalize_topk
    assert not parse_config(
        {**tiny_config("qwen3_moe", 100, 2, 4, 2, 32), "norm_topk_prob": False}
    ).renormalize_topk
