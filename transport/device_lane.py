"""One node's end of the device lane: the region it receives into and its peers' regions.

An attention node receives combine slots and writes into every expert node's dispatch slots;
an expert node the other way round. Both sides follow one step counter in device memory
(`step_1`, set once a step) from which the waits and releases compute each round's sequence
number, so that the same kernels, or a CUDA graph of them, serve every step.
"""

from __future__ import annotations

import torch
from afd.transport import lane_signals, region_memory
from afd.transport.endpoint import machine_id
from afd.transport.region_memory import RegionHandle
from afd.transport.slots import SlotKind, SlotLayout, SlotRegion


class DeviceLane:
    def __init__(self, own: SlotRegion, handle: RegionHandle, num_layers: int) -> None:
        self.own, self.handle, self.num_layers = own, handle, num_layers
        self.peers: list[
            tuple[SlotRegion, int]
        ] = []  # (peer's region, our index among its writers)
        self.peer_ids: list[int] = []
        self.step_1 = torch.zeros(1, dtype=torch.int64, device=own.device)
        self._abort = lane_signals.AbortSwitch(own.control_2)

    @classmethod
    def allocate(
        cls,
        kind: SlotKind,
        node_id: int,
        writers: list[int],
        micro_batches: int,
        capacity: int,
        hidden: int,
        top_k: int,
        num_layers: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> DeviceLane:
        """Our region, for slots of `kind` written by the nodes `writers` (in that order)."""
        layout = SlotLayout(kind, micro_batches, len(writers), capacity, hidden, top_k, dtype)
        own, handle = region_memory.allocate(layout, node_id, tuple(writers), machine_id(), device)
        return cls(own, handle, num_layers)

    def connect(self, peer_regions: list[RegionHandle], node_id: int) -> None:
        """Maps every peer's region, in peer order (replacing earlier mappings)."""
        expected = (
            SlotKind.COMBINE if self.own.layout.kind == SlotKind.DISPATCH else SlotKind.DISPATCH
        )
        peers = []
        for h in peer_regions:
            if h.layout.kind != expected or h.layout.micro_batches != self.own.layout.micro_batches:
                raise region_memory.RegionError(
                    f"node {h.owner}'s slots are {h.layout.kind.name} for {h.layout.micro_batches} "
                    f"micro-batches; node {node_id} needs {expected.name} for {self.own.layout.micro_batches}"
                )
            region = region_memory.open_region(h, self.own.device, machine_id())
            peers.append((region, h.writer_index(node_id)))
        self.peers, self.peer_ids = peers, [h.owner for h in peer_regions]

    def reconnect(self, handle: RegionHandle, node_id: int) -> None:
        """Maps a restarted peer's new region in place of its old one."""
        if handle.owner not in self.peer_ids:
            raise region_memory.RegionError(f"node {handle.owner} is not a peer of node {node_id}")
        region = region_memory.open_region(handle, self.own.device, machine_id())
        self.peers[self.peer_ids.index(handle.owner)] = (region, handle.writer_index(node_id))

    def begin_step(self, step: int) -> None:
        self.step_1.fill_(step)

    def wait(self, layer: int, micro_batch: int, timeout_s: float) -> None:
        """Until every peer delivered round (step, layer) into our slots of `micro_batch`."""
        lane_signals.wait(
            self.own.words_MP[micro_batch],
            self.step_1,
            self.num_layers,
            layer,
            self.own.control_2,
            timeout_s,
        )

    def release(self, peer: int, layer: int, micro_batch: int) -> None:
        """Tells peer `peer` (an index into `peers`) its slot of `micro_batch` holds round
        (step, layer)."""
        region, me = self.peers[peer]
        word_1 = region.words_MP[micro_batch, me : me + 1]
        lane_signals.release(word_1, self.step_1, self.num_layers, layer, self.own.control_2)

    def abort(self) -> None:
        """Ends every wait of the step in progress at once (from any thread)."""
        self._abort.set()

    def quiet(self) -> None:
        """Sets the abort word now, in stream order: the runs that warm a CUDA graph up
        execute for real, and must neither wait for peers nor tell them anything."""
        self.own.control_2[0:1].fill_(1)

    def reset(self) -> None:
        self.own.control_2.zero_()

    def check(self, what: str) -> None:
        lane_signals.check(self.own.control_2, what)

    def status_snapshot(self) -> StatusSnapshot:
        """The status word as the work enqueued so far leaves it, copied to the host without
        waiting: a node that launches its next step before checking this one's."""
        return StatusSnapshot(self.own.control_2)

    def close(self) -> None:
        self.peers = []
        region_memory.release(self.handle)


class HostCopy:
    """A device tensor copied to the host in stream order, without waiting (`result` waits)."""

    def __init__(self, t: torch.Tensor) -> None:
        if not t.is_cuda:
            self._host, self._done = t, None
            return
        self._host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self._host.copy_(t, non_blocking=True)
        self._done = torch.cuda.Event()
        self._done.record()

    def result(self) -> torch.Tensor:
        if self._done is not None:
            self._done.synchronize()
        return self._host


class StatusSnapshot:
    """A copy of a lane's status word in stream order, read on the host by `check`."""

    def __init__(self, control_2: torch.Tensor) -> None:
        self._copy = HostCopy(control_2.clone() if not control_2.is_cuda else control_2)

    def check(self, what: str) -> None:
        lane_signals.check(self._copy.result(), what)
