"""Expert load over a sliding window of steps: what an expert-parallel step waits on.

Each expert node reports, per step, the tokens each of its experts computed in each MoE layer
(counted on its device, read once a step). The window keeps the last `steps` reports per node
and their running sums, from which come the per-(layer, expert) loads, each node's load per
layer, and per layer the imbalance max/mean over the nodes — the step's time follows the
busiest node, so 1.0 is perfect balance and 2.0 means the slowest node does twice the
average work. Tokens are counted where they were computed: a replica serving a failover counts
on the node that served it.

Shape legend: L = MoE layers (in `moe_layers` order), E = experts (global ids), N = expert nodes.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class LayerLoad:
    """One MoE layer's load over the window."""

    layer: int
    expert_tokens: tuple[int, ...]  # by global expert id
    node_tokens: tuple[int, ...]  # by expert node index
    imbalance: float  # max/mean of node_tokens; 1.0 when the window holds no tokens


class ExpertLoadWindow:
    def __init__(
        self,
        moe_layers: Sequence[int],
        num_experts: int,
        assignments: Sequence[Sequence[Sequence[int]]],
        steps: int,
    ) -> None:
        """`assignments[i][j]`: the experts node j holds in MoE layer `moe_layers[i]`, in its
        local order (one entry for every layer when all layers share a placement)."""
        if steps < 1:
            raise ValueError(f"the load window must hold at least one step, got {steps}")
        self.moe_layers = tuple(moe_layers)
        self.num_experts = num_experts
        if len(assignments) == 1:
            assignments = list(assignments) * len(self.moe_layers)
        nodes = len(assignments[0]) if assignments else 0
        # per node, per layer: the global ids of its count columns
        self.ids = [[np.asarray(a[j], dtype=np.int64) for a in assignments] for j in range(nodes)]
        self.steps = steps
        L = len(self.moe_layers)
        width = [max((len(ids) for ids in per_layer), default=0) for per_layer in self.ids]
        self._recent: list[deque[np.ndarray]] = [deque() for _ in range(nodes)]
        self._sums = [np.zeros((L, w), dtype=np.int64) for w in width]
        self._lock = threading.Lock()  # the engine thread adds, status readers read

    def add(self, node: int, layer_tokens: Sequence[Sequence[int]]) -> None:
        """Node `node`'s counts of one step: [L][its experts in that layer, local order]."""
        counts = np.zeros_like(self._sums[node])
        for i, row in enumerate(layer_tokens):
            counts[i, : len(row)] = row
        with self._lock:
            recent = self._recent[node]
            recent.append(counts)
            self._sums[node] += counts
            if len(recent) > self.steps:
                self._sums[node] -= recent.popleft()

    def expert_tokens(self) -> np.ndarray:
        """[L, E]: tokens each expert computed in each MoE layer over the window."""
        out = np.zeros((len(self.moe_layers), self.num_experts), dtype=np.int64)
        with self._lock:
            for per_layer, sums in zip(self.ids, self._sums, strict=True):
                for i, ids in enumerate(per_layer):  # a node holds each expert once a layer
                    out[i, ids] += sums[i, : len(ids)]
        return out

    def node_tokens(self) -> np.ndarray:
        """[L, N]: tokens each expert node computed in each MoE layer over the window."""
        if not self._sums:
            return np.zeros((len(self.moe_layers), 0), dtype=np.int64)
        with self._lock:
            return np.stack([s.sum(axis=1) for s in self._sums], axis=1)

    def imbalance(self) -> np.ndarray:
        """[L]: max/mean of the nodes' loads per MoE layer (1.0 where nothing ran)."""
        loads = self.node_tokens().astype(np.float64)
        if loads.shape[1] == 0:
            return np.ones(loads.shape[0])
        mean = loads.mean(axis=1)
        return np.where(mean > 0, loads.max(axis=1) / np.where(mean > 0, mean, 1.0), 1.0)

    def node_layers(self, node: int) -> list[tuple[int, tuple[int, ...], tuple[int, ...]]]:
        """Node `node`'s window per MoE layer: (layer, its expert ids, their tokens)."""
        with self._lock:
            sums = self._sums[node].copy()
        return [
            (layer, tuple(int(e) for e in ids), tuple(int(t) for t in sums[i, : len(ids)]))
            for i, (layer, ids) in enumerate(zip(self.moe_layers, self.ids[node], strict=True))
        ]

    def layers(self) -> list[LayerLoad]:
        experts, nodes, imbalance = self.expert_tokens(), self.node_tokens(), self.imbalance()
        return [
            LayerLoad(
                layer,
                tuple(int(t) for t in experts[i]),
                tuple(int(t) for t in nodes[i]),
                float(imbalance[i]),
            )
            for i, layer in enumerate(self.moe_layers)
        ]
