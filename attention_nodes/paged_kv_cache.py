"""The paged KV cache of an attention node: fixed-size blocks from a free list, per-sequence
block tables. Implements `afd.models.kv_cache.KVCache`, so the model's attention writes through it.

Shape legend: L = layers, NB = blocks, BS = block size, G = kv heads, Dh = head dim,
N = new tokens, S = all tokens of a sequence.
"""

from __future__ import annotations

import torch


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
        shape = (num_layers, num_blocks, block_size, kv_heads, head_dim)
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

    def write_and_read(
        self,
        layer: int,
        seq_id: int,
        first_position: int,
        k_NGDh: torch.Tensor,
        v_NGDh: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        table = torch.tensor(self.tables[seq_id], dtype=torch.int64, device=k_NGDh.device)
        end = first_position + k_NGDh.shape[0]
        positions = torch.arange(first_position, end, device=k_NGDh.device)
        blocks, offsets = table[positions // self.block_size], positions % self.block_size
        k_layer, v_layer = self.k_LNBBSGDh[layer], self.v_LNBBSGDh[layer]
        k_layer[blocks, offsets] = k_NGDh
        v_layer[blocks, offsets] = v_NGDh
        used = table[: -(-end // self.block_size)]
        g, dh = k_NGDh.shape[1:]
        return k_layer[used].reshape(-1, g, dh)[:end], v_layer[used].reshape(-1, g, dh)[:end]
