"""The slot lanes on a GPU (run on the GPU host; skipped elsewhere): the wait and release
kernels, their deadline and abort, inside a CUDA graph, on device words and on the proxy
lane's pinned words; and an attention node here with its expert node in another process
(under CUDA MPS), over the device and the proxy lane, giving the colocated engine's tokens."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from afd.attention_nodes.node import AttentionNode, AttentionNodeSettings
from afd.expert_nodes import process as expert_process
from afd.expert_nodes.node import ExpertNodeSettings
from afd.models.config import load_config
from afd.models.expert_placement import ExpertPlacement
from afd.models.messages import NewRequest, TokenOutput
from afd.models.reference import ReferenceEngine
from afd.models.sampling import SamplingParams
from afd.transport import lane_signals
from afd.transport.device_lane import DeviceLane
from afd.transport.endpoint import TransportError, TransportSettings
from afd.transport.lane_signals import LaneTimeout
from afd.transport.lanes import open_lane
from afd.transport.proxy_lane import ProxyLane
from afd.transport.region_memory import mps_running
from afd.transport.slots import SlotKind, SlotLayout, WaitStatus, sequence

from tests.gpu.test_gpu_engine import _serve

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
LAYERS = 4
PROMPTS = ["Hello, world!", "The capital of France is", "one two three", "def add(a, b):", "Hi"]


def _lane() -> DeviceLane:
    return DeviceLane.allocate(
        SlotLayout(SlotKind.COMBINE, 1, 1, 4, 8, 2, torch.bfloat16),
        0,
        [1],
        LAYERS,
        torch.device("cuda"),
    )


def test_release_then_wait_and_the_deadline_and_abort_paths() -> None:
    lane = _lane()
    quiet = torch.zeros(2, dtype=torch.int64, device="cuda")  # a peer's control words
    word = lane.own.words_MP[0, 0:1]
    lane.begin_step(2)
    lane_signals.release(word, lane.step_1, LAYERS, 1, quiet)
    lane.wait(1, 0, timeout_s=5)
    torch.cuda.synchronize()
    lane.check("released")
    assert int(word) == sequence(2, 1, LAYERS)

    start = time.monotonic()
    lane.wait(2, 0, timeout_s=0.05)  # nobody releases layer 2
    lane.wait(3, 0, timeout_s=30)  # returns at once: the step already failed
    torch.cuda.synchronize()
    assert 0.05 <= time.monotonic() - start < 5
    assert int(lane.own.control_2[1]) == WaitStatus.DEADLINE
    with pytest.raises(LaneTimeout, match="did not deliver"):
        lane.check("deadline")

    lane.reset()
    timer = threading.Timer(0.2, lane.abort)  # from another thread, while the kernel spins
    start = time.monotonic()
    timer.start()
    lane.wait(2, 0, timeout_s=30)
    torch.cuda.synchronize()
    timer.join()
    assert 0.2 <= time.monotonic() - start < 10
    with pytest.raises(LaneTimeout, match="aborted"):
        lane.check("abort")
    lane_signals.release(word, lane.step_1, LAYERS, 3, lane.own.control_2)
    torch.cuda.synchronize()
    assert int(word) == sequence(2, 1, LAYERS)  # an aborted node releases nothing
    lane.close()


def test_a_graph_of_releases_and_waits_follows_the_step_counter() -> None:
    lane = _lane()
    quiet = torch.zeros(2, dtype=torch.int64, device="cuda")
    word = lane.own.words_MP[0, 0:1]

    def rounds() -> None:
        for layer in range(LAYERS):
            lane_signals.release(word, lane.step_1, LAYERS, layer, quiet)
            lane.wait(layer, 0, timeout_s=5)

    rounds()  # compiles the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rounds()
    for step in (5, 6, 9):
        lane.begin_step(step)
        graph.replay()
        torch.cuda.synchronize()
        lane.check(f"step {step}")
        assert int(word) == sequence(step, LAYERS - 1, LAYERS)
    lane.close()


def test_the_proxy_lane_moves_a_graphed_steps_rounds_through_pinned_words() -> None:
    """A GPU node's proxy lane against a host peer in this process: the kernels release the
    outbox's pinned words and wait on the inbox's, then copy the rows in; eager, then as a
    replayed CUDA graph for later steps."""

    def layout(kind: SlotKind) -> SlotLayout:
        return SlotLayout(kind, 1, 1, 4, 8, 2, torch.bfloat16)

    gpu = open_lane("proxy", layout(SlotKind.COMBINE), 0, [1000], LAYERS, LAYERS - 1,
                    torch.device("cuda"), TransportSettings(), 10.0)  # fmt: skip
    host = open_lane("proxy", layout(SlotKind.DISPATCH), 1000, [0], LAYERS, LAYERS - 1,
                     torch.device("cpu"), TransportSettings(), 10.0)  # fmt: skip
    assert isinstance(gpu, ProxyLane) and isinstance(host, ProxyLane)
    joined = threading.Thread(target=host.connect, args=([gpu.handle], 1000))
    joined.start()
    gpu.connect([host.handle], 0)
    joined.join(30)
    assert gpu.own.rows_MPCD.is_cuda and gpu.inbox.rows_MPCD.is_pinned()
    assert gpu.inbox.words_MP.is_pinned() and gpu.peers[0][0].words_MP.is_pinned()
    source = torch.randn(3, 8, device="cuda").to(torch.bfloat16)

    def rounds() -> None:
        outbox, me = gpu.peers[0]
        for layer in range(LAYERS):
            outbox.rows_MPCD[0, me, :3].copy_(source * (layer + 1), non_blocking=True)
            gpu.release(0, layer, 0)
            gpu.wait(layer, 0, timeout_s=5, rows_P=[3])

    def echo(step: int) -> None:  # the host peer: each round's rows back, plus one
        host.begin_step(step, [[3]])
        back, me = host.peers[0]
        for layer in range(LAYERS):
            host.wait(layer, 0, 10.0)
            back.rows_MPCD[0, me, :3] = host.own.rows_MPCD[0, 0, :3] + 1
            host.release(0, layer, 0)

    def step(s: int, graph: torch.cuda.CUDAGraph | None) -> None:
        peer = threading.Thread(target=echo, args=(s,))
        peer.start()
        gpu.begin_step(s, [[3]])
        rounds() if graph is None else graph.replay()
        torch.cuda.synchronize()
        peer.join(30)
        gpu.check(f"step {s}")
        want = (source * LAYERS).cpu() + 1
        assert torch.equal(gpu.own.rows_MPCD[0, 0, :3].cpu(), want)

    try:
        step(1, None)  # compiles the kernels outside the capture
        graph = torch.cuda.CUDAGraph()
        gpu.quiet()
        with torch.cuda.graph(graph):
            rounds()
        torch.cuda.synchronize()
        gpu.reset()
        for s in (5, 6, 9):
            step(s, graph)
        assert gpu.frames_sent == host.frames_delivered == 4 * LAYERS
    finally:
        gpu.close()
        host.close()


@pytest.mark.skipif(not mps_running(), reason="two processes on one GPU need CUDA MPS")
@pytest.mark.parametrize(
    ("lane", "micro_batches"),
    [("device", 1), ("device", 2), ("device", 3), ("proxy", 1), ("proxy", 2), ("proxy", 3)],
)
def test_an_expert_process_over_a_slot_lane_gives_the_colocated_tokens(
    tiny_model: Path, lane: str, micro_batches: int
) -> None:
    """The device lane (slots shared by CUDA IPC) and the proxy lane (slots moved by the
    processes' proxy threads over UCX): the colocated engine's tokens, for m = 1, 2, 3."""
    ref = ReferenceEngine(tiny_model)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    requests = [NewRequest(f"r{i}", ref.tokenizer.encode(t), params) for i, t in enumerate(PROMPTS)]
    settings = AttentionNodeSettings(0, str(tiny_model), device="cuda", block_size=4)
    colocated = AttentionNode(settings, None)
    want = _serve(colocated, requests)
    colocated.shutdown()

    placement = ExpertPlacement.even(load_config(tiny_model).num_experts, 1)
    settings = replace(settings, micro_batches=micro_batches, lane=lane)
    expert = ExpertNodeSettings(
        1000, str(tiny_model), placement.assignment[0], micro_batches=micro_batches,
        device="cuda", lane=lane,
    )  # fmt: skip
    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    child = ctx.Process(
        target=expert_process.serve, args=(expert, settings.max_batch_tokens, 1, there), daemon=True
    )
    child.start()
    try:
        node = AttentionNode(settings, placement)
        address, slots = here.recv()
        here.send([0])
        here.send([node.connect([(1000, address)], [slots])])
        here.send(0)  # the step it starts at
        got = _serve(node, requests)
        # decode steps replay one graph with the exchange inside, for every m
        assert node.graphs is not None and node.graphs.replays > 10
        node.shutdown()
    finally:
        child.terminate()
        child.join(30)
    for r in requests:
        ids = [t.token_id for t in got[r.request_id]]
        assert ids == [t.token_id for t in want[r.request_id]], r.request_id
        logprobs = [t.logprob for t in got[r.request_id]]
        if micro_batches == 1:  # the same kernels over the same rows: bit-identical
            assert logprobs == [t.logprob for t in want[r.request_id]]
        else:
            assert logprobs == pytest.approx([t.logprob for t in want[r.request_id]], abs=1e-3)


def _start_expert(ctx, settings: AttentionNodeSettings, placement: ExpertPlacement):
    """An expert process for node 0, over the node's lane; returns (process, pipe, address,
    slots)."""
    expert = ExpertNodeSettings(
        1000, settings.model_dir, placement.assignment[0], device="cuda", lane=settings.lane,
        round_timeout_s=settings.round_timeout_s,
    )  # fmt: skip
    here, there = ctx.Pipe()
    child = ctx.Process(
        target=expert_process.serve, args=(expert, settings.max_batch_tokens, 1, there), daemon=True
    )
    child.start()
    address, slots = here.recv()
    return child, here, address, slots


@pytest.mark.skipif(not mps_running(), reason="two processes on one GPU need CUDA MPS")
@pytest.mark.parametrize(
    ("lane", "signal_name"),
    [("device", "SIGKILL"), ("device", "SIGSTOP"), ("proxy", "SIGKILL"), ("proxy", "SIGSTOP")],
)
def test_a_killed_or_stopped_expert_process_fails_the_step_at_its_deadline_and_loses_nothing(
    tiny_model: Path, lane: str, signal_name: str
) -> None:
    """The step in progress ends at the round deadline with an error (nothing hangs, nothing
    of it is applied); a new expert process is wired in, its slots mapped again, and every
    request finishes with the colocated engine's tokens."""
    ref = ReferenceEngine(tiny_model)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    requests = [NewRequest(f"r{i}", ref.tokenizer.encode(t), params) for i, t in enumerate(PROMPTS)]
    base = AttentionNodeSettings(0, str(tiny_model), device="cuda", block_size=4)
    colocated = AttentionNode(base, None)
    want = _serve(colocated, requests)
    colocated.shutdown()

    placement = ExpertPlacement.even(load_config(tiny_model).num_experts, 1)
    settings = replace(base, lane=lane, round_timeout_s=2.0)
    ctx = multiprocessing.get_context("spawn")
    children = []
    node: AttentionNode | None = None
    try:
        child, pipe, address, slots = _start_expert(ctx, settings, placement)
        children.append(child)
        node = AttentionNode(settings, placement)
        pipe.send([0])
        pipe.send([node.connect([(1000, address)], [slots])])
        pipe.send(0)  # the step it starts at
        out: dict[str, list[TokenOutput]] = {r.request_id: [] for r in requests}
        step = 0
        for r in requests:  # every request admitted, a few decode steps
            for token in node.step(step, [r], []).outputs:
                out[token.request_id].append(token)
            step += 1
        os.kill(child.pid, getattr(signal, signal_name))
        start = time.monotonic()
        with pytest.raises(TransportError):
            node.step(step, [], [])
        assert time.monotonic() - start < 15  # the 2 s deadline, not a hang
        step += 1
        node.reset(step)
        child, pipe, address, slots = _start_expert(ctx, settings, placement)
        children.append(child)
        pipe.send([0])
        node.reconnect(1000, address, slots)
        pipe.send([node.lane_region()])
        pipe.send(step)
        while any(not t or t[-1].finish_reason is None for t in out.values()):
            for token in node.step(step, [], []).outputs:
                out[token.request_id].append(token)
            step += 1
            assert step < 300
    finally:
        if node is not None:  # a failed run must not leave its GPU work to the next test
            node.shutdown()
        for c in children:
            c.kill()
            c.join(30)
    for r in requests:
        assert [t.token_id for t in out[r.request_id]] == [t.token_id for t in want[r.request_id]]
