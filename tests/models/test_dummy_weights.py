"""Dummy weights: made from config.json alone, the same on every node that holds a tensor, so a
deployment of any shape runs without a checkpoint and still agrees with itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from afd.attention_nodes.node import AttentionNode, AttentionNodeSettings
from afd.models.checkpoint import CheckpointError, open_checkpoint
from afd.models.config import load_config
from afd.models.messages import NewRequest
from afd.models.presets import PRESETS, write_preset
from afd.models.reference import ReferenceEngine
from afd.models.sampling import SamplingParams
from afd.models.weights import ALL_KINDS, tensor_specs


def test_a_tensor_is_the_same_wherever_it_is_made_and_norms_are_ones(tiny_model: Path) -> None:
    specs = tensor_specs(load_config(tiny_model), ALL_KINDS)
    a = open_checkpoint(tiny_model, "dummy").load(specs, torch.float32)
    b = open_checkpoint(tiny_model, "dummy").load(specs[::-1], torch.float32)
    assert all(torch.equal(a[s.name], b[s.name]) and a[s.name].shape == s.shape for s in specs)
    norms = [s.name for s in specs if s.name.endswith("norm.weight")]
    assert norms and all(bool((a[n] == 1).all()) for n in norms)
    others = [s.name for s in specs if s.name not in norms]
    assert all(0.01 < float(a[n].std()) < 0.03 for n in others if a[n].numel() > 100)


def test_a_dummy_checkpoint_needs_no_safetensors(tiny_model: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((tiny_model / "config.json").read_text())
    (tmp_path / "tokenizer.json").write_text((tiny_model / "tokenizer.json").read_text())
    ref = ReferenceEngine(tmp_path, load_format="dummy")
    node = AttentionNode(AttentionNodeSettings(0, str(tmp_path), load_format="dummy"), None)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    prompt = ref.tokenizer.encode("Hello there")
    tokens, step = [], 0
    while not tokens or tokens[-1].finish_reason is None:
        new = [NewRequest("r", prompt, params)] if step == 0 else []
        tokens += node.step(step, new, []).outputs
        step += 1
    assert [t.token_id for t in tokens] == ref.generate(prompt, params).token_ids
    with pytest.raises(CheckpointError, match="model.safetensors"):
        ReferenceEngine(tmp_path)  # the real format still wants its files


def test_presets_write_a_loadable_config(tmp_path: Path) -> None:
    for name, raw in PRESETS.items():
        config = load_config(write_preset(name, tmp_path / name, layers=2))
        assert (config.num_layers, config.num_experts) == (2, raw["num_experts"])
    with pytest.raises(ValueError, match="unknown model preset 'gpt'"):
        write_preset("gpt", tmp_path / "x")
    assert (
        json.loads((tmp_path / "qwen3-30b-a3b" / "config.json").read_text())["hidden_size"] == 2048
    )
