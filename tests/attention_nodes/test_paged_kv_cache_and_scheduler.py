from __future__ import annotations

import torch
from afd.attention_nodes.node import split_micro_batches
from afd.attention_nodes.paged_kv_cache import PagedKVCache
from afd.attention_nodes.scheduler import Chunk, ScheduledSequence, Scheduler
from afd.models.config import parse_config
from afd.models.request_state import RequestState
from afd.models.sampling import SamplingParams
from afd.models.tiny import tiny_config


def test_blocks_are_reserved_per_block_and_given_back_whole() -> None:
    paged = PagedKVCache(2, 16, 4, 2, 8, torch.float32)
    for total in (5, 6, 7, 15):  # a prefill, decodes, a chunk crossing block boundaries
        assert paged.reserve(3, total)
    assert len(paged.tables[3]) == 4  # 15 tokens in blocks of 4
    assert not paged.reserve(4, 13 * 4 + 1)  # one block more than is free: no change
    assert paged.allocator.free == 12 and 4 not in paged.tables
    paged.free(3)
    assert paged.allocator.free == 16


def _sequence(seq_id: int, prompt_len: int, tokenizer) -> ScheduledSequence:
    config = parse_config(tiny_config("qwen3_moe", 384, 2, 4, 2, 32))
    state = RequestState(
        f"r{seq_id}",
        list(range(1, prompt_len + 1)),
        SamplingParams(max_tokens=50),
        tokenizer,
        config,
    )
    return ScheduledSequence(seq_id, state)


def test_full_cache_preempts_the_youngest_and_keeps_the_oldest(tiny_model) -> None:
    from afd.models.tokenizer import Tokenizer

    tokenizer = Tokenizer(tiny_model)
    cache = PagedKVCache(1, 4, 4, 1, 4, torch.float32)  # room for 16 tokens
    scheduler = Scheduler(cache, max_batch_tokens=64, max_running=8)
    old, young = _sequence(0, 8, tokenizer), _sequence(1, 8, tokenizer)
    scheduler.add(old)
    scheduler.add(young)
    chunks = scheduler.schedule()
    assert [(c.seq.request_id, c.num_tokens) for c in chunks] == [("r0", 8), ("r1", 8)]
    for c in chunks:
        c.seq.num_computed += c.num_tokens
        c.seq.state.output_ids.append(7)  # as if a token was sampled
    chunks = scheduler.schedule()  # both need a third block; only one can have it
    assert [c.seq.request_id for c in chunks] == ["r0"]
    assert list(scheduler.waiting) == [young] and young.num_computed == 0
    assert young.pending == young.state.all_ids  # recomputes prompt and output so far
    assert scheduler.preemptions == 1


def test_token_budget_caps_a_step_and_prefill_continues_in_chunks(tiny_model) -> None:
    from afd.models.tokenizer import Tokenizer

    seq = _sequence(0, 20, Tokenizer(tiny_model))
    scheduler = Scheduler(
        PagedKVCache(1, 16, 4, 1, 4, torch.float32), max_batch_tokens=8, max_running=8
    )
    scheduler.add(seq)
    sizes = []
    for _ in range(3):
        (chunk,) = scheduler.schedule()
        sizes.append((chunk.num_tokens, chunk.samples))
        seq.num_computed += chunk.num_tokens
    assert sizes == [(8, False), (8, False), (4, True)]


def test_micro_batches_balance_tokens_without_splitting_a_sequence(tiny_model) -> None:
    from afd.models.tokenizer import Tokenizer

    tokenizer = Tokenizer(tiny_model)
    chunks = [Chunk(_sequence(i, n, tokenizer), n) for i, n in enumerate((3, 5, 1, 1))]
    groups = split_micro_batches(chunks, 2)
    assert [[c.num_tokens for c in g] for g in groups] == [[3], [5, 1, 1]]
    assert [c for g in groups for c in g] == chunks  # every chunk once, in order, whole
    assert split_micro_batches([], 3) == [[], [], []]
    ones = [Chunk(_sequence(i, 1, tokenizer), 1) for i in range(6)]
    assert [len(g) for g in split_micro_batches(ones, 3)] == [2, 2, 2]
