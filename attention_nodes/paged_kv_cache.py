"""The paged KV cache of an attention node: fixed-size blocks from a free list, per-sequence
block tables. `attention(batch)` binds it to one batch for the model's attention
(`afd.models.attention.PagedAttention`).

Shape legend: L = layers, NB = blocks, BS = block size, G = kv heads, Dh = head dim,
N = new tokens, S = all tokens of a sequence.
"""

from __future__ import annotations

import torch
from afd.models.attention import PagedAttention, PagedMetadata
from afd.models.batch import TokenBatch


class BlockAllocator:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def free(self) -> int:
        return len(self._free)

    def take(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV blocks, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def give_back(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class PagedKVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
    ) -> None:
        # one block more than the allocator hands out: the scratch block, where the padding
        # rows of a CUDA graph's batch write
        shape = (num_layers, num_blocks + 1, block_size, kv_heads, head_dim)
        self.scratch_block = num_blocks
        self.k_LNBBSGDh = torch.zeros(shape, dtype=dtype, device=device)
        self.v_LNBBSGDh = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.tables: dict[int, list[int]] = {}

    def blocks_needed(self, seq_id: int, total_tokens: int) -> int:
        have = len(self.tables.get(seq_id, ()))
        return max(0, -(-total_tokens // self.block_size) - have)

    def reserve(self, seq_id: int, total_tokens: int) -> bool:
        """Makes room for `total_tokens` tokens of the sequence; False (and no change) if full."""
        need = self.blocks_needed(seq_id, total_tokens)
        if need > self.allocator.free:
            return False
        self.tables.setdefault(seq_id, []).extend(self.allocator.take(need))
        return True

    def free(self, seq_id: int) -> None:
        self.allocator.give_back(self.tables.pop(seq_id, []))

    def attention(
        self, batch: TokenBatch, blocks: int | None = None, queries: int | None = None
    ) -> PagedAttention:
        """The batch's attention over this cache: its metadata built once, for every layer.
        `blocks`/`queries` pad the metadata's shapes (a CUDA graph's bucket)."""
        tables = [self.tables[s.seq_id] for s in batch.segments]
        meta = PagedMetadata.build(
            batch, tables, self.block_size, self.k_LNBBSGDh.device, blocks, queries
        )
        return PagedAttention(self.k_LNBBSGDh, self.v_LNBBSGDh, meta)
