"""A flat batch of tokens from several sequences, as every forward pass sees it.

Prefill chunks and decode tokens mix freely: each sequence contributes a contiguous segment of
new tokens whose positions continue its KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Segment:
    seq_id: int
    start: int  # offset of this sequence's tokens in the flat batch
    length: int  # new tokens this step
    first_position: int  # position of the first new token == tokens already in the cache


@dataclass(frozen=True, slots=True)
class TokenBatch:
    token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    segments: tuple[Segment, ...]

    @classmethod
    def build(cls, pieces: list[tuple[int, list[int], int]]) -> TokenBatch:
        """From (seq_id, new token ids, tokens already cached) triples."""
        ids: list[int] = []
        positions: list[int] = []
        segments = []
        for seq_id, tokens, cached in pieces:
            segments.append(Segment(seq_id, len(ids), len(tokens), cached))
            ids += tokens
            positions += range(cached, cached + len(tokens))
        return cls(
            torch.tensor(ids, dtype=torch.int64),
            torch.tensor(positions, dtype=torch.int64),
            tuple(segments),
        )

    def to(self, device: str | torch.device) -> TokenBatch:
        return TokenBatch(self.token_ids.to(device), self.positions.to(device), self.segments)

    def last_token_indices(self) -> torch.Tensor:
        return torch.tensor([s.start + s.length - 1 for s in self.segments], dtype=torch.int64)
