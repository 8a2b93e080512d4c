"""The fixed-shape decode path (the GPU path's math, run here on the CPU) against the reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from afd.models.moe import grouped_experts
from afd.models.reference import ReferenceEngine
from afd.models.sampling import SamplingParams
from afd.models.static_decode import StaticDecoder

PROMPTS = ["Hello, world!", "The capital of France is", "one two three", "def add(a, b):"]
STARTS = [0, 3, 1, 6]  # slots join at different steps, so their positions differ every step
NEW_TOKENS = 8


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"])
def test_static_decode_matches_the_reference(arch: str, tiny_models: dict[str, Path]) -> None:
    ref = ReferenceEngine(tiny_models[arch])
    prompts = [ref.tokenizer.encode(p) for p in PROMPTS]
    want = [
        ref.generate(p, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)) for p in prompts
    ]
    decoder = StaticDecoder(ref.model, ref.dispatcher.shard, max_batch=len(prompts), max_len=64)
    fed = [list(p) for p in prompts]  # what each slot has been (or will be) fed
    got_ids: list[list[int]] = [[] for _ in prompts]
    got_logprobs: list[list[float]] = [[] for _ in prompts]
    for step in range(max(s + len(p) for s, p in zip(STARTS, prompts, strict=True)) + NEW_TOKENS):
        tokens, positions = [], []
        for b, start in enumerate(STARTS):
            pos = min(max(step - start, 0), len(fed[b]) - 1)  # idle slots rewrite position 0
            tokens.append(fed[b][pos])
            positions.append(pos)
        logits = decoder.step(torch.tensor(tokens), torch.tensor(positions))
        for b, start in enumerate(STARTS):
            pos = step - start
            if pos == len(fed[b]) - 1 and len(got_ids[b]) < NEW_TOKENS:
                logprobs = torch.log_softmax(logits[b].float(), -1)
                token = int(torch.argmax(logprobs))
                got_ids[b].append(token)
                got_logprobs[b].append(float(logprobs[token]))
                fed[b].append(token)
    for b, w in enumerate(want):
        assert got_ids[b] == w.token_ids, f"slot {b}"
        assert got_logprobs[b] == pytest.approx(w.logprobs, abs=1e-4)


def test_grouped_experts_skip_missing_ids(tiny_models: dict[str, Path]) -> None:
    ref = ReferenceEngine(tiny_models["qwen3_moe"])
    shard = ref.dispatcher.shard
    layer = ref.config.moe_layers[0]
    x = torch.randn(5, ref.config.hidden_size)
    ids = torch.tensor([[0, 3], [-1, 2], [7, -1], [-1, -1], [1, 1]])
    weights = torch.rand(5, 2)
    want = shard.forward(layer, x, ids, weights)
    assert torch.allclose(grouped_experts(shard.layers[layer], x, ids, weights), want, atol=1e-6)
