"""CUDA graphs for a colocated node's decode-only steps: the whole forward replayed, one graph
per (batch bucket, block bucket).

A decode step of B sequences is padded to the next batch bucket (1, 2, 4, 8, 16, 32, then
multiples of 32) and the longest block table to the next power of two, so a handful of graphs
serve every step; the first step of a shape captures its graph. Padding rows decode token 0 at
position 0 into the cache's scratch block and are dropped. The graph runs exactly the eager
code (`AttentionSideModel` with `PagedAttention` and the local dispatcher): inputs are copied
into the graph's static tensors, nothing else changes. Steps with prefill chunks run eagerly.

Shape legend: B = sequences, Bp = the batch bucket, M = blocks per sequence, V = vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from afd.models.attention import PagedAttention, PagedMetadata
from afd.models.batch import TokenBatch
from afd.models.model import AttentionSideModel
from afd.models.moe import Dispatcher

SMALL_BUCKETS = (1, 2, 4, 8, 16, 32)


def batch_bucket(n: int) -> int:
    return next((b for b in SMALL_BUCKETS if b >= n), -(-n // 32) * 32)


def block_bucket(n: int, most: int) -> int:
    return min(most, 1 << max(0, n - 1).bit_length())


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    batch: TokenBatch  # static token ids and positions [Bp]
    meta: PagedMetadata  # static slots, block tables, query rows and positions
    logits_BV: torch.Tensor  # static output, fp32


class DecodeGraphs:
    """Replays a captured forward for decode-only batches on CUDA."""

    def __init__(
        self,
        model: AttentionSideModel,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        dispatcher: Dispatcher,
        scratch_block: int,
        max_blocks: int,
    ) -> None:
        self.model, self.dispatcher = model, dispatcher
        self.k_cache, self.v_cache = k_cache, v_cache
        self.block_size = k_cache.shape[2]
        self.scratch_block = scratch_block  # never handed out: padding rows write here
        self.max_blocks = max_blocks
        self.device = k_cache.device
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.replays = 0

    def run(self, batch: TokenBatch, tables: list[list[int]]) -> torch.Tensor:
        """Logits [B, V] of a batch whose every segment is one decode token."""
        B = len(batch.segments)
        Bp = batch_bucket(B)
        Mp = block_bucket(max(len(t) for t in tables), self.max_blocks)
        g = self.graphs.get((Bp, Mp)) or self._capture(Bp, Mp)
        padded = self._padded(batch, tables, Bp, Mp)
        g.batch.token_ids.copy_(padded.batch.token_ids, non_blocking=True)
        g.batch.positions.copy_(padded.batch.positions, non_blocking=True)
        for static, new in zip(_tensors(g.meta), _tensors(padded.meta), strict=True):
            static.copy_(new, non_blocking=True)
        g.graph.replay()
        self.replays += 1
        return g.logits_BV[:B]

    def _padded(self, batch: TokenBatch, tables: list[list[int]], Bp: int, Mp: int) -> _Inputs:
        pad = Bp - len(batch.segments)
        pieces = [(s.seq_id, [0], s.first_position) for s in batch.segments]
        token_ids = torch.cat([batch.token_ids.cpu(), torch.zeros(pad, dtype=torch.int64)])
        padded_batch = TokenBatch.build(pieces + [(-1 - i, [0], 0) for i in range(pad)])
        padded_batch = TokenBatch(token_ids, padded_batch.positions, padded_batch.segments)
        all_tables = tables + [[self.scratch_block]] * pad
        meta = PagedMetadata.build(padded_batch, all_tables, self.block_size, self.device, Mp, 1)
        return _Inputs(padded_batch.to(self.device), meta)

    def _forward(self, batch: TokenBatch, meta: PagedMetadata) -> torch.Tensor:
        attn = PagedAttention(self.k_cache, self.v_cache, meta)
        h_TD = self.model.embed(batch)
        for layer in range(self.model.config.num_layers):
            routed = self.model.pre_experts(layer, h_TD, batch, attn)
            experts_TD = None
            if self.model.config.is_moe_layer(layer):
                plan = self.dispatcher.dispatch(
                    0, layer, 0, routed.x_TD, routed.ids_TK, routed.weights_TK
                )
                experts_TD = self.dispatcher.combine(plan, routed.x_TD)
            h_TD = self.model.post_experts(layer, routed, experts_TD)
        rows = torch.arange(h_TD.shape[0], device=h_TD.device)
        return self.model.logits(h_TD, rows)

    def _capture(self, Bp: int, Mp: int) -> _Graph:
        """Warms the shapes up on a side stream, then captures (padding rows only: harmless)."""
        batch = TokenBatch.build([(-1 - i, [0], 0) for i in range(Bp)])
        inputs = self._padded(TokenBatch.build([]), [], Bp, Mp)
        static_batch, meta = batch.to(self.device), inputs.meta
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(static_batch, meta)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits_BV = self._forward(static_batch, meta)
        g = _Graph(graph, static_batch, meta, logits_BV)
        self.graphs[Bp, Mp] = g
        return g


@dataclass(frozen=True, slots=True)
class _Inputs:
    batch: TokenBatch
    meta: PagedMetadata


def _tensors(meta: PagedMetadata) -> tuple[torch.Tensor, ...]:
    return (meta.slot_T, meta.block_table_BM, meta.query_row_BQ, meta.query_pos_BQ)
