"""The paged, batched attention gives the contiguous reference's logits for every architecture,
on batches that mix prefill chunks and decode tokens, across block boundaries, with blocks
freed by one sequence and reused by another."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from afd.models.attention import (
    ContiguousAttention,
    ContiguousKVCache,
    PagedAttention,
    PagedMetadata,
)
from afd.models.batch import TokenBatch
from afd.models.checkpoint import Checkpoint
from afd.models.config import load_config
from afd.models.model import AttentionSideModel
from afd.models.moe import ExpertShard, LocalDispatcher

BLOCK = 4
# (seq id, new tokens, tokens already cached) per step; seq 0 ends after step 2 and seq 3
# takes its blocks in step 3
STEPS = [
    [(0, [5, 9, 2, 7, 1], 0), (1, [3, 3, 8], 0)],
    [(0, [4], 5), (1, [6, 2, 2, 9], 3), (2, [1, 2, 3, 4, 5, 6], 0)],
    [(1, [7], 7), (3, [9, 8, 7, 6, 5, 4, 3, 2, 1], 0), (2, [2], 6)],
    [(3, [5], 9), (1, [4], 8), (2, [8], 7)],
]


class BlockTables:
    """A tiny allocator: blocks from a free list, given back when a sequence ends."""

    def __init__(self, num_blocks: int) -> None:
        self.free = list(range(num_blocks))
        self.tables: dict[int, list[int]] = {}

    def grow(self, seq: int, tokens: int) -> list[int]:
        table = self.tables.setdefault(seq, [])
        while len(table) * BLOCK < tokens:
            table.append(self.free.pop())
        return table

    def release(self, seq: int) -> None:
        self.free += reversed(self.tables.pop(seq))


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"])
def test_paged_attention_gives_the_reference_logits(
    tiny_models: dict[str, Path], arch: str
) -> None:
    config = load_config(tiny_models[arch])
    checkpoint = Checkpoint(tiny_models[arch])
    model = AttentionSideModel.load(checkpoint, config, torch.float32)
    experts = LocalDispatcher(
        ExpertShard.load(checkpoint, config, range(config.num_experts), torch.float32)
    )
    shape = (config.num_layers, 8, BLOCK, config.num_kv_heads, config.head_dim)
    k_cache, v_cache = torch.zeros(shape), torch.zeros(shape)
    reference_cache, tables = ContiguousKVCache(), BlockTables(8)
    reused = set()
    for i, pieces in enumerate(STEPS):
        if i == 2:
            freed = set(tables.tables[0])
            tables.release(0)
        batch = TokenBatch.build(pieces)
        meta = PagedMetadata.build(
            batch, [tables.grow(s, c + len(t)) for s, t, c in pieces], BLOCK, "cpu"
        )
        if i >= 2:
            reused |= freed & set(tables.tables[3])
        got = model.forward(batch, PagedAttention(k_cache, v_cache, meta), experts)
        want = model.forward(batch, ContiguousAttention(reference_cache, batch), experts)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert reused, "the scenario must reuse a freed block"


def test_padding_to_a_graph_bucket_changes_nothing(tiny_model: Path) -> None:
    config = load_config(tiny_model)
    checkpoint = Checkpoint(tiny_model)
    model = AttentionSideModel.load(checkpoint, config, torch.float32)
    experts = LocalDispatcher(
        ExpertShard.load(checkpoint, config, range(config.num_experts), torch.float32)
    )
    shape = (config.num_layers, 8, BLOCK, config.num_kv_heads, config.head_dim)
    outputs = []
    for blocks, queries in [(None, None), (6, 8)]:
        k_cache, v_cache, tables = torch.zeros(shape), torch.zeros(shape), BlockTables(8)
        for pieces in STEPS[:2]:
            batch = TokenBatch.build(pieces)
            table_list = [tables.grow(s, c + len(t)) for s, t, c in pieces]
            meta = PagedMetadata.build(batch, table_list, BLOCK, "cpu", blocks, queries)
            logits = model.forward(batch, PagedAttention(k_cache, v_cache, meta), experts)
        outputs.append(logits)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-6, atol=1e-6)
