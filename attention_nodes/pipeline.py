"""The ping-pong pipeline: micro-batch j+1's attention runs while micro-batch j is at the experts.

For each layer and micro-batch j: finish j's previous layer (combine), run j's attention and
router, dispatch j. With m = 1 this is the plain sequential forward; with m >= 2 the expert
round trip of one micro-batch overlaps the attention of the others. Each token's arithmetic is
the same for every m.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from afd.attention_nodes.paged_kv_cache import PagedKVCache
from afd.models.attention import BatchAttention
from afd.models.batch import TokenBatch
from afd.models.messages import StepTimings
from afd.models.model import AttentionSideModel, Residual, Routed
from afd.models.moe import Dispatcher
from afd.models.step_trace import StepTrace


@dataclass(frozen=True, slots=True)
class _InFlight:
    layer: int
    routed: Routed
    plan: Any  # the dispatcher's, None on a dense layer


class PingPongPipeline:
    def __init__(
        self, model: AttentionSideModel, cache: PagedKVCache, dispatcher: Dispatcher
    ) -> None:
        self.model, self.cache, self.dispatcher = model, cache, dispatcher

    def run(
        self,
        step: int,
        batches: list[TokenBatch],
        sample_rows: list[torch.Tensor],
        trace: StepTrace | None = None,
    ) -> tuple[list[torch.Tensor], StepTimings]:
        """Logits [B_j, V] at `sample_rows[j]` of every micro-batch j. With `trace`, each
        (layer, micro-batch) records an "attention" span (attention, router and dispatch) and a
        "combine" span (waiting for the experts' sums and adding them)."""
        d = self.dispatcher
        start, wait_before = time.perf_counter(), d.wait_s
        rounds_before, rtt_before = d.rounds, d.round_trip_s
        attns = [self.cache.attention(b) for b in batches]  # metadata once per micro-batch
        logits = ping_pong(self.model, d, step, batches, attns, sample_rows, trace)
        total = time.perf_counter() - start
        wait = d.wait_s - wait_before
        return logits, StepTimings(
            total, total - wait, wait, d.rounds - rounds_before, d.round_trip_s - rtt_before
        )


def ping_pong(
    model: AttentionSideModel,
    dispatcher: Dispatcher,
    step: int,
    batches: list[TokenBatch],
    attns: Sequence[BatchAttention],
    sample_rows: list[torch.Tensor],
    trace: StepTrace | None = None,
) -> list[torch.Tensor]:
    """The micro-batches' forward in ping-pong order; logits [B_j, V] at `sample_rows[j]`.
    No host work of its own, so a CUDA graph can capture it (`DecodeGraphs`, m >= 2)."""

    def finish(f: _InFlight, j: int) -> Residual:
        if trace is not None:
            trace.begin("combine", f.layer, j)
        experts_TD = None if f.plan is None else dispatcher.combine(f.plan, f.routed.x_TD)
        out = model.post_experts(f.layer, f.routed, experts_TD)
        if trace is not None:
            trace.end("combine", f.layer, j)
        return out

    h = [model.embed_residual(b) for b in batches]
    inflight: list[_InFlight | None] = [None] * len(batches)
    for layer in range(model.config.num_layers):
        for j, batch in enumerate(batches):
            if (previous := inflight[j]) is not None:
                h[j] = finish(previous, j)
            if trace is not None:
                trace.begin("attention", layer, j)
            routed = model.pre_experts(layer, h[j], batch, attns[j])
            plan = None
            if model.config.is_moe_layer(layer):
                plan = dispatcher.dispatch(
                    step, layer, j, routed.x_TD, routed.ids_TK, routed.weights_TK
                )
            if trace is not None:
                trace.end("attention", layer, j)
            inflight[j] = _InFlight(layer, routed, plan)
    h = [finish(f, j) for j, f in enumerate(inflight) if f is not None]
    return [model.logits(h_j, rows) for h_j, rows in zip(h, sample_rows, strict=True)]
