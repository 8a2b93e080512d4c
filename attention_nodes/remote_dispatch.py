"""M2N dispatch and N2M combine for one attention node.

A token goes once to each expert node holding any of its top-k experts, carrying those
experts' local ids (-1 for the slots another node serves) and weights; it comes back as one
partial sum per node. Every expert node gets a frame every round, empty if no token routes
there, so it knows when the round is complete.

An expert with several holders has its tokens split across them by row (`ExpertRouting`).
With expert replicas, an expert node the orchestrator reports dead (`Transport.mark_lost`), or
whose connection closed, is routed around at once: the tokens of the exchange in progress that went to it are sent again,
under a failover key, to the nodes that hold its experts' replicas, and later exchanges go
there directly. No round fails. Expert nodes answer failover frames while they wait for their
regular ones, and wait for every attention node's end-of-step marker before their step ends, so
a failover late in the step still finds them serving.

Shape legend: T = tokens, D = hidden, K = top-k, n = tokens sent to one node.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from afd.attention_nodes.expert_routing import ExpertRouting
from afd.models.expert_placement import ExpertPlacement
from afd.models.fp8 import pack_rows
from afd.models.moe import Dispatcher
from afd.transport.endpoint import PeerLost, PendingSend, Transport, TransportError
from afd.transport.slots import LOCAL_ID_DTYPE
from afd.transport.step_control import control_frame, open_step, take_calls
from afd.transport.wire import RoundKey


@dataclass(frozen=True, slots=True)
class Exchange:
    """One expected answer: `rows` of the batch went to expert node `node` under `key`, for the
    top-k slots in `slots`."""

    node: int
    key: RoundKey
    rows: torch.Tensor
    slots: torch.Tensor  # [n, K] bool
    send: PendingSend


@dataclass(frozen=True, slots=True)
class DispatchPlan:
    """What combine needs from dispatch: which rows went where, and what to send again if a
    node dies before it answers."""

    key: RoundKey
    exchanges: tuple[Exchange, ...]
    sent_at: float
    x_TD: torch.Tensor
    ids_TK: torch.Tensor
    weights_TK: torch.Tensor


class RemoteDispatcher(Dispatcher):
    """The experts on expert nodes, over the exchange (one frame per expert node)."""

    def __init__(
        self,
        transport: Transport,
        placement: ExpertPlacement,
        expert_peers: list[int],
        timeout_s: float,
        device: torch.device | str = "cpu",
        fp8_rows: bool = False,
    ) -> None:
        """`fp8_rows`: rows go out in E4M3 with a scale per 128 features (`pack_rows`), half
        the bytes of bf16; the partial sums come back in the model's dtype."""
        super().__init__()
        self.fp8_rows = fp8_rows
        self.transport = transport
        self.expert_peers = expert_peers
        self.device = device
        self.routing = ExpertRouting(placement, device)
        self.timeout_s = timeout_s

    def _follow_losses(self) -> None:
        """Routes around the expert nodes the transport has lost, and back to those rewired."""
        lost = frozenset(j for j, p in enumerate(self.expert_peers) if self.transport.is_lost(p))
        if lost != self.routing.dead:
            self.routing.route_around(lost)

    def _send_slots(
        self,
        key: RoundKey,
        x_TD: torch.Tensor,
        ids_TK: torch.Tensor,
        weights_TK: torch.Tensor,
        on_TK: torch.Tensor,
        local_TK: torch.Tensor,
        rows_T: torch.Tensor | None,
        node: int,
    ) -> Exchange:
        """Sends the tokens with a slot on `node` (`on_TK`, local ids there `local_TK`), other
        slots blanked."""
        rows_n = torch.nonzero(on_TK.any(dim=1)).flatten()
        mask_nK = on_TK[rows_n]
        local_nK = torch.where(mask_nK, local_TK[rows_n], -1).to(LOCAL_ID_DTYPE)
        weights_nK = torch.where(mask_nK, weights_TK[rows_n], 0)
        x_nD = pack_rows(x_TD[rows_n]) if self.fp8_rows else x_TD[rows_n]
        send = self.transport.send(self.expert_peers[node], key, [x_nD, local_nK, weights_nK])
        return Exchange(node, key, rows_n if rows_T is None else rows_T[rows_n], mask_nK, send)

    def dispatch(
        self,
        step: int,
        layer: int,
        micro_batch: int,
        x_TD: torch.Tensor,
        ids_TK: torch.Tensor,
        weights_TK: torch.Tensor,
    ) -> DispatchPlan:
        key = RoundKey.exchange(step, layer, micro_batch)
        self._follow_losses()
        node_TK, local_TK = self.routing.route(
            layer, ids_TK, torch.arange(ids_TK.shape[0], device=ids_TK.device)
        )
        exchanges = tuple(
            self._send_slots(key, x_TD, ids_TK, weights_TK, node_TK == j, local_TK, None, j)
            for j in range(len(self.expert_peers))
            if j not in self.routing.dead
        )
        return DispatchPlan(key, exchanges, time.perf_counter(), x_TD, ids_TK, weights_TK)

    def _failover(self, plan: DispatchPlan, lost: Exchange, attempt: int) -> list[Exchange]:
        """Sends the slots that went to a lost node to the replicas of its experts."""
        self.routing.route_around(self.routing.dead | {lost.node})
        rows = lost.rows
        x_TD, ids_TK, weights_TK = plan.x_TD[rows], plan.ids_TK[rows], plan.weights_TK[rows]
        was_lost_TK = lost.slots
        now_TK, local_TK = self.routing.route(plan.key.layer, ids_TK, rows)  # same rows, same split
        key = plan.key.failover(attempt)
        return [
            self._send_slots(
                key, x_TD, ids_TK, weights_TK, was_lost_TK & (now_TK == j), local_TK, rows, j
            )
            for j in sorted(set(now_TK[was_lost_TK].tolist()))
        ]

    def combine(self, plan: DispatchPlan, like_TD: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out_TD = torch.zeros_like(like_TD)
        waiting = list(plan.exchanges)
        attempt = 0
        while waiting:
            ex = waiting.pop(0)
            peer = self.expert_peers[ex.node]
            try:
                (y_nD,) = self.transport.recv(peer, ex.key, self.timeout_s)
                ex.send.result(self.timeout_s)  # surfaces a failed send
            except PeerLost:
                if not self.routing.placement.covers(self.routing.dead | {ex.node}):
                    raise
                attempt += 1
                waiting += self._failover(plan, ex, attempt)
                continue
            if y_nD.shape != (ex.rows.shape[0], like_TD.shape[1]):
                raise TransportError(
                    f"expert peer {peer} answered {ex.key} with shape {list(y_nD.shape)}, expected {[ex.rows.shape[0], like_TD.shape[1]]}"
                )
            out_TD.index_add_(0, ex.rows, y_nD.to(out_TD.dtype))
        end = time.perf_counter()
        self.wait_s += end - start
        self.rounds += 1
        self.round_trip_s += end - plan.sent_at
        return out_TD

    def begin_step(
        self,
        step: int,
        rows_per_micro_batch: list[int],
        graphed: bool,
        real_rows: list[int] | None = None,
    ) -> None:
        """Opens the step on every live expert node (`afd.transport.step_control`)."""
        self._follow_losses()
        live = [p for j, p in enumerate(self.expert_peers) if j not in self.routing.dead]
        open_step(self.transport, live, step, control_frame(rows_per_micro_batch, graphed))

    def end_step(self, step: int) -> None:
        """Tells every live expert node this node is done with the step (replicas only: the
        marker keeps them serving failovers until every attention node is through), and takes
        their calls to it."""
        live = [p for j, p in enumerate(self.expert_peers) if j not in self.routing.dead]
        if self.routing.placement.replicas > 1:
            key = RoundKey.end_of_step(step)
            for peer in live:
                if not self.transport.is_lost(peer):
                    self.transport.send(peer, key, [])
        take_calls(self.transport, live, step, self.timeout_s)
