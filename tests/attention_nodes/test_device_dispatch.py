"""The device lane's dispatch on the host (CPU slots, a real transport for the control frame):
rows past a step's real rows — a graph bucket's padding — reach the expert node with no expert,
so it neither computes nor counts them."""

from __future__ import annotations

import threading

import pytest
import torch
from afd.attention_nodes.device_dispatch import DeviceDispatcher
from afd.models.expert_placement import ExpertPlacement
from afd.transport.device_lane import DeviceLane
from afd.transport.endpoint import Transport
from afd.transport.slots import SlotKind, SlotLayout
from afd.transport.wire import RoundKey

D, K, E, T = 4, 2, 4, 4


def _lane(kind: SlotKind, node: int, writers: list[int]) -> DeviceLane:
    return DeviceLane.allocate(
        SlotLayout(kind, 1, len(writers), 8, D, K, torch.float32),
        node,
        writers,
        2,
        torch.device("cpu"),
    )


def test_padding_rows_go_out_with_no_expert_and_the_control_frame_says_the_rows() -> None:
    expert_lane, attention_lane = (
        _lane(SlotKind.DISPATCH, 1000, [0]),
        _lane(SlotKind.COMBINE, 0, [1000]),
    )
    attention_lane.connect([expert_lane.handle], 0)
    expert_lane.connect([attention_lane.handle], 1000)
    expert_transport, attention_transport = Transport(1000), Transport(0)
    try:
        waiting = threading.Thread(target=expert_transport.wait_for_peers, args=([0], 30.0))
        waiting.start()
        attention_transport.connect(1000, expert_transport.address)
        waiting.join(30)
        dispatcher = DeviceDispatcher(
            attention_transport, attention_lane, [1000], ExpertPlacement.even(E, 1), 30.0
        )
        x = torch.randn(T, D)
        ids = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0]])
        weights = torch.rand(T, K)
        dispatcher.begin_step(5, [T], graphed=True, real_rows=[2])
        dispatcher.dispatch(5, 0, 0, x, ids, weights)
        (control,) = expert_transport.recv(0, RoundKey.control(5), 30.0)
        assert control.tolist() == [T, 1]  # the rows and the graph flag: padding included
        local = expert_lane.own.local_ids_MPCK
        assert local is not None and expert_lane.own.weights_MPCK is not None
        assert local[0, 0, :2].tolist() == ids[:2].tolist()  # one node: local id = expert id
        assert (local[0, 0, 2:T] == -1).all()  # padding: no expert
        assert (expert_lane.own.weights_MPCK[0, 0, 2:T] == 0).all()
        dispatcher.begin_step(6, [T], graphed=False)  # every row real by default
        dispatcher.dispatch(6, 0, 0, x, ids, weights)
        assert local[0, 0, :T].tolist() == ids.tolist()
        with pytest.raises(ValueError, match=r"real rows \[5\] do not fit"):
            dispatcher.begin_step(7, [T], graphed=True, real_rows=[5])
    finally:
        for t in (attention_transport, expert_transport):
            t.close()
        for lane in (attention_lane, expert_lane):
            lane.close()
