"""The MoE path: router output -> dispatch -> grouped experts -> combine.

`ExpertShard` holds a set of experts of every MoE layer stacked as [E, I, D] and computes
Σ weight·expert(x) over them. The `Dispatcher` decides where those experts live: in this process
(`LocalDispatcher`, the reference path) or on expert nodes (the attention node's UCX dispatcher).

Shape legend: T = tokens, D = hidden, E = local experts, K = top-k, I = expert FFN width.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from afd.models import fp8, kernels
from afd.models.checkpoint import TensorSource
from afd.models.config import ModelConfig
from afd.models.weights import expert_tensor_name, tensor_specs


@dataclass(frozen=True, slots=True)
class StackedExperts:
    """One layer's experts. With fp8 quantization the weights are float8_e4m3fn and `scales`
    holds the 128×128 block scales of gate, up and down (`afd.models.fp8`)."""

    gate_EID: torch.Tensor
    up_EID: torch.Tensor
    down_EDI: torch.Tensor
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def of(cls, stack: list[torch.Tensor], quantization: str) -> StackedExperts:
        """From the stacked (gate, up, down) weights, quantized to fp8 if asked."""
        gate, up, down = stack
        if quantization == "none":
            return cls(gate, up, down)
        (gq, gs), (uq, us), (dq, ds) = (fp8.quantize(w) for w in (gate, up, down))
        return cls(gq, uq, dq, (gs, us, ds))

    def to(self, device: str | torch.device) -> StackedExperts:
        scales = None
        if self.scales is not None:
            gs, us, ds = (s.to(device) for s in self.scales)
            scales = (gs, us, ds)
        return StackedExperts(
            self.gate_EID.to(device), self.up_EID.to(device), self.down_EDI.to(device), scales
        )

    @classmethod
    def gather(cls, rows: Sequence[tuple[StackedExperts, int]]) -> StackedExperts:
        """A stack of the given experts (source stack, row), in order: how a rebalance builds a
        layer's new stack from experts the node holds and experts it just loaded."""
        if not rows:
            raise ValueError("a layer's stack needs at least one expert")

        def stacked(pick: Any) -> torch.Tensor:
            return torch.stack([pick(src)[i] for src, i in rows])

        scales = None
        if rows[0][0].scales is not None:
            scales = tuple(stacked(lambda s, k=k: s.scales[k]) for k in range(3))
        return cls(
            stacked(lambda s: s.gate_EID),
            stacked(lambda s: s.up_EID),
            stacked(lambda s: s.down_EDI),
            scales,  # type: ignore[arg-type]
        )

    def _tensors(self) -> list[torch.Tensor]:
        return [self.gate_EID, self.up_EID, self.down_EDI, *(self.scales or ())]

    def same_shape(self, other: StackedExperts) -> bool:
        a, b = self._tensors(), other._tensors()
        return len(a) == len(b) and all(
            x.shape == y.shape and x.dtype == y.dtype and x.device == y.device
            for x, y in zip(a, b, strict=True)
        )

    def copy_(self, other: StackedExperts) -> None:
        """Takes `other`'s values into these tensors (same shapes): what a graph reads stays."""
        for x, y in zip(self._tensors(), other._tensors(), strict=True):
            x.copy_(y)

    def expert(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert e's (gate, up, down) in `dtype`, dequantized when they are fp8."""
        gate, up, down = self.gate_EID[e], self.up_EID[e], self.down_EDI[e]
        if self.scales is None:
            return gate, up, down
        gs, us, ds = self.scales
        return (
            fp8.dequantize(gate, gs[e], dtype),
            fp8.dequantize(up, us[e], dtype),
            fp8.dequantize(down, ds[e], dtype),
        )


class ExpertShard:
    """Experts `expert_ids` (global ids) of every MoE layer, or of a layer its own
    `layer_ids[layer]` (a placement planned per layer); local id i is the i-th of them."""

    def __init__(
        self,
        config: ModelConfig,
        expert_ids: Sequence[int],
        layers: dict[int, StackedExperts],
        layer_ids: Mapping[int, Sequence[int]] | None = None,
    ):
        self.config = config
        self.expert_ids = tuple(expert_ids)
        self.layers = layers
        self.layer_ids = {layer: tuple(ids) for layer, ids in (layer_ids or {}).items()}

    def ids_at(self, layer: int) -> tuple[int, ...]:
        """Layer `layer`'s experts, in local-id order."""
        return self.layer_ids.get(layer, self.expert_ids)

    def to(self, device: str | torch.device) -> ExpertShard:
        layers = {layer: w.to(device) for layer, w in self.layers.items()}
        return ExpertShard(self.config, self.expert_ids, layers, self.layer_ids)

    @classmethod
    def load(
        cls,
        checkpoint: TensorSource,
        config: ModelConfig,
        expert_ids: Sequence[int],
        dtype: torch.dtype,
        quantization: str = "none",
        layer_ids: Mapping[int, Sequence[int]] | None = None,
    ) -> ExpertShard:
        """Layer by layer, so that quantizing never holds more than one layer at full width;
        a layer in `layer_ids` loads those experts instead of `expert_ids`."""
        for ids in (expert_ids, *(layer_ids or {}).values()):
            if len(set(ids)) != len(ids):
                raise ValueError(f"expert ids {list(ids)} repeat an expert")
        if quantization not in fp8.QUANTIZATIONS:
            raise ValueError(
                f"quantization must be one of {fp8.QUANTIZATIONS}, got {quantization!r}"
            )
        layers = {}
        for layer in config.moe_layers:
            ids = list((layer_ids or {}).get(layer, expert_ids))  # local id i is ids[i]
            layers[layer] = load_layer_experts(checkpoint, config, layer, ids, dtype, quantization)
        return cls(config, expert_ids, layers, layer_ids)

    def place_layer(self, layer: int, ids: Sequence[int], experts: StackedExperts) -> None:
        """Layer `layer` holds `ids` (local order) from now on: a rebalance's switch."""
        self.layers[layer] = experts
        self.layer_ids[layer] = tuple(ids)

    def forward(
        self,
        layer: int,
        x_TD: torch.Tensor,
        local_ids_TK: torch.Tensor,
        weights_TK: torch.Tensor,
        out_TD: torch.Tensor | None = None,
        summands: bool = False,
    ) -> torch.Tensor:
        """Σ_k weight·expert_k(x) over this shard's experts; entries with local id -1 are skipped.
        Into `out_TD` when given (contiguous), else a new tensor. `summands` (every id local):
        where the fused kernels run, the K weighted outputs [T, K, D] unsummed, for the next
        residual add to sum (`fused_experts`); elsewhere the sum as always.

        Tokens are grouped by expert so each expert runs one GEMM over all its tokens.
        """
        w = self.layers[layer]
        if summands and len(self.ids_at(layer)) != self.config.num_experts:
            raise ValueError("summands need every expert here: a slot left out stays unwritten")
        if kernels.usable(x_TD) and (out_TD is None or kernels.usable(out_TD)):
            # no host sync, fixed shapes: what a CUDA graph captures
            from afd.models.kernels.fused_moe import fused_experts

            return fused_experts(
                x_TD, w.gate_EID, w.up_EID, w.down_EDI, local_ids_TK, weights_TK,
                scales=w.scales, out_TD=out_TD, summands=summands,
            )  # fmt: skip
        if out_TD is not None:
            y_TD = self.forward(layer, x_TD, local_ids_TK, weights_TK)
            return out_TD.copy_(y_TD, non_blocking=True)  # (pinned memory: in stream order)
        out_TD = torch.zeros_like(x_TD)
        if x_TD.shape[0] == 0:
            return out_TD
        token_T, slot_T = torch.nonzero(local_ids_TK >= 0, as_tuple=True)
        expert_T = local_ids_TK[token_T, slot_T]
        order = torch.argsort(expert_T, stable=True)
        token_T, slot_T, expert_T = token_T[order], slot_T[order], expert_T[order]
        counts = torch.bincount(expert_T, minlength=len(self.ids_at(layer))).tolist()
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            tok = token_T[start : start + n]
            x = x_TD[tok]
            gate, up, down = w.expert(e, x_TD.dtype)
            y = F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
            out_TD.index_add_(0, tok, y * weights_TK[tok, slot_T[start : start + n], None])
            start += n
        return out_TD


def load_layer_experts(
    checkpoint: TensorSource,
    config: ModelConfig,
    layer: int,
    ids: Sequence[int],
    dtype: torch.dtype,
    quantization: str = "none",
) -> StackedExperts:
    """Experts `ids` of MoE layer `layer`, stacked in that order (quantized if asked), where
    the checkpoint makes them."""
    tensors = checkpoint.load(tensor_specs(config, ["experts"], layers=[layer], experts=ids), dtype)
    stack = [
        torch.stack([tensors.pop(expert_tensor_name(config, layer, e, proj)) for e in ids])
        for proj in ("gate", "up", "down")
    ]
    return StackedExperts.of(stack, quantization)


class Dispatcher(ABC):
    """Where a layer's routed tokens go, and how their experts' sum comes back.

    `dispatch` hands one micro-batch's tokens over and returns at once with a plan; `combine`
    waits for their sum. Between the two the caller computes something else (the ping-pong
    pipeline: the next micro-batch's attention). Local experts answer inside `dispatch`;
    remote ones over the exchange.
    """

    def __init__(self) -> None:
        self.wait_s = 0.0  # time blocked in combine, for the pipeline's timing split
        self.rounds = 0  # (layer, micro-batch) exchanges combined
        self.round_trip_s = 0.0  # dispatch to combine done, summed over rounds

    @abstractmethod
    def dispatch(
        self,
        step: int,
        layer: int,
        micro_batch: int,
        x_TD: torch.Tensor,
        ids_TK: torch.Tensor,
        weights_TK: torch.Tensor,
    ) -> Any:
        """Sends the tokens to their experts; the plan `combine` takes."""

    @abstractmethod
    def combine(self, plan: Any, like_TD: torch.Tensor) -> torch.Tensor:
        """Σ_k weights_TK[t,k] · expert_{ids_TK[t,k]}(x_TD[t]) for every token t, as [T, D];
        or, unsummed, the K terms [T, K, D] (`LocalDispatcher`), which the model's next
        residual add sums."""

    def begin_step(
        self,
        step: int,
        rows_per_micro_batch: list[int],
        graphed: bool,
        real_rows: list[int] | None = None,
    ) -> None:
        """A step starts with these rows in each micro-batch, of which the first `real_rows`
        (default: all) are sequences and the rest a graph bucket's padding; `graphed`: its
        forward replays a CUDA graph (the device lane tells its expert nodes, once a step)."""
        return None

    def launched(self, step: int) -> None:
        """Every kernel of `step` is enqueued, its tokens not read yet (a node decoding ahead):
        what `end_step` checks is taken now, without waiting for the device."""
        return None

    def end_step(self, step: int) -> None:
        """The caller is through with `step` (remote experts with replicas wait for this)."""
        return None

    def capturing(self) -> AbstractContextManager[object]:
        """Held while a CUDA graph of the forward is warmed up and captured: those runs are not
        a step, and must not reach any peer."""
        return nullcontext()

    def experts(
        self, layer: int, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor
    ) -> torch.Tensor:
        """Dispatch and combine at once, for a caller with nothing to overlap."""
        return self.combine(self.dispatch(0, layer, 0, x_TD, ids_TK, weights_TK), x_TD)


class LocalDispatcher(Dispatcher):
    """All experts in this process: the single-process reference and the colocated engine.

    Without a shared expert its combine hands back the K weighted outputs [T, K, D] where the
    fused kernels run, and the next layer's add+norm sums them (one kernel fewer a layer); the
    model's residual takes either form."""

    def __init__(self, shard: ExpertShard) -> None:
        super().__init__()
        if shard.expert_ids != tuple(range(shard.config.num_experts)):
            raise ValueError("LocalDispatcher needs a shard holding every expert")
        self.shard = shard
        self.summands = not shard.config.shared_expert_size

    def dispatch(
        self,
        step: int,
        layer: int,
        micro_batch: int,
        x_TD: torch.Tensor,
        ids_TK: torch.Tensor,
        weights_TK: torch.Tensor,
    ) -> torch.Tensor:
        return self.shard.forward(layer, x_TD, ids_TK, weights_TK, summands=self.summands)

    def combine(self, plan: torch.Tensor, like_TD: torch.Tensor) -> torch.Tensor:
        self.rounds += 1
        return plan
