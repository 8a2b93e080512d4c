"""Which expert node holds which experts: the one table both node kinds agree on.

An expert held by several nodes has its tokens split across its live holders by token row
(row r of a micro-batch goes to holder r mod h), so replicas carry load; when a holder dies,
its share moves to the others. A hot expert may have more holders than a cold one.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace

import torch


class ExpertPlacementError(ValueError):
    """An expert assignment that leaves an expert out, repeats one or names one that does not exist."""


@dataclass(frozen=True, slots=True)
class ExpertPlacement:
    """Each expert lives on at least `replicas` distinct nodes (a dead node's experts can then
    be served elsewhere within the round when `replicas` > 1)."""

    num_experts: int
    assignment: tuple[tuple[int, ...], ...]  # expert node index -> global expert ids (local order)
    replicas: int = 1
    # (MoE layer, its own assignment) for the layers placed differently from `assignment`
    layer_assignments: tuple[tuple[int, tuple[tuple[int, ...], ...]], ...] = ()

    @classmethod
    def even(cls, num_experts: int, num_nodes: int, replicas: int = 1) -> ExpertPlacement:
        """Contiguous ranges; the first `num_experts % num_nodes` nodes take one expert more.
        With replicas, node j also holds the ranges of nodes j-1, j-2, ... (a ring), after its own."""
        if not 1 <= num_nodes <= num_experts:
            raise ExpertPlacementError(
                f"expert nodes must be between 1 and {num_experts} (the experts), got {num_nodes}"
            )
        if not 1 <= replicas <= num_nodes:
            raise ExpertPlacementError(
                f"expert replicas must be between 1 and {num_nodes} (the expert nodes), got {replicas}"
            )
        base, extra = divmod(num_experts, num_nodes)
        bounds = [0]
        for j in range(num_nodes):
            bounds.append(bounds[-1] + base + (j < extra))
        ranges = [tuple(range(bounds[j], bounds[j + 1])) for j in range(num_nodes)]
        return cls(
            num_experts,
            tuple(
                tuple(e for r in range(replicas) for e in ranges[(j - r) % num_nodes])
                for j in range(num_nodes)
            ),
            replicas,
        )

    @classmethod
    def explicit(
        cls, num_experts: int, assignment: Sequence[Sequence[int]], replicas: int = 1
    ) -> ExpertPlacement:
        """Node j holds `assignment[j]`; each expert on at least `replicas` nodes (a hot one
        may be on more: its tokens split across them)."""
        holders = [0] * num_experts
        unknown = sorted({e for node in assignment for e in node if not 0 <= e < num_experts})
        twice = sorted({e for node in assignment for e in node if list(node).count(e) > 1})
        for node in assignment:
            for e in set(node):
                if 0 <= e < num_experts:
                    holders[e] += 1
        wrong = [e for e in range(num_experts) if holders[e] < replicas]
        if unknown or twice or wrong:
            raise ExpertPlacementError(
                f"expert assignment must hold each of the {num_experts} experts on at least "
                f"{replicas} node(s); too few holders {wrong}, unknown {unknown}, "
                f"repeated within a node {twice}"
            )
        return cls(num_experts, tuple(tuple(sorted(node)) for node in assignment), replicas)

    def with_layers(self, per_layer: Mapping[int, Sequence[Sequence[int]]]) -> ExpertPlacement:
        """The same placement with these MoE layers placed their own way (a plan per layer);
        each is checked like an explicit assignment, on the same number of nodes."""
        layers = []
        for layer, assignment in sorted(per_layer.items()):
            if len(assignment) != self.num_nodes:
                raise ExpertPlacementError(
                    f"layer {layer}'s assignment lists {len(assignment)} nodes, "
                    f"the placement has {self.num_nodes}"
                )
            try:
                checked = ExpertPlacement.explicit(self.num_experts, assignment, self.replicas)
            except ExpertPlacementError as err:
                raise ExpertPlacementError(f"layer {layer}: {err}") from err
            layers.append((layer, checked.assignment))
        return replace(self, layer_assignments=tuple(layers))

    @property
    def num_nodes(self) -> int:
        return len(self.assignment)

    def at(self, layer: int | None) -> tuple[tuple[int, ...], ...]:
        """Layer `layer`'s assignment (node -> expert ids, local order)."""
        return next((a for at, a in self.layer_assignments if at == layer), self.assignment)

    def node_layers(self, node: int) -> tuple[tuple[int, tuple[int, ...]], ...]:
        """(layer, expert ids) of node `node` for the layers placed their own way."""
        return tuple((layer, a[node]) for layer, a in self.layer_assignments)

    def node_experts(self, node: int) -> tuple[int, ...]:
        """Every expert node `node` holds in some layer."""
        held = set(self.assignment[node]).union(*(a[node] for _, a in self.layer_assignments))
        return tuple(sorted(held))

    def covers(self, dead: Collection[int]) -> bool:
        """Whether every expert of every layer still has a live holder with `dead` gone."""
        assignments = [self.assignment, *(a for _, a in self.layer_assignments)]
        return all(
            len({e for j, node in enumerate(a) if j not in dead for e in node}) == self.num_experts
            for a in assignments
        )

    def holders(
        self, dead: Collection[int] = (), layer: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The live holders of each expert in `layer`: [E, H] node index and [E, H] local id
        (holders in node order, -1 past the last) and [E] how many. Token row r of expert e
        goes to holder r mod count[e]."""
        live = [
            [
                (j, experts.index(e))
                for j, experts in enumerate(self.at(layer))
                if j not in dead and e in experts
            ]
            for e in range(self.num_experts)
        ]
        lost = [e for e, h in enumerate(live) if not h]
        if lost:
            raise ExpertPlacementError(
                f"experts {lost} have no live node (dead nodes {sorted(dead)})"
            )
        width = max(len(h) for h in live)
        node_EH = torch.full((self.num_experts, width), -1, dtype=torch.int64)
        local_EH = torch.full((self.num_experts, width), -1, dtype=torch.int64)
        for e, h in enumerate(live):
            node_EH[e, : len(h)] = torch.tensor([j for j, _ in h])
            local_EH[e, : len(h)] = torch.tensor([i for _, i in h])
        return node_EH, local_EH, torch.tensor([len(h) for h in live])
