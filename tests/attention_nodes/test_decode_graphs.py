"""What a decode graph replays, run eagerly on the CPU: the packed inputs padded to a batch and
block bucket give the real rows the logits of the unpadded eager step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from afd.attention_nodes.decode_graphs import (
    batch_bucket,
    block_bucket,
    decode_forward,
    decode_views,
    micro_batch_bucket,
    pack_decode_inputs,
    real_rows,
)
from afd.attention_nodes.paged_kv_cache import PagedKVCache
from afd.models.batch import TokenBatch
from afd.models.checkpoint import Checkpoint
from afd.models.config import load_config
from afd.models.model import AttentionSideModel
from afd.models.moe import ExpertShard, LocalDispatcher


def test_buckets() -> None:
    assert [batch_bucket(n) for n in (1, 3, 5, 32, 33, 64, 65, 100)] == [
        1,
        4,
        8,
        32,
        64,
        64,
        96,
        128,
    ]
    assert [block_bucket(n, 16) for n in (1, 2, 3, 9, 40)] == [1, 2, 4, 16, 16]
    # with micro-batches: a multiple of m, sequences first, padding in the last slices
    assert [micro_batch_bucket(n, 2) for n in (1, 2, 3, 33)] == [2, 2, 4, 64]
    assert [micro_batch_bucket(n, 3) for n in (1, 4, 8)] == [3, 6, 9]
    assert real_rows(1, 2) == [1, 0] and real_rows(3, 2) == [2, 1] and real_rows(5, 3) == [3, 2, 0]
    assert real_rows(8, 1) == [8] and sum(real_rows(33, 2)) == 33


@pytest.mark.parametrize(
    ("Bp", "Mp", "micro_batches"),
    [(3, 4, 1), (4, 4, 1), (8, 8, 1), (4, 4, 2), (6, 4, 3), (8, 4, 4)],
)
def test_padded_decode_inputs_give_the_eager_logits(
    tiny_model: Path, Bp: int, Mp: int, micro_batches: int
) -> None:
    """With micro-batches the rows are cut into equal slices run in ping-pong order (the
    last slices padding only, for some): each token's arithmetic stays that of the eager step."""
    config = load_config(tiny_model)
    checkpoint = Checkpoint(tiny_model)
    model = AttentionSideModel.load(checkpoint, config, torch.float32)
    experts = LocalDispatcher(
        ExpertShard.load(checkpoint, config, range(config.num_experts), torch.float32)
    )
    cache = PagedKVCache(
        config.num_layers, 32, 4, config.num_kv_heads, config.head_dim, torch.float32
    )
    prompts = {0: [5, 9, 2, 7, 1, 3], 1: [3, 3, 8], 2: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]}
    for seq, ids in prompts.items():
        assert cache.reserve(seq, len(ids) + 1)
    prefill = TokenBatch.build([(s, ids, 0) for s, ids in prompts.items()])
    model.forward(prefill, cache.attention(prefill), experts)
    decode = TokenBatch.build([(s, [7 + s], len(ids)) for s, ids in prompts.items()])
    want = model.forward(decode, cache.attention(decode), experts)
    tables = [cache.tables[s] for s in prompts]
    inputs = pack_decode_inputs(
        [7 + s for s in prompts],
        [len(ids) for ids in prompts.values()],
        tables,
        4,
        cache.scratch_block,
        Bp,
        Mp,
    )
    batch, meta = decode_views(inputs, Bp, Mp)
    got = decode_forward(
        model, experts, cache.k_LNBBSGDh, cache.v_LNBBSGDh, batch, meta, micro_batches
    )
    assert got.shape[0] == Bp
    torch.testing.assert_close(got[: len(prompts)], want, rtol=1e-5, atol=1e-5)


def test_rows_that_do_not_split_evenly_are_refused(tiny_model: Path) -> None:
    config = load_config(tiny_model)
    checkpoint = Checkpoint(tiny_model)
    model = AttentionSideModel.load(checkpoint, config, torch.float32)
    cache = PagedKVCache(
        config.num_layers, 8, 4, config.num_kv_heads, config.head_dim, torch.float32
    )
    batch, meta = decode_views(pack_decode_inputs([], [], [], 4, cache.scratch_block, 3, 1), 3, 1)
    with pytest.raises(ValueError, match="3 rows do not split into 2"):
        decode_forward(model, None, cache.k_LNBBSGDh, cache.v_LNBBSGDh, batch, meta, 2)  # type: ignore[arg-type]
