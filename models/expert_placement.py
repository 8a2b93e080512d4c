"""Which expert node holds which experts: the one table both node kinds agree on."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch


class ExpertPlacementError(ValueError):
    """An expert assignment that leaves an expert out, repeats one or names one that does not exist."""


@dataclass(frozen=True, slots=True)
class ExpertPlacement:
    """Each expert lives on `replicas` distinct nodes. Tokens of an expert go to its first live
    holder: the node that lists it earliest (its home), so replicas idle until a home dies."""

    num_experts: int
    assignment: tuple[tuple[int, ...], ...]  # expert node index -> global expert ids (local order)
    replicas: int = 1

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
        holders = [0] * num_experts
        unknown = sorted({e for node in assignment for e in node if not 0 <= e < num_experts})
        twice = sorted({e for node in assignment for e in node if list(node).count(e) > 1})
        for node in assignment:
            for e in set(node):
                if 0 <= e < num_experts:
                    holders[e] += 1
        wrong = [e for e in range(num_experts) if holders[e] != replicas]
        if unknown or twice or wrong:
            raise ExpertPlacementError(
                f"expert assignment must hold each of the {num_experts} experts on exactly "
                f"{replicas} node(s); wrong count {wrong}, unknown {unknown}, "
                f"repeated within a node {twice}"
            )
        # one holder each: local ids ascending; with replicas, the order says which is home
        order = sorted if replicas == 1 else tuple
        return cls(num_experts, tuple(tuple(order(node)) for node in assignment), replicas)

    @property
    def num_nodes(self) -> int:
        return len(self.assignment)

    def covers(self, dead: Collection[int]) -> bool:
        """Whether every expert still has a live holder with the nodes in `dead` gone."""
        live = [e for j, node in enumerate(self.assignment) if j not in dead for e in node]
        return len(set(live)) == self.num_experts

    def tables(self, dead: Collection[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """[E] node index of each expert's first live holder and [E] its local id there."""
        node_of = torch.full((self.num_experts,), -1, dtype=torch.int64)
        local_of = torch.full((self.num_experts,), -1, dtype=torch.int64)
        rank = torch.full(
            (self.num_experts,), len(max(self.assignment, key=len)), dtype=torch.int64
        )
        for j, experts in enumerate(self.assignment):
            if j in dead:
                continue
            for local, e in enumerate(experts):
                if local < rank[e]:  # earliest in its node's list wins; ties go to the lower node
                    node_of[e], local_of[e], rank[e] = j, local, local
        if (node_of < 0).any():
            lost = torch.nonzero(node_of < 0).flatten().tolist()
            raise ExpertPlacementError(
                f"experts {lost} have no live node (dead nodes {sorted(dead)})"
            )
        return node_of, local_of
