"""One node's end of the device lane: the region it receives into and its peers' regions.

An attention node receives combine slots and writes into every expert node's dispatch slots;
an expert node the other way round. Peers are on this host: their regions are mapped into this
process (`region_memory`), so a kernel's write lands in the peer's memory and its release is the
peer's signal. The step counter, waits and releases are `SlotLane`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from afd.transport import region_memory
from afd.transport.endpoint import machine_id
from afd.transport.region_memory import RegionHandle
from afd.transport.slot_lane import SlotLane
from afd.transport.slots import SlotKind, SlotLayout, SlotRegion


class DeviceLane(SlotLane):
    def __init__(self, own: SlotRegion, handle: RegionHandle, num_layers: int) -> None:
        super().__init__(own, num_layers)
        self.handle = handle

    @classmethod
    def allocate(
        cls,
        layout: SlotLayout,
        node_id: int,
        writers: list[int],
        num_layers: int,
        device: torch.device,
    ) -> DeviceLane:
        """Our region for `layout`'s slots, written by the nodes `writers` (in that order)."""
        check_writers(layout, writers)
        own, handle = region_memory.allocate(layout, node_id, tuple(writers), machine_id(), device)
        return cls(own, handle, num_layers)

    def connect(self, peer_regions: Sequence[object], node_id: int) -> None:
        """Maps every peer's region, in peer order (replacing earlier mappings)."""
        peers, owners = [], []
        for handle in peer_regions:
            h = _region_handle(handle, node_id)
            check_peer_layout(self.own.layout, h.layout, h.owner, node_id)
            region = region_memory.open_region(h, self.own.device, machine_id())
            peers.append((region, h.writer_index(node_id)))
            owners.append(h.owner)
        self.peers, self.peer_ids = peers, owners

    def reconnect(self, handle: object, node_id: int) -> None:
        """Maps a restarted peer's new region in place of its old one."""
        handle = _region_handle(handle, node_id)
        if handle.owner not in self.peer_ids:
            raise region_memory.RegionError(f"node {handle.owner} is not a peer of node {node_id}")
        region = region_memory.open_region(handle, self.own.device, machine_id())
        self.peers[self.peer_ids.index(handle.owner)] = (region, handle.writer_index(node_id))

    def close(self) -> None:
        self.peers = []
        region_memory.release(self.handle)


def _region_handle(handle: object, node_id: int) -> RegionHandle:
    if not isinstance(handle, RegionHandle):
        raise region_memory.RegionError(
            f"node {node_id} runs the device lane, a peer gave a {type(handle).__name__}: "
            "every node of a deployment must run the same lane"
        )
    return handle


def check_writers(layout: SlotLayout, writers: list[int]) -> None:
    if len(writers) != layout.peers:
        raise ValueError(f"{len(writers)} writers for slots laid out for {layout.peers}")


def check_peer_layout(own: SlotLayout, peer: SlotLayout, owner: int, node_id: int) -> None:
    """A peer's region must hold the other direction's slots, for as many micro-batches."""
    expected = SlotKind.COMBINE if own.kind == SlotKind.DISPATCH else SlotKind.DISPATCH
    if peer.kind != expected or peer.micro_batches != own.micro_batches:
        raise region_memory.RegionError(
            f"node {owner}'s slots are {peer.kind.name} for {peer.micro_batches} "
            f"micro-batches; node {node_id} needs {expected.name} for {own.micro_batches}"
        )
