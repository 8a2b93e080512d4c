"""Which expert node serves each (token, top-k slot) of a layer, and under which local id.

Shared by every lane's dispatcher. An expert with several holders has its tokens split across
them by row (`ExpertPlacement`): row r goes to holder r mod (its live holders). Nodes reported
dead are routed around; a placement that leaves an expert without a live holder is an
`ExpertPlacementError` naming it.

Shape legend: T = tokens, K = top-k.
"""

from __future__ import annotations

import torch
from afd.models.expert_placement import ExpertPlacement


class ExpertRouting:
    def __init__(self, placement: ExpertPlacement, device: torch.device | str) -> None:
        self.placement, self.device = placement, device
        self.dead: frozenset[int] = frozenset()
        self.route_around(frozenset())

    def route_around(self, dead: frozenset[int]) -> None:
        """Routes every expert of every layer to its live holders: the holder tables of the
        shared placement (key None) and of each layer placed its own way."""
        layers = [None, *(at for at, _ in self.placement.layer_assignments)]
        self._tables: dict[int | None, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for at in layers:
            node_EH, local_EH, count_E = self.placement.holders(dead, at)
            self._tables[at] = (
                node_EH.to(self.device),
                local_EH.to(self.device),
                count_E.to(self.device),
            )
        self.dead = dead

    def switch(self, placement: ExpertPlacement) -> bool:
        """Routes by a rebalance's new placement from now on (at a step boundary), still
        around the nodes reported dead. Returns whether the tables were rewritten in place
        (same layers placed their own way, same widths), so that CUDA graphs that read them
        stay valid; otherwise they are new tensors and such graphs must go."""
        if placement.num_nodes != self.placement.num_nodes:
            raise ValueError(
                f"a placement of {placement.num_nodes} expert nodes cannot replace one of "
                f"{self.placement.num_nodes}"
            )
        old = self._tables
        self.placement = placement
        self.route_around(self.dead)
        same = old.keys() == self._tables.keys() and all(
            a.shape == b.shape for at in old for a, b in zip(old[at], self._tables[at], strict=True)
        )
        if same:
            for at, tables in self._tables.items():
                for a, b in zip(old[at], tables, strict=True):
                    a.copy_(b)
            self._tables = old
        return same

    def holders(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`layer`'s live holders: [E, H] node, [E, H] local id, [E] count (on the device)."""
        return self._tables.get(layer, self._tables[None])

    def route(
        self, layer: int, ids_TK: torch.Tensor, rows_T: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(node, local id) of each (token, slot) in `layer`."""
        node_EH, local_EH, count_E = self.holders(layer)
        pick_TK = rows_T[:, None] % count_E[ids_TK]
        return node_EH[ids_TK, pick_TK], local_EH[ids_TK, pick_TK]
