"""The proxy lane's protocol on the host: two nodes' proxies over real UCX endpoints (loopback
TCP), the slots in host memory. The GPU side (kernels releasing pinned words, the proxy's
staging copies): tests/gpu."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import torch
from afd.transport.device_lane import DeviceLane
from afd.transport.endpoint import TransportSettings
from afd.transport.lane_signals import LaneTimeout
from afd.transport.lanes import open_lane
from afd.transport.proxy_lane import STEPS_QUEUED, ProxyLane
from afd.transport.region_memory import RegionError
from afd.transport.slots import SlotKind, SlotLayout, sequence
from afd.transport.wire import RoundKey

LAYERS, LAST = 4, 3
ATTENTION, EXPERT = 0, 1000
M, CAPACITY, HIDDEN, TOP_K = 2, 6, 8, 2
TIMEOUT_S = 10.0


def _lane(kind: SlotKind, node_id: int, writer: int, timeout_s: float = TIMEOUT_S) -> ProxyLane:
    layout = SlotLayout(kind, M, 1, CAPACITY, HIDDEN, TOP_K, torch.float32)
    lane = open_lane(
        "proxy", layout, node_id, [writer], LAYERS, LAST, torch.device("cpu"),
        TransportSettings(), timeout_s,
    )  # fmt: skip
    assert isinstance(lane, ProxyLane)
    return lane


def _join(attention: ProxyLane, expert: ProxyLane) -> None:
    """As the orchestrator wires them: the expert node awaits, the attention node connects."""
    waits = threading.Thread(target=expert.connect, args=([attention.handle], EXPERT))
    waits.start()
    attention.connect([expert.handle], ATTENTION)
    waits.join(TIMEOUT_S)


@pytest.fixture
def pair() -> Iterator[tuple[ProxyLane, ProxyLane]]:
    attention = _lane(SlotKind.COMBINE, ATTENTION, EXPERT)
    expert = _lane(SlotKind.DISPATCH, EXPERT, ATTENTION)
    try:
        _join(attention, expert)
        yield attention, expert
    finally:
        attention.close()
        expert.close()


def _round(
    attention: ProxyLane, expert: ProxyLane, step: int, layer: int, rows: list[int]
) -> torch.Tensor:
    """One exchange per micro-batch: rows out, their sums (rows * 2) back; returns the sums
    of the last micro-batch as the attention node reads them."""
    for mb, n in enumerate(rows):
        outbox, me = attention.peers[0]
        assert outbox.local_ids_MPCK is not None and outbox.weights_MPCK is not None
        outbox.rows_MPCD[mb, me, :n] = torch.arange(n * HIDDEN, dtype=torch.float32).view(n, -1)
        outbox.local_ids_MPCK[mb, me, :n] = layer
        outbox.weights_MPCK[mb, me, :n] = 0.5
        attention.release(0, layer, mb)
        expert.wait(layer, mb, TIMEOUT_S)
        x, ids, weights = expert.own.micro_batch_rows(mb, [n])
        assert torch.equal(ids, torch.full((n, TOP_K), layer, dtype=torch.int16))
        assert torch.equal(weights, torch.full((n, TOP_K), 0.5))
        back, me = expert.peers[0]
        back.rows_MPCD[mb, me, :n] = x * 2
        expert.release(0, layer, mb)
        attention.wait(layer, mb, TIMEOUT_S)
    return attention.own.rows_MPCD[len(rows) - 1, 0, : rows[-1]]


def test_rows_go_out_and_sums_come_back_through_the_proxies(
    pair: tuple[ProxyLane, ProxyLane],
) -> None:
    attention, expert = pair
    for step in (3, 4):
        attention.begin_step(step, [[3, 5]])
        expert.begin_step(step, [[3, 5]])
        for layer in range(LAYERS):
            sums = _round(attention, expert, step, layer, [3, 5])
            assert torch.equal(sums, 2 * torch.arange(5 * HIDDEN, dtype=torch.float32).view(5, -1))
        assert attention.own.words_MP[1, 0] == sequence(step, LAST, LAYERS)
    attention.check("attention")
    expert.check("expert")
    assert attention.frames_sent == expert.frames_delivered == 2 * LAYERS * M
    # only the rows in use crossed: not the slots' capacity
    rows_bytes = (3 + 5) * HIDDEN * 4 * 2 * LAYERS
    assert attention.transport.stats.bytes_sent < 2 * rows_bytes * CAPACITY / 5


def test_a_round_nobody_sends_ends_at_its_deadline_naming_the_round(
    pair: tuple[ProxyLane, ProxyLane],
) -> None:
    attention, _ = pair
    attention.begin_step(1, [[1, 1]])
    start = time.monotonic()
    with pytest.raises(LaneTimeout, match=r"within 0.2 s .*expected 6"):
        attention.wait(1, 0, 0.2)
    assert time.monotonic() - start < 5
    with pytest.raises(LaneTimeout, match="an earlier wait of this step failed"):
        attention.wait(2, 0, TIMEOUT_S)  # the step is over: every later wait ends at once
    attention.reset(2)
    attention.check("after the reset")


def test_an_abort_ends_a_wait_at_once(pair: tuple[ProxyLane, ProxyLane]) -> None:
    attention, _ = pair
    attention.begin_step(1, [[1, 1]])
    threading.Timer(0.1, attention.abort).start()
    start = time.monotonic()
    with pytest.raises(LaneTimeout, match="aborted"):
        attention.wait(0, 0, TIMEOUT_S)
    assert time.monotonic() - start < TIMEOUT_S / 2


def test_a_bad_frame_is_dropped_and_named_when_its_round_times_out(
    pair: tuple[ProxyLane, ProxyLane],
) -> None:
    attention, expert = pair
    expert.begin_step(2, [[1, 1]])
    key = RoundKey.exchange(2, 0, 0)
    too_wide = torch.zeros(1, HIDDEN + 1)
    attention.transport.send(EXPERT, key, [too_wide, too_wide, too_wide]).result(TIMEOUT_S)
    with pytest.raises(LaneTimeout):
        expert.wait(0, 0, 0.3)
    with pytest.raises(
        LaneTimeout,
        match=r"the proxy sent 0 frames and delivered 0; a frame from node 0 .* dropped: .*shape",
    ):
        expert.check("expert node")
    expert.reset(3)  # recovery forgets it
    expert.check("after recovery")


def test_late_frames_of_an_abandoned_step_are_dropped(pair: tuple[ProxyLane, ProxyLane]) -> None:
    attention, expert = pair
    expert.reset(5)  # a failure: the cluster goes on from step 5
    outbox, _ = attention.peers[0]
    outbox.rows_MPCD[0, 0, :2] = 7.0
    attention.begin_step(4, [[2, 2]])
    attention.release(0, 0, 0)  # a round of step 4, sent after the expert node moved on
    expert.begin_step(5, [[2, 2]])
    with pytest.raises(LaneTimeout):
        expert.wait(0, 0, 0.3)  # its word never reached step 4, let alone 5
    assert int(expert.own.words_MP[0, 0]) == 0
    assert not expert.own.rows_MPCD[0, 0].any()  # nor its bytes in the slot
    assert outbox is attention.peers[0][0]


def test_a_round_of_a_step_that_did_not_begin_is_not_sent(
    pair: tuple[ProxyLane, ProxyLane],
) -> None:
    attention, expert = pair
    attention.step_1.fill_(7)  # the kernels' step, without `begin_step`: no rows known
    attention.release(0, 0, 0)
    attention.begin_step(8, [[1, 1]])  # (any later wait's error names the cause)
    expert.begin_step(8, [[1, 1]])
    with pytest.raises(LaneTimeout):
        attention.wait(0, 0, 0.3)
    with pytest.raises(LaneTimeout, match="round 29 released for step 7, which did not begin"):
        attention.check("attention node")


def test_a_round_of_a_step_queued_behind_many_newer_ones_is_still_sent(
    pair: tuple[ProxyLane, ProxyLane],
) -> None:
    """A stream runs ahead of its host's `begin_step` calls: a CUDA graph per step, replayed
    for a whole phase, releases the first step's rounds after the last step began."""
    attention, expert = pair
    for step in range(1, 9):
        attention.begin_step(step, [[2, 1]])
    assert attention._sends_due() and 1 in attention._steps  # (a GPU proxy's look, pruning)
    expert.begin_step(1, [[2, 1]])
    attention.step_1.fill_(1)  # the stream reaches step 1 only now
    for layer in range(LAYERS):
        assert _round(attention, expert, 1, layer, [2, 1]).shape == (1, HIDDEN)
    attention.check("attention node")


def test_a_step_far_behind_the_newest_counts_as_abandoned(
    pair: tuple[ProxyLane, ProxyLane],
) -> None:
    attention, _ = pair
    attention.begin_step(1, [[1, 1]])
    attention.begin_step(1 + STEPS_QUEUED, [[1, 1]])
    assert attention._sends_due() and 1 not in attention._steps


@pytest.mark.parametrize("operator", [False, True])
def test_the_proxys_ucx_context_sends_eagerly_unless_the_operator_said_otherwise(
    operator: bool,
) -> None:
    """ucxx's import writes UCX_RNDV_THRESH=8192 into os.environ, which child processes
    inherit: only what the operator set (handed down in AFD_UCX_OPERATOR_VARS) wins."""
    env = dict(os.environ, UCX_RNDV_THRESH="8192")  # as a child of an importer inherits it
    env.pop("AFD_UCX_OPERATOR_VARS", None)
    if not operator:
        env["AFD_UCX_OPERATOR_VARS"] = ""  # the parent's operator set none
    probe = (
        "from afd.transport import endpoint; "
        "print(endpoint._new_context(eager_host_frames=True).config['RNDV_THRESH'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == (
        "intra:8K,inter:8K" if operator else "intra:inf,inter:inf"
    )


def test_a_restarted_peer_is_joined_again(pair: tuple[ProxyLane, ProxyLane]) -> None:
    attention, old = pair
    old.close()
    new = _lane(SlotKind.DISPATCH, EXPERT, ATTENTION)
    try:
        waits = threading.Thread(target=new.connect, args=([attention.handle], EXPERT))
        waits.start()
        attention.reconnect(new.handle, ATTENTION)
        waits.join(TIMEOUT_S)
        attention.reset(9)
        attention.begin_step(9, [[2, 1]])
        new.begin_step(9, [[2, 1]])
        assert _round(attention, new, 9, 0, [2, 1]).shape == (1, HIDDEN)
    finally:
        new.close()


def test_a_peer_of_the_other_lane_or_direction_is_refused() -> None:
    attention = _lane(SlotKind.COMBINE, ATTENTION, EXPERT)
    device = DeviceLane.allocate(
        SlotLayout(SlotKind.DISPATCH, M, 1, CAPACITY, HIDDEN, TOP_K, torch.float32),
        EXPERT,
        [ATTENTION],
        LAYERS,
        torch.device("cpu"),
    )
    other = _lane(SlotKind.COMBINE, 5, ATTENTION)
    try:
        with pytest.raises(RegionError, match="runs the proxy lane, a peer gave a RegionHandle"):
            attention.connect([device.handle], ATTENTION)
        with pytest.raises(RegionError, match="runs the device lane, a peer gave a ProxyHandle"):
            device.connect([attention.handle], EXPERT)
        with pytest.raises(RegionError, match="needs DISPATCH"):
            attention.connect([other.handle], ATTENTION)
        with pytest.raises(ValueError, match="rows for each of its 0 peers"):
            attention.begin_step(1, [[1]])
    finally:
        for lane in (attention, device, other):
            lane.close()
