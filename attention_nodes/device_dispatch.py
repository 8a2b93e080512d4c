"""M2N dispatch and N2M combine through a slot lane (device or proxy): no host code per layer.

Dispatch writes a micro-batch's rows, their local expert ids (-1 for the top-k slots another
node serves) and weights straight into each expert node's dispatch slot for this node, then
releases the slot's sequence word; combine waits for this node's combine slots of every expert
node and adds their partial sums in node order (one node: the slot itself, no copy). Every
operation is a kernel on the current stream, so a CUDA graph of the whole step captures them.

What stays on the host is the step's control round (`afd.transport.step_control`: the rows of
each micro-batch, so that the expert node runs its experts over exactly those rows, and its call
back) and one read of the status word when the step is over (`end_step`), which raises if a
wait ran past its deadline or was aborted: the step's results are then thrown away.

Faults: an expert node that dies mid-step makes this step's waits end at their deadline, or at
once when the orchestrator aborts the step; the step is replayed after recovery, as on the host
lane. Failover to replicas within a step is the host lane's alone.

Shape legend: T = tokens of the micro-batch, D = hidden, K = top-k.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from afd.attention_nodes.expert_routing import ExpertRouting
from afd.models import kernels
from afd.models.expert_placement import ExpertPlacement
from afd.models.moe import Dispatcher
from afd.transport.endpoint import Transport
from afd.transport.slot_lane import SlotLane, StatusSnapshot
from afd.transport.step_control import control_frame, open_step, take_calls


class DeviceDispatcher(Dispatcher):
    def __init__(
        self,
        transport: Transport,
        lane: SlotLane,
        expert_peers: list[int],
        placement: ExpertPlacement,
        timeout_s: float,
    ) -> None:
        """`lane`: this node's combine slots, and the expert nodes' dispatch slots mapped in
        `expert_peers` order."""
        super().__init__()
        self.transport, self.lane, self.expert_peers = transport, lane, expert_peers
        self.timeout_s = timeout_s
        device = lane.own.device
        self.routing = ExpertRouting(placement, device)
        self.capacity = lane.own.layout.capacity
        self._rows_C = torch.arange(self.capacity, device=device)
        # each micro-batch's rows that are sequences (the rest: padding), set every step
        micro_batches = lane.own.rows_MPCD.shape[0]
        self._real_M = torch.zeros(micro_batches, dtype=torch.int64, device=device)
        self._status: dict[int, StatusSnapshot] = {}  # steps launched, their status to check

    def begin_step(
        self,
        step: int,
        rows_per_micro_batch: list[int],
        graphed: bool,
        real_rows: list[int] | None = None,
    ) -> None:
        """Sets the step the kernels' sequence numbers follow, and tells every expert node how
        many rows each micro-batch brings and whether this node replays a graph (then the
        expert node replays one of its own for these rows). Rows past `real_rows` (a graph
        bucket's padding) go out with no expert: the expert nodes neither compute nor count
        them, so padding does not pass for load."""
        if max(rows_per_micro_batch, default=0) > self.capacity:
            raise ValueError(
                f"a micro-batch of {max(rows_per_micro_batch)} rows exceeds the device lane's slots "
                f"({self.capacity} rows: the attention node's max_batch_tokens)"
            )
        self.lane.begin_step(step, [list(rows_per_micro_batch)] * len(self.expert_peers))
        real = rows_per_micro_batch if real_rows is None else real_rows
        if len(real) != len(rows_per_micro_batch) or not all(
            0 <= r <= n for r, n in zip(real, rows_per_micro_batch, strict=True)
        ):
            raise ValueError(
                f"real rows {real} do not fit the micro-batches' {rows_per_micro_batch}"
            )
        real_M = torch.zeros(self._real_M.shape, dtype=torch.int64)
        real_M[: len(real)] = torch.tensor(real, dtype=torch.int64)
        if real_M.device != self._real_M.device:  # a fresh pinned block: a copy of the step
            real_M = real_M.pin_memory()  # before may still be waiting for this memory
        self._real_M.copy_(real_M, non_blocking=True)  # read by dispatch, in stream order
        frame = control_frame(rows_per_micro_batch, graphed)
        open_step(self.transport, self.expert_peers, step, frame)

    def dispatch(
        self,
        step: int,
        layer: int,
        micro_batch: int,
        x_TD: torch.Tensor,
        ids_TK: torch.Tensor,
        weights_TK: torch.Tensor,
    ) -> tuple[int, int, int]:
        T = x_TD.shape[0]
        routed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        for j, (remote, me) in enumerate(self.lane.peers):
            assert remote.local_ids_MPCK is not None and remote.weights_MPCK is not None
            rows_TD = remote.rows_MPCD[micro_batch, me, :T]
            local_ids_TK = remote.local_ids_MPCK[micro_batch, me, :T]
            kept_TK = remote.weights_MPCK[micro_batch, me, :T]
            if kernels.usable(rows_TD):  # the peer's memory: one kernel writes its share
                from afd.models.kernels.node_share import write_node_share

                holders = self.routing.holders(layer)
                real_1 = self._real_M[micro_batch : micro_batch + 1]
                write_node_share(
                    x_TD, ids_TK, weights_TK, holders, real_1, j, rows_TD, local_ids_TK, kept_TK
                )
            else:  # host memory (the proxy lane's outbox on a GPU node), or no Triton
                if routed is None:
                    node_TK, local_TK = self.routing.route(layer, ids_TK, self._rows_C[:T])
                    real_T1 = (self._rows_C[:T] < self._real_M[micro_batch])[:, None]
                    routed = node_TK, local_TK, real_T1
                node_TK, local_TK, real_T1 = routed
                on_TK = (node_TK == j) & real_T1
                # non-blocking: on the proxy lane the slot is pinned host memory
                rows_TD.copy_(x_TD, non_blocking=True)
                local_ids_TK.copy_(torch.where(on_TK, local_TK, -1), non_blocking=True)
                kept_TK.copy_(torch.where(on_TK, weights_TK, 0), non_blocking=True)
            self.lane.release(j, layer, micro_batch)
        return layer, micro_batch, T

    def combine(self, plan: tuple[int, int, int], like_TD: torch.Tensor) -> torch.Tensor:
        layer, mb, T = plan
        self.lane.wait(layer, mb, self.timeout_s, [T] * len(self.expert_peers))
        self.rounds += 1
        rows_MPCD = self.lane.own.rows_MPCD
        if rows_MPCD.shape[1] == 1:
            # the slot itself: the expert node writes it again only after this node's next
            # dispatch of this micro-batch, by which time the next layer's norm has read it
            return rows_MPCD[mb, 0, :T]
        return rows_MPCD[mb, :, :T].sum(dim=0)

    def launched(self, step: int) -> None:
        stale = [s for s in self._status if s < step - 2]  # of steps abandoned in a failure
        for s in stale:
            del self._status[s]
        self._status[step] = self.lane.status_snapshot()

    def end_step(self, step: int) -> None:
        what = f"attention node, step {step}"
        snapshot = self._status.pop(step, None)
        if snapshot is None:
            self.lane.check(what)
        else:
            snapshot.check(what)
        take_calls(self.transport, self.expert_peers, step, self.timeout_s)

    @contextmanager
    def capturing(self) -> Iterator[None]:
        """The warm-up runs of a capture execute for real: with the abort word set, their
        waits end at once and their releases write nothing, so no expert node sees a round
        (the rows they copy into its slots are overwritten before the next real release)."""
        self.lane.quiet()
        try:
            yield
        finally:
            torch.cuda.synchronize(self.lane.own.device)
            self.lane.reset()
