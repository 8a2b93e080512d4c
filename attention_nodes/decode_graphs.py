"""CUDA graphs for decode-only steps: the whole forward replayed, one graph per (batch bucket,
block bucket). Colocated, or disaggregated over the device lane, whose exchange is kernels too:
with m micro-batches the graph holds the ping-pong pipeline over m equal slices of the bucket
(sequence rows j·Bp/m .. (j+1)·Bp/m - 1 in micro-batch j; the bucket is a multiple of m).

A decode step of B sequences is padded to the next batch bucket (1, 2, 4, 8, 16, 32, then
multiples of 32) and the longest block table to the next power of two, so a handful of graphs
serve every step; the first step of a shape captures its graph. Padding rows decode token 0 at
position 0 into the cache's scratch block and are dropped. The graph runs exactly the eager
code (`AttentionSideModel` with `PagedAttention` and the node's dispatcher): inputs are copied
into the graph's static tensors, nothing else changes. Steps with prefill chunks run eagerly.

The inputs go over in one asynchronous copy and the token ids may come from the device (the
tokens the step before sampled, not yet read by the host), so a node can launch step n+1
before it reads step n's tokens (`AttentionNode`'s decode-ahead). Without CUDA graphs (CPU)
the same packed decode step runs eagerly (`capture=False`), so one path serves both.

Shape legend: B = sequences, Bp = the batch bucket, M = blocks per sequence, V = vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from afd.attention_nodes.pipeline import ping_pong
from afd.models.attention import PagedAttention, PagedMetadata
from afd.models.batch import TokenBatch
from afd.models.model import AttentionSideModel
from afd.models.moe import Dispatcher
from afd.models.step_trace import StepTrace

SMALL_BUCKETS = (1, 2, 4, 8, 16, 32)


def batch_bucket(n: int) -> int:
    return next((b for b in SMALL_BUCKETS if b >= n), -(-n // 32) * 32)


def block_bucket(n: int, most: int) -> int:
    return min(most, 1 << max(0, n - 1).bit_length())


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs_N: torch.Tensor  # every input, packed: one host-to-device copy a step
    logits_BV: torch.Tensor  # static output, fp32
    trace: StepTrace | None  # stamped by each replay, for a graph of traced steps


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
        micro_batches: int = 1,
        capture: bool = True,
    ) -> None:
        """`capture` False: the same decode step, run eagerly from the same packed inputs
        (where there are no CUDA graphs, for a node that decodes ahead)."""
        self.model, self.dispatcher = model, dispatcher
        self.capture = capture
        self.micro_batches = micro_batches
        self.k_cache, self.v_cache = k_cache, v_cache
        self.block_size = k_cache.shape[2]
        self.scratch_block = scratch_block  # never handed out: padding rows write here
        self.max_blocks = max_blocks
        self.device = k_cache.device
        self.graphs: dict[tuple[int, int, bool], _Graph] = {}  # (Bp, Mp, traced)
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.replays = 0
        self.last_trace: StepTrace | None = None  # the last replay's, when it was traced

    def prepare(self, batch_sizes: list[int], context: int) -> None:
        """Captures now the graphs that decode steps of these batch sizes will need up to
        `context` tokens per sequence, so that no step pays for a capture later (a capture
        runs the forward three times)."""
        if not self.capture:
            return
        blocks = -(-context // self.block_size)
        for B in sorted({self.bucket(b) for b in batch_sizes}):
            for M in sorted({block_bucket(m, self.max_blocks) for m in range(1, blocks + 1)}):
                if (B, M, False) not in self.graphs:
                    self._capture(B, M, False)

    def bucket(self, batch: int) -> int:
        return micro_batch_bucket(batch, self.micro_batches)

    def rows_per_micro_batch(self, batch: int) -> list[int]:
        """What each micro-batch of the graph for `batch` sequences carries (padding included)."""
        return [self.bucket(batch) // self.micro_batches] * self.micro_batches

    def real_rows_per_micro_batch(self, batch: int) -> list[int]:
        return real_rows(batch, self.micro_batches)

    def clear(self) -> None:
        """Drops every graph: a peer's slots moved (a restarted expert node), and the graphs
        hold the old addresses. The next steps capture again."""
        self.graphs.clear()

    def run(
        self,
        token_ids: list[int] | torch.Tensor,
        positions: list[int],
        tables: list[list[int]],
        traced: bool = False,
    ) -> torch.Tensor:
        """Logits [B, V] of B sequences decoding one token each: `token_ids[b]` at
        `positions[b]`, the sequence's blocks in `tables[b]` (already reserved). Token ids on
        the device (sampled by the step before, not read yet) are copied in on the device;
        the rest of the inputs go over in one asynchronous copy, so the host never waits.
        `traced`: replays a graph that also stamps a step trace (`last_trace`), captured for
        traced steps, so that a trace shows the graphed step as it serves."""
        B = len(positions)
        Bp = self.bucket(B)
        Mp = block_bucket(max(len(t) for t in tables), self.max_blocks)
        device_ids = token_ids if isinstance(token_ids, torch.Tensor) else None
        inputs = pack_decode_inputs(
            [0] * B if device_ids is not None else list(token_ids),
            positions,
            tables,
            self.block_size,
            self.scratch_block,
            Bp,
            Mp,
        )
        if self.device.type == "cuda":
            inputs = inputs.pin_memory()  # its block is not reused before the copy is done
        if not self.capture:
            self.last_trace = None
            inputs_N = inputs.to(self.device, non_blocking=True)
            if device_ids is not None:
                inputs_N[:B].copy_(device_ids)
            batch, meta = decode_views(inputs_N, Bp, Mp)
            return self._forward(batch, meta)[:B]
        g = self.graphs.get((Bp, Mp, traced)) or self._capture(Bp, Mp, traced)
        g.inputs_N.copy_(inputs, non_blocking=True)
        if device_ids is not None:
            g.inputs_N[:B].copy_(device_ids)
        g.graph.replay()
        self.last_trace = None if g.trace is None else g.trace.taken()
        self.replays += 1
        return g.logits_BV[:B]

    def _forward(
        self, batch: TokenBatch, meta: PagedMetadata, trace: StepTrace | None = None
    ) -> torch.Tensor:
        return decode_forward(
            self.model,
            self.dispatcher,
            self.k_cache,
            self.v_cache,
            batch,
            meta,
            micro_batches=self.micro_batches,
            trace=trace,
        )

    def _capture(self, Bp: int, Mp: int, traced: bool) -> _Graph:
        """Warms the shapes up on a side stream, then captures (padding rows only: harmless);
        `traced`: the captured forward stamps a StepTrace of its own (the warm-ups stamp a
        throwaway one, so that they run the captured path)."""
        empty = pack_decode_inputs([], [], [], self.block_size, self.scratch_block, Bp, Mp)
        inputs_N = empty.to(self.device)
        batch, meta = decode_views(inputs_N, Bp, Mp)
        forward = self._forward
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with self.dispatcher.capturing():
            with torch.cuda.stream(stream):  # the captured path, stamps into a throwaway trace
                for _ in range(2):
                    forward(batch, meta, StepTrace(self.device) if traced else None)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # thread-local: another thread may enqueue CUDA work meanwhile (an abort's copy on
            # a stream of its own), which a global capture would refuse, failing the capture
            trace = StepTrace(self.device) if traced else None
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                logits_BV = forward(batch, meta, trace)
        g = _Graph(graph, inputs_N, logits_BV, trace)
        self.graphs[Bp, Mp, traced] = g
        return g


def micro_batch_bucket(batch: int, micro_batches: int) -> int:
    """The rows a graphed step of `batch` sequences runs with: its batch bucket, rounded up to
    a multiple of the micro-batches."""
    return -(-batch_bucket(batch) // micro_batches) * micro_batches


def real_rows(batch: int, micro_batches: int) -> list[int]:
    """How many of each micro-batch's rows are sequences in the graphed step of `batch` (the
    rest are padding, at the end)."""
    b = micro_batch_bucket(batch, micro_batches) // micro_batches
    return [min(b, max(0, batch - j * b)) for j in range(micro_batches)]


def pack_decode_inputs(
    token_ids: list[int],
    positions: list[int],
    tables: list[list[int]],
    block_size: int,
    scratch_block: int,
    Bp: int,
    Mp: int,
) -> torch.Tensor:
    """A decode step's inputs in one int64 tensor (one host-to-device copy): token ids,
    positions, slots, block tables [Bp·Mp], query rows and query positions, [Bp] each. Rows
    past the batch decode token 0 at position 0 of the scratch block."""
    BS, pad = block_size, Bp - len(token_ids)
    slots = [t[p // BS] * BS + p % BS for t, p in zip(tables, positions, strict=True)]
    rows = [x for t in tables for x in (*t, *[0] * (Mp - len(t)))]
    values = (
        [*token_ids, *[0] * pad]
        + [*positions, *[0] * pad]
        + [*slots, *[scratch_block * BS] * pad]
        + [*rows, *[scratch_block] * (Mp * pad)]
        + list(range(Bp))
        + [*positions, *[0] * pad]
    )
    return torch.tensor(values, dtype=torch.int64)


def decode_views(inputs_N: torch.Tensor, Bp: int, Mp: int) -> tuple[TokenBatch, PagedMetadata]:
    """The batch and paged metadata that `pack_decode_inputs`' tensor holds, as views."""
    tokens, positions, slots, tables, rows, query_pos = inputs_N.split(
        [Bp, Bp, Bp, Bp * Mp, Bp, Bp]
    )
    meta = PagedMetadata(slots, tables.view(Bp, Mp), rows.view(Bp, 1), query_pos.view(Bp, 1))
    return TokenBatch(tokens, positions, ()), meta


def decode_forward(
    model: AttentionSideModel,
    dispatcher: Dispatcher,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: TokenBatch,
    meta: PagedMetadata,
    micro_batches: int = 1,
    trace: StepTrace | None = None,
) -> torch.Tensor:
    """Logits [Bp, V] of every row: the eager forward, as a graph captures it; with m > 1
    micro-batches, or a trace to stamp, the ping-pong pipeline over m equal slices of the rows
    (views: the graph's inputs stay one tensor; one slice: the same kernels as the forward)."""
    Bp = batch.token_ids.shape[0]
    if micro_batches == 1 and trace is None:
        rows = torch.arange(Bp, device=batch.token_ids.device)
        return model.forward(batch, PagedAttention(k_cache, v_cache, meta), dispatcher, rows)
    if Bp % micro_batches:
        raise ValueError(f"{Bp} rows do not split into {micro_batches} equal micro-batches")
    b = Bp // micro_batches
    parts = [slice(j * b, (j + 1) * b) for j in range(micro_batches)]
    batches = [TokenBatch(batch.token_ids[p], batch.positions[p], ()) for p in parts]
    attns = [
        PagedAttention(
            k_cache,
            v_cache,
            PagedMetadata(
                meta.slot_T[p],
                meta.block_table_BM[p],
                meta.query_row_BQ[p] - p.start,  # rows within the micro-batch
                meta.query_pos_BQ[p],
            ),
        )
        for p in parts
    ]
    local_rows = [torch.arange(b, device=batch.token_ids.device)] * micro_batches
    return torch.cat(ping_pong(model, dispatcher, 0, batches, attns, local_rows, trace))
