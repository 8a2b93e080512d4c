"""When and how to move experts while serving: the decision half of live rebalancing.

From the load window's per-layer loads, each layer whose node imbalance (max/mean) is over the
threshold is planned again (`plan_layer`: replicate hot experts into the spare slots, pack for
equal load). The plan's nodes are then matched to today's nodes so that as few experts as
possible move: a planned node is only a set of experts, any real node may take it. A layer is
taken when it is expected to be better balanced and its moves fit in what is left of
`max_moves`, worst layers first. `Rebalancer` says when to look; the cluster (and
bench/eplb.py, with the same nodes in one process) carries a plan out: the expert nodes stage
the experts they newly hold while serving, and all nodes switch at one step boundary.

Shape legend: E = experts, N = expert nodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from afd.models.expert_placement import ExpertPlacement
from afd.orchestrator.config import RebalanceSection
from afd.orchestrator.expert_load import LayerLoad
from afd.orchestrator.expert_planner import plan_layer

# a layer moves only when its expected imbalance beats the measured one by this factor: moving
# weights costs memory traffic, and a plan from a short window is noisy
MIN_GAIN = 0.95


@dataclass(frozen=True, slots=True)
class RebalancePlan:
    version: int  # 1 for the first rebalance of a cluster, and so on
    placement: ExpertPlacement  # the whole new placement
    layers: tuple[int, ...]  # the MoE layers it changes
    moves: int  # (layer, node, expert) copies a node newly holds
    measured: float  # the worst layer imbalance over the window, before
    expected: float  # the worst expected imbalance of the changed layers, after

    def node_layers(self, node: int) -> dict[int, tuple[int, ...]]:
        """The changed layers' experts on node `node`, in local-id order."""
        return {layer: self.placement.at(layer)[node] for layer in self.layers}


def match_nodes(
    current: Sequence[Sequence[int]], planned: Sequence[Sequence[int]]
) -> list[tuple[int, ...]]:
    """`planned`'s expert sets handed to today's nodes so that they keep as many experts as
    possible: greedily, the pair (node, planned set) sharing the most experts first."""
    n = len(current)
    overlap = np.array([[len(set(c) & set(p)) for p in planned] for c in current])
    out: list[tuple[int, ...] | None] = [None] * n
    free_nodes, free_sets = set(range(n)), set(range(n))
    for flat in np.argsort(-overlap, axis=None, kind="stable"):
        j, k = divmod(int(flat), n)
        if j in free_nodes and k in free_sets:
            out[j] = tuple(sorted(planned[k]))
            free_nodes.discard(j)
            free_sets.discard(k)
    return [ids for ids in out if ids is not None]


def moves(current: Sequence[Sequence[int]], new: Sequence[Sequence[int]]) -> int:
    """Experts a node holds in `new` and not in `current`, summed over nodes."""
    return sum(len(set(b) - set(a)) for a, b in zip(current, new, strict=True))


def plan_rebalance(
    placement: ExpertPlacement,
    loads: Sequence[LayerLoad],
    redundant_slots: int,
    threshold: float,
    max_moves: int,
    version: int,
) -> RebalancePlan | None:
    """A new placement for the layers over `threshold`, or None when no layer is (or none
    can be improved within `max_moves`)."""
    over = sorted((x for x in loads if x.imbalance > threshold), key=lambda x: -x.imbalance)
    if not over:
        return None
    changed: dict[int, tuple[tuple[int, ...], ...]] = {}
    expected, budget = 1.0, max_moves
    for load in over:
        current = placement.at(load.layer)
        try:
            plan = plan_layer(
                load.expert_tokens,
                placement.num_nodes,
                redundant_slots,
                replicas=placement.replicas,
            )
        except ValueError:  # no packing found within the slots: leave the layer as it is
            continue
        new = match_nodes(current, plan.assignment)
        cost = moves(current, new)
        if cost == 0 or cost > budget or plan.imbalance > load.imbalance * MIN_GAIN:
            continue
        changed[load.layer] = tuple(new)
        budget -= cost
        expected = max(expected, plan.imbalance)
    if not changed:
        return None
    layers = {layer: a for layer, a in placement.layer_assignments}
    layers.update(changed)
    return RebalancePlan(
        version,
        placement.with_layers(layers),
        tuple(sorted(changed)),
        max_moves - budget,
        over[0].imbalance,
        expected,
    )


class Rebalancer:
    """When to look at the load and what plan to carry out: every `every_steps` steps of load
    gathered since the last look or switch (the window starts empty at a switch)."""

    def __init__(self, settings: RebalanceSection, redundant_slots: int) -> None:
        self.settings, self.redundant_slots = settings, redundant_slots
        self.version = 0  # the placement the nodes hold: 0 as deployed, then each switch's
        self._looked_at = 0

    def look(
        self, step: int, placement: ExpertPlacement, loads: Sequence[LayerLoad]
    ) -> RebalancePlan | None:
        """A plan for the nodes to stage, when it is time to look and a layer is over the
        threshold with a better placement in reach."""
        r = self.settings
        if not r.enabled or step - self._looked_at < r.every_steps:
            return None
        self._looked_at = step
        return plan_rebalance(
            placement, loads, self.redundant_slots, r.threshold, r.max_moves, self.version + 1
        )

    def switched(self, plan: RebalancePlan, step: int) -> None:
        """Every node took `plan` at the boundary after `step`."""
        self.version = plan.version
        self._looked_at = step
