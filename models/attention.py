"""Attention over a KV cache for one batch: the contiguous reference and the paged, batched one.

The model asks a `BatchAttention` for one thing per layer: store the batch's new keys and
values, and attend the new queries over every cached key of their sequence. What it is bound to
is built once per batch (per micro-batch), not per layer:

- `ContiguousAttention` — one growing tensor per sequence, a loop over sequences: the oracle.
- `PagedAttention` — fixed-size blocks of a preallocated cache; per-step metadata (slot of each
  new token, block table of each sequence, query rows and positions) as device tensors, so a
  layer's attention is a fixed handful of batched ops whatever the batch holds: prefill chunks
  and decode tokens mix, and fixed shapes let a CUDA graph capture it.

Shape legend: T = new tokens of the batch, B = sequences, Q = most new tokens of one sequence,
M = blocks per sequence (the longest), BS = block size, S = M·BS keys, H = query heads,
G = kv heads, r = H/G, Dh = head dim, NB = cache blocks, L = layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from afd.models.batch import TokenBatch
from afd.models.layers import Rope, causal_attention


class BatchAttention(Protocol):
    def attend(
        self, layer: int, q_THDh: torch.Tensor, k_TGDh: torch.Tensor, v_TGDh: torch.Tensor
    ) -> torch.Tensor:
        """Stores the new keys/values, returns each new query's attention output [T, H, Dh]."""
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


class ContiguousAttention:
    """The reference: each sequence's keys in one contiguous tensor, one sequence at a time."""

    def __init__(self, cache: ContiguousKVCache, batch: TokenBatch) -> None:
        self.cache, self.batch = cache, batch

    def attend(
        self, layer: int, q_THDh: torch.Tensor, k_TGDh: torch.Tensor, v_TGDh: torch.Tensor
    ) -> torch.Tensor:
        out_THDh = torch.empty_like(q_THDh)
        for s in self.batch.segments:
            rows = slice(s.start, s.start + s.length)
            k_all, v_all = self.cache.write_and_read(
                layer, s.seq_id, s.first_position, k_TGDh[rows], v_TGDh[rows]
            )
            out_THDh[rows] = causal_attention(
                q_THDh[rows], k_all, v_all, self.batch.positions[rows]
            )
        return out_THDh


@dataclass(frozen=True, slots=True)
class PagedMetadata:
    """Where a batch's tokens sit in a paged cache. All tensors on the cache's device."""

    slot_T: torch.Tensor  # [T] int64: block·BS + offset where each new token's K/V goes
    block_table_BM: torch.Tensor  # [B, M] int64: each sequence's blocks, padded with block 0
    query_row_BQ: torch.Tensor  # [B, Q] int64: row of each sequence's q-th new token; T = none
    query_pos_BQ: torch.Tensor  # [B, Q] int64: its position (0 for padding, which is dropped)

    @classmethod
    def build(
        cls,
        batch: TokenBatch,
        tables: list[list[int]],
        block_size: int,
        device: torch.device | str,
        blocks: int | None = None,
        queries: int | None = None,
    ) -> PagedMetadata:
        """From the batch's segments and each segment's block table (host lists, one
        transfer). `blocks`/`queries` pad M and Q (a CUDA graph's bucket); default: tight."""
        segments = batch.segments
        M = blocks or max((len(t) for t in tables), default=1)
        Q = queries or max((s.length for s in segments), default=1)
        T = sum(s.length for s in segments)
        slots, table_rows, rows, positions = [], [], [], []
        for s, table in zip(segments, tables, strict=True):
            for p in range(s.first_position, s.first_position + s.length):
                slots.append(table[p // block_size] * block_size + p % block_size)
            table_rows.append(table + [0] * (M - len(table)))
            pad = Q - s.length
            rows.append(list(range(s.start, s.start + s.length)) + [T] * pad)
            positions.append(list(range(s.first_position, s.first_position + s.length)) + [0] * pad)
        packed = torch.tensor(
            [*slots, *(x for r in table_rows for x in r), *(x for r in rows for x in r)]
            + [x for r in positions for x in r],
            dtype=torch.int64,
        ).to(device, non_blocking=True)
        B = len(segments)
        slot_T, table_BM, row_BQ, pos_BQ = packed.split([T, B * M, B * Q, B * Q])
        return cls(slot_T, table_BM.view(B, M), row_BQ.view(B, Q), pos_BQ.view(B, Q))


class PagedAttention:
    """`BatchAttention` over a paged cache `[L, NB, BS, G, Dh]` for one batch's metadata. What
    every layer shares (the key slots to gather, the causal mask) is made at the first layer."""

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PagedMetadata) -> None:
        self.k_cache, self.v_cache, self.meta = k_cache, v_cache, meta
        self._shared: _SharedIndices | None = None

    def attend(
        self, layer: int, q_THDh: torch.Tensor, k_TGDh: torch.Tensor, v_TGDh: torch.Tensor
    ) -> torch.Tensor:
        k_flat, v_flat = _flat(self.k_cache[layer]), _flat(self.v_cache[layer])
        k_flat.index_copy_(0, self.meta.slot_T, k_TGDh)
        v_flat.index_copy_(0, self.meta.slot_T, v_TGDh)
        return attend_cached(k_flat, v_flat, self.meta, self._shared_for(q_THDh), q_THDh)

    def attend_projected(
        self,
        layer: int,
        qkv_TX: torch.Tensor,
        positions_T: torch.Tensor,
        qk_norms: tuple[torch.Tensor, torch.Tensor] | None,
        eps: float,
        rope: Rope,
    ) -> torch.Tensor:
        """`attend` from the fused q/k/v projection, through the kernels: per-head q/k norm
        (when `qk_norms` is given), RoPE and the cache write in one kernel, then the paged
        decode kernel when every sequence brings one token (a mixed batch attends in torch)."""
        from afd.models.kernels.decode_attention import paged_decode_attention
        from afd.models.kernels.small_ops import qk_norm_rope_store

        k_cache, v_cache = self.k_cache[layer], self.v_cache[layer]
        q_norm, k_norm = qk_norms if qk_norms is not None else (None, None)
        inv_freq = rope.inv_freq_on(qkv_TX.device)
        q_THDh = qk_norm_rope_store(
            qkv_TX, positions_T, self.meta.slot_T, q_norm, k_norm, eps, inv_freq, rope.scale,
            k_cache, v_cache,
        )  # fmt: skip
        if self.meta.query_row_BQ.shape[1] == 1:  # decode only: row b is sequence b
            return paged_decode_attention(
                q_THDh, k_cache, v_cache, self.meta.block_table_BM, self.meta.query_pos_BQ[:, 0]
            )
        shared = self._shared_for(q_THDh)
        return attend_cached(_flat(k_cache), _flat(v_cache), self.meta, shared, q_THDh)

    def _shared_for(self, q_THDh: torch.Tensor) -> _SharedIndices:
        """The batch's gather slots and mask, made at the first layer that needs them."""
        if self._shared is None:
            BS, G = self.k_cache.shape[2], self.k_cache.shape[3]
            self._shared = _SharedIndices.of(self.meta, BS, q_THDh.shape[1] // G)
        return self._shared


@dataclass(frozen=True, slots=True)
class _SharedIndices:
    slots_BS: torch.Tensor  # [B, S] cache slot of each sequence's s-th key
    masked_BxS: torch.Tensor  # [B, 1, r·Q, S] True where a key lies past the query
    rows_x: torch.Tensor  # [B·Q] the flat row of each padded query (T for padding)

    @classmethod
    def of(cls, meta: PagedMetadata, block_size: int, r: int) -> _SharedIndices:
        B, Q = meta.query_row_BQ.shape
        M = meta.block_table_BM.shape[1]
        S = M * block_size
        device = meta.slot_T.device
        offsets = torch.arange(block_size, device=device)
        slots_BS = (meta.block_table_BM[:, :, None] * block_size + offsets).reshape(B, S)
        masked_BQS = torch.arange(S, device=device)[None, None, :] > meta.query_pos_BQ[:, :, None]
        masked_BxS = masked_BQS[:, None, :, :].expand(B, r, Q, S).reshape(B, 1, r * Q, S)
        return cls(slots_BS, masked_BxS, meta.query_row_BQ.reshape(-1))


def _flat(cache_NBBSGDh: torch.Tensor) -> torch.Tensor:
    """One layer's cache as [slots, G, Dh] (a view)."""
    return cache_NBBSGDh.flatten(0, 1)


def attend_cached(
    k_flat: torch.Tensor,
    v_flat: torch.Tensor,
    meta: PagedMetadata,
    shared: _SharedIndices,
    q_THDh: torch.Tensor,
) -> torch.Tensor:
    """Every sequence's queries over its blocks at once (keys past a query's position
    masked); the new keys are already in the cache. The same arithmetic as
    `causal_attention` per sequence, so results match the reference to rounding."""
    G, Dh = k_flat.shape[1], k_flat.shape[2]
    T, H, _ = q_THDh.shape
    B, Q = meta.query_row_BQ.shape
    r = H // G
    k_BGSDh = k_flat[shared.slots_BS].permute(0, 2, 1, 3)
    v_BGSDh = v_flat[shared.slots_BS].permute(0, 2, 1, 3)
    q_padded = torch.cat([q_THDh, q_THDh.new_zeros(1, H, Dh)])  # row T: padding queries
    q_BGrQDh = q_padded[shared.rows_x].view(B, Q, G, r, Dh).permute(0, 2, 3, 1, 4)
    q_BGxDh = q_BGrQDh.reshape(B, G, r * Q, Dh)
    scores = torch.matmul(q_BGxDh, k_BGSDh.transpose(2, 3)) * (Dh**-0.5)  # [B, G, rQ, S]
    scores = scores.masked_fill(shared.masked_BxS, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q_THDh.dtype)
    out_BGrQDh = torch.matmul(probs, v_BGSDh).view(B, G, r, Q, Dh)
    out_BQHDh = out_BGrQDh.permute(0, 3, 1, 2, 4).reshape(B * Q, H, Dh)
    out_THDh = q_THDh.new_empty(T + 1, H, Dh)
    out_THDh.index_copy_(0, shared.rows_x, out_BQHDh)  # padding lands on row T
    return out_THDh[:T]
