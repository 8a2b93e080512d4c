"""The device lane's parts on the host: slot layout, sequence words, shared regions between
processes, and the wait's deadline and abort paths (the GPU kernels: tests/gpu)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import time

import pytest
import torch
from afd.transport import lane_signals, region_memory
from afd.transport.device_lane import DeviceLane
from afd.transport.endpoint import TransportError
from afd.transport.lane_signals import LaneTimeout
from afd.transport.region_memory import RegionError
from afd.transport.slots import ALIGN, SlotKind, SlotLayout, SlotRegion, WaitStatus, sequence

LAYERS = 4


def _layout(kind: SlotKind = SlotKind.DISPATCH, peers: int = 2) -> SlotLayout:
    return SlotLayout(kind, 2, peers, 5, 8, 2, torch.float32)


def test_slot_arrays_are_aligned_and_disjoint() -> None:
    layout = _layout()
    offsets = layout.offsets()
    for _, n, dtype, shape in offsets.values():
        assert n == dtype.itemsize * torch.Size(shape).numel()
    spans = sorted((at, at + n, name) for name, (at, n, _, _) in offsets.items())
    assert [name for *_, name in spans] == ["words", "control", "rows", "local_ids", "weights"]
    for (_, end, _), (start, _, _) in zip(spans, spans[1:], strict=False):
        assert start % ALIGN == 0 and start >= end
    assert layout.nbytes >= spans[-1][1]
    combine = _layout(SlotKind.COMBINE)
    assert "local_ids" not in combine.offsets() and combine.nbytes < layout.nbytes


def test_a_micro_batch_is_one_view_of_every_peer_rows() -> None:
    layout = _layout()
    region = SlotRegion(layout, torch.zeros(layout.nbytes, dtype=torch.uint8))
    assert region.local_ids_MPCK is not None
    region.rows_MPCD[1, 0, :2] = 1.0
    region.rows_MPCD[1, 1, :3] = 2.0
    region.local_ids_MPCK[1] = -1
    x, ids, w = region.micro_batch_rows(1, [2, 3])
    assert x.shape == (5, 8) and ids.shape == w.shape == (5, 2)
    assert x[:, 0].tolist() == [1, 1, 2, 2, 2]
    x, _, _ = region.micro_batch_rows(1, [2])  # one writer: a view, no copy
    assert x.data_ptr() == region.rows_MPCD[1, 0].data_ptr()
    with pytest.raises(ValueError, match="bytes of uint8"):
        SlotRegion(layout, torch.zeros(layout.nbytes - 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        SlotLayout(SlotKind.DISPATCH, 1, 1, 0, 8, 2, torch.float32)


def test_sequence_numbers_grow_with_step_and_layer_and_are_never_zero() -> None:
    seqs = [sequence(s, layer, LAYERS) for s in range(3) for layer in range(LAYERS)]
    assert seqs == sorted(set(seqs)) and min(seqs) == 1


WRITER = """
import pickle, sys, torch
from afd.transport import lane_signals, region_memory
handle, step, layer = pickle.loads(bytes.fromhex(sys.argv[1]))
region = region_memory.open_region(handle, torch.device("cpu"), handle.machine)
region.rows_MPCD[0, 1, :3] = 7.0
mine = torch.zeros(2, dtype=torch.int64)  # the writer's own control words: not aborted
lane_signals.release(region.words_MP[0, 1:2], torch.tensor([step]), 4, layer, mine)
"""


def test_a_region_is_shared_with_another_process() -> None:
    lane = DeviceLane.allocate(
        SlotLayout(SlotKind.DISPATCH, 2, 2, 5, 8, 2, torch.float32),
        9,
        [3, 4],
        LAYERS,
        torch.device("cpu"),
    )
    own = lane.own
    own.words_MP[0, 0] = sequence(6, 2, LAYERS)  # writer 0 already delivered
    lane.begin_step(6)
    arg = pickle.dumps((lane.handle, 6, 2)).hex()
    child = subprocess.Popen([sys.executable, "-c", WRITER, arg], stderr=subprocess.PIPE)
    lane.wait(2, 0, timeout_s=60)  # the other process maps our region, writes, releases
    _, err = child.communicate(timeout=60)
    assert child.returncode == 0, err.decode()
    assert own.rows_MPCD[0, 1, :3].eq(7.0).all() and own.rows_MPCD[0, 1, 3:].eq(0).all()
    assert own.words_MP[0].tolist() == [sequence(6, 2, LAYERS)] * 2
    lane.check("step 6")
    lane.close()


def test_a_wait_ends_at_its_deadline_and_fails_the_rest_of_the_step() -> None:
    lane = DeviceLane.allocate(
        SlotLayout(SlotKind.COMBINE, 1, 1, 4, 8, 2, torch.float32),
        0,
        [1],
        LAYERS,
        torch.device("cpu"),
    )
    lane.begin_step(3)
    start = time.monotonic()
    with pytest.raises(LaneTimeout, match=r"did not deliver its round within 0.05 s") as err:
        lane.wait(0, 0, timeout_s=0.05)
    assert 0.05 <= time.monotonic() - start < 5
    assert isinstance(err.value, TransportError)  # the orchestrator's recovery handles it
    assert int(lane.own.control_2[1]) == WaitStatus.DEADLINE
    lane.own.words_MP[0, 0] = sequence(3, 1, LAYERS)  # a later round arrives: still failed
    with pytest.raises(LaneTimeout, match="an earlier wait of this step failed"):
        lane.wait(1, 0, timeout_s=5)
    with pytest.raises(LaneTimeout, match="step 3"):
        lane.check("step 3")
    peer_word = torch.zeros(1, dtype=torch.int64)
    lane_signals.release(peer_word, lane.step_1, LAYERS, 1, lane.own.control_2)
    assert int(peer_word) == 0  # a failed step publishes nothing it made of stale rows
    lane.reset()
    lane.wait(1, 0, timeout_s=5)
    lane.check("step 3")
    lane_signals.release(peer_word, lane.step_1, LAYERS, 1, lane.own.control_2)
    assert int(peer_word) == sequence(3, 1, LAYERS)
    lane.close()


def test_an_abort_ends_a_wait_and_silences_releases() -> None:
    lane = DeviceLane.allocate(
        SlotLayout(SlotKind.COMBINE, 1, 1, 4, 8, 2, torch.float32),
        0,
        [1],
        LAYERS,
        torch.device("cpu"),
    )
    lane.begin_step(1)
    timer = threading.Timer(0.05, lane.abort)
    timer.start()
    with pytest.raises(LaneTimeout, match="aborted"):
        lane.wait(0, 0, timeout_s=30)
    timer.join()
    peer_word = torch.zeros(1, dtype=torch.int64)
    lane_signals.release(peer_word, lane.step_1, LAYERS, 0, lane.own.control_2)
    assert int(peer_word) == 0  # an aborted node tells no peer its round is there
    lane.reset()
    lane_signals.release(peer_word, lane.step_1, LAYERS, 0, lane.own.control_2)
    assert int(peer_word) == sequence(1, 0, LAYERS)
    lane.close()


def test_regions_are_refused_with_a_reason() -> None:
    lane = DeviceLane.allocate(
        SlotLayout(SlotKind.DISPATCH, 1, 1, 4, 8, 2, torch.float32),
        9,
        [3],
        LAYERS,
        torch.device("cpu"),
    )
    h = lane.handle
    with pytest.raises(RegionError, match="device lane joins peers of one host only"):
        region_memory.open_region(h, torch.device("cpu"), "elsewhere/boot")
    with pytest.raises(RegionError, match="node 5 is not a writer of node 9"):
        h.writer_index(5)
    other = DeviceLane.allocate(
        SlotLayout(SlotKind.COMBINE, 2, 1, 4, 8, 2, torch.float32),
        3,
        [9],
        LAYERS,
        torch.device("cpu"),
    )
    with pytest.raises(RegionError, match="for 1 micro-batches; node 3 needs DISPATCH for 2"):
        other.connect([h], 3)
    lane.close()
    with pytest.raises(RegionError, match="region was released"):
        region_memory.open_region(h, torch.device("cpu"), h.machine)
    gone = region_memory.RegionHandle(
        h.layout, 9, (3,), h.machine, os.getpid() + 10**6, "k", None, ("/proc/0/fd/999",)
    )
    with pytest.raises(RegionError, match="cannot map node 9's slots"):
        region_memory.open_region(gone, torch.device("cpu"), h.machine)
    other.close()
