"""The slot lane a node opens, by the deployment's `transport.lane`: one place for both kinds.

"device": peers on this host write into each other's memory (`DeviceLane`); "proxy": each
node's proxy thread moves the slots over the network (`ProxyLane`). Their handles are what a
node gives its peers to reach its region.
"""

from __future__ import annotations

import torch
from afd.transport.device_lane import DeviceLane
from afd.transport.endpoint import TransportSettings
from afd.transport.proxy_lane import ProxyHandle, ProxyLane
from afd.transport.region_memory import RegionHandle
from afd.transport.slots import SlotKind

SLOT_LANES = ("device", "proxy")
LaneHandle = RegionHandle | ProxyHandle


def open_lane(
    lane: str,
    kind: SlotKind,
    node_id: int,
    writers: list[int],
    micro_batches: int,
    capacity: int,
    hidden: int,
    top_k: int,
    num_layers: int,
    last_layer: int,
    dtype: torch.dtype,
    device: torch.device,
    settings: TransportSettings,
    timeout_s: float,
) -> DeviceLane | ProxyLane:
    """This node's region for slots of `kind`, written by the nodes `writers` in that order.
    `last_layer`: the last layer with an exchange; `settings`, `timeout_s`: the proxy's."""
    if lane == "device":
        return DeviceLane.allocate(
            kind, node_id, writers, micro_batches, capacity, hidden, top_k, num_layers, dtype,
            device,
        )  # fmt: skip
    if lane == "proxy":
        return ProxyLane.allocate(
            kind, node_id, writers, micro_batches, capacity, hidden, top_k, num_layers,
            last_layer, dtype, device, settings, timeout_s,
        )  # fmt: skip
    raise ValueError(f"no slot lane {lane!r}: use one of {SLOT_LANES}")
