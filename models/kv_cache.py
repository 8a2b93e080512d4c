"""The KV cache interface the attention math writes through, and a contiguous implementation.

Attention nodes use a paged implementation of the same interface; the reference uses this one.
Shape legend: N = new tokens of one sequence, S = all its tokens, G = kv heads, Dh = head dim.
"""

from __future__ import annotations

from typing import Protocol

import torch


class KVCache(Protocol):
    def write_and_read(
        self,
        layer: int,
        seq_id: int,
        first_position: int,
        k_NGDh: torch.Tensor,
        v_NGDh: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores the new keys/values at their positions, returns all keys/values [S, G, Dh]."""
        ...


class ContiguousKVCache:
    """One growing tensor per (sequence, layer): simple and exact, the reference's cache."""

    def __init__(self) -> None:
        self._kv: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def write_and_read(
        self,
        layer: int,
        seq_id: int,
        first_position: int,
        k_NGDh: torch.Tensor,
        v_NGDh: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (seq_id, layer)
        if key in self._kv:
            k_old, v_old = self._kv[key]
            k_NGDh = torch.cat([k_old[:first_position], k_NGDh])
            v_NGDh = torch.cat([v_old[:first_position], v_NGDh])
        elif first_position != 0:
            raise ValueError(
                f"sequence {seq_id} layer {layer}: no cache to continue at {first_position}"
            )
        self._kv[key] = (k_NGDh, v_NGDh)
        return k_NGDh, v_NGDh
