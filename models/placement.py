"""Which expert node holds which experts: the one table both node kinds agree on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


class PlacementError(ValueError):
    """An expert assignment that leaves an expert out, repeats one or names one that does not exist."""


@dataclass(frozen=True, slots=True)
class ExpertPlacement:
    num_experts: int
    assignment: tuple[tuple[int, ...], ...]  # expert node index -> global expert ids, ascending

    @classmethod
    def even(cls, num_experts: int, num_nodes: int) -> ExpertPlacement:
        """Contiguous ranges; the first `num_experts % num_nodes` nodes take one expert more."""
        if not 1 <= num_nodes <= num_experts:
            raise PlacementError(
                f"expert nodes must be between 1 and {num_experts} (the experts), got {num_nodes}"
            )
        base, extra = divmod(num_experts, num_nodes)
        bounds = [0]
        for j in range(num_nodes):
            bounds.append(bounds[-1] + base + (j < extra))
        return cls(
            num_experts, tuple(tuple(range(bounds[j], bounds[j + 1])) for j in range(num_nodes))
        )

    @classmethod
    def explicit(cls, num_experts: int, assignment: Sequence[Sequence[int]]) -> ExpertPlacement:
        flat = [e for node in assignment for e in node]
        if sorted(flat) != list(range(num_experts)):
            missing = sorted(set(range(num_experts)) - set(flat))
            extra = sorted({e for e in flat if flat.count(e) > 1 or not 0 <= e < num_experts})
            raise PlacementError(
                f"expert assignment must hold each of the {num_experts} experts once; missing {missing}, repeated or unknown {extra}"
            )
        return cls(num_experts, tuple(tuple(sorted(node)) for node in assignment))

    @property
    def num_nodes(self) -> int:
        return len(self.assignment)

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[E] node index of each expert and [E] its local id on that node."""
        node_of = torch.empty(self.num_experts, dtype=torch.int64)
        local_of = torch.empty(self.num_experts, dtype=torch.int64)
        for j, experts in enumerate(self.assignment):
            for local, e in enumerate(experts):
                node_of[e], local_of[e] = j, local
        return node_of, local_of
