"""M2N dispatch and N2M combine for one attention node.

A token goes once to each expert node holding any of its top-k experts, carrying those
experts' local ids (-1 for the slots another node serves) and weights; it comes back as one
partial sum per node. Every expert node gets a frame every round, empty if no token routes
there, so it knows when the round is complete.

Shape legend: T = tokens, D = hidden, K = top-k, n = tokens sent to one node.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from models.placement import ExpertPlacement
from transport.endpoint import PendingSend, Transport, TransportError
from transport.wire import RoundKey

LOCAL_ID_DTYPE = torch.int16


@dataclass(frozen=True, slots=True)
class DispatchPlan:
    """What combine needs from dispatch: which rows went to which expert node."""

    key: RoundKey
    rows_per_node: tuple[torch.Tensor, ...]
    sends: tuple[PendingSend, ...]
    sent_at: float


class RemoteDispatcher:
    def __init__(
        self,
        transport: Transport,
        placement: ExpertPlacement,
        expert_peers: list[int],
        timeout_s: float,
        device: torch.device | str = "cpu",
    ) -> None:
        self.transport = transport
        self.expert_peers = expert_peers
        self.node_of_E, self.local_of_E = (t.to(device) for t in placement.tables())
        self.timeout_s = timeout_s
        self.wait_s = 0.0  # time blocked in combine, for the pipeline's timing split
        self.rounds = 0
        self.round_trip_s = 0.0  # dispatch sent to combine done, summed over rounds

    def dispatch(
        self, key: RoundKey, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor
    ) -> DispatchPlan:
        node_TK = self.node_of_E[ids_TK]
        local_TK = self.local_of_E[ids_TK]
        rows, sends = [], []
        for j, peer in enumerate(self.expert_peers):
            on_j_TK = node_TK == j
            rows_n = torch.nonzero(on_j_TK.any(dim=1)).flatten()
            mask_nK = on_j_TK[rows_n]
            local_nK = torch.where(mask_nK, local_TK[rows_n], -1).to(LOCAL_ID_DTYPE)
            weights_nK = torch.where(mask_nK, weights_TK[rows_n], 0)
            sends.append(self.transport.send(peer, key, [x_TD[rows_n], local_nK, weights_nK]))
            rows.append(rows_n)
        return DispatchPlan(key, tuple(rows), tuple(sends), time.perf_counter())

    def combine(self, plan: DispatchPlan, like_TD: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out_TD = torch.zeros_like(like_TD)
        for rows_n, peer, send in zip(
            plan.rows_per_node, self.expert_peers, plan.sends, strict=True
        ):
            (y_nD,) = self.transport.recv(peer, plan.key, self.timeout_s)
            if y_nD.shape != (rows_n.shape[0], like_TD.shape[1]):
                raise TransportError(
                    f"expert peer {peer} answered {plan.key} with shape {list(y_nD.shape)}, expected {[rows_n.shape[0], like_TD.shape[1]]}"
                )
            send.result(self.timeout_s)  # surfaces a failed send
            out_TD.index_add_(0, rows_n, y_nD.to(out_TD.dtype))
        end = time.perf_counter()
        self.wait_s += end - start
        self.rounds += 1
        self.round_trip_s += end - plan.sent_at
        return out_TD
