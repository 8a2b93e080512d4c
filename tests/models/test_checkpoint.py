from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from afd.models.checkpoint import Checkpoint, CheckpointError
from afd.models.config import load_config
from afd.models.moe import ExpertShard
from afd.models.tiny import make_tiny_model
from afd.models.weights import tensor_specs
from safetensors.torch import load_file, save_file


def _rewrite(model_dir: Path, edit) -> None:
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


@pytest.fixture()
def model_copy(tiny_model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model, tmp_path / "m"))


def test_missing_tensor_is_named(model_copy: Path) -> None:
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    _rewrite(model_copy, lambda t: t.pop(name))
    config = load_config(model_copy)
    with pytest.raises(CheckpointError, match=f"missing tensor '{name}'"):
        ExpertShard.load(Checkpoint(model_copy), config, [3], torch.float32)


def test_mis_shaped_tensor_is_named_with_both_shapes(model_copy: Path) -> None:
    name = "model.layers.0.self_attn.q_proj.weight"
    _rewrite(model_copy, lambda t: t.update({name: torch.zeros(3, 3)}))
    config = load_config(model_copy)
    specs = tensor_specs(config, ["attention"], layers=[0])
    with pytest.raises(
        CheckpointError, match=rf"tensor '{name}' has shape \[3, 3\], expected \[64, 64\]"
    ):
        Checkpoint(model_copy).load(specs, torch.float32)


def test_unexpected_tensor_is_named(model_copy: Path) -> None:
    name = "model.layers.0.mlp.experts.8.gate_proj.weight"  # the tiny model has experts 0..7
    _rewrite(model_copy, lambda t: t.update({name: torch.zeros(32, 64)}))
    with pytest.raises(CheckpointError, match=f"unexpected tensor '{name}'"):
        Checkpoint(model_copy).check_names(load_config(model_copy))


def test_only_the_requested_experts_are_read_and_converted(tiny_model: Path) -> None:
    config = load_config(tiny_model)
    checkpoint = Checkpoint(tiny_model)
    shard = ExpertShard.load(checkpoint, config, [1, 5], torch.bfloat16)
    per_expert = 3 * config.moe_intermediate_size * config.hidden_size * 4  # fp32 on disk
    assert checkpoint.bytes_read == 2 * per_expert * len(config.moe_layers)
    assert shard.layers[0].gate_EID.dtype == torch.bfloat16
    assert shard.layers[0].gate_EID.shape == (2, config.moe_intermediate_size, config.hidden_size)


def test_index_naming_a_missing_shard_is_clear(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path / "m", "olmoe", max_shard_bytes=64 * 1024)
    victim = sorted(model_dir.glob("model-*.safetensors"))[-1]
    victim.unlink()
    config = load_config(model_dir)
    with pytest.raises(CheckpointError, match=f"{victim.name}: shard named in"):
        Checkpoint(model_dir).load(tensor_specs(config), torch.float32)


def test_directory_without_weights_is_clear(tmp_path: Path) -> None:
    with pytest.raises(
        CheckpointError, match="neither model.safetensors nor model.safetensors.index.json"
    ):
        Checkpoint(tmp_path)
