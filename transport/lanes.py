"""The slot lane a node opens, by the deployment's `transport.lane`: one place for both kinds.

"device": peers on this host write into each other's memory (`DeviceLane`); "proxy": each
node's proxy thread moves the slots over the network (`ProxyLane`). Their handles are what a
node gives its peers to reach its region.
"""

from __future__ import annotations

import torch
from afd.transport.device_lane import DeviceLane, check_writers
from afd.transport.endpoint import TransportSettings
from afd.transport.proxy_lane import ProxyHandle, ProxyLane
from afd.transport.region_memory import RegionHandle
from afd.transport.slots import SlotLayout, SlotRegion

SLOT_LANES = ("device", "proxy")
LaneHandle = RegionHandle | ProxyHandle


def open_lane(
    lane: str,
    layout: SlotLayout,
    node_id: int,
    writers: list[int],
    num_layers: int,
    last_layer: int,
    device: torch.device,
    settings: TransportSettings,
    timeout_s: float,
) -> DeviceLane | ProxyLane:
    """This node's region for `layout`'s slots, written by the nodes `writers` in that order.
    `last_layer`: the last layer with an exchange; `settings`, `timeout_s`: the proxy's."""
    if lane == "device":
        return DeviceLane.allocate(layout, node_id, writers, num_layers, device)
    if lane == "proxy":
        check_writers(layout, writers)
        own = SlotRegion(layout, torch.zeros(layout.nbytes, dtype=torch.uint8, device=device))
        return ProxyLane(own, tuple(writers), node_id, num_layers, last_layer, settings, timeout_s)
    raise ValueError(f"no slot lane {lane!r}: use one of {SLOT_LANES}")
