"""GPU step traces (run on the GPU host; skipped elsewhere): a span is what the GPU did, in
stream order and mapped onto the host clock, not when the host enqueued it."""

from __future__ import annotations

import time

import pytest
import torch
from afd.models.step_trace import StepTrace

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def test_a_span_measures_the_gpu_work_between_its_stamps() -> None:
    trace = StepTrace("cuda")  # made before the clock starts: the first one compiles the kernel
    torch.cuda._sleep(1)  # and the sleep kernel's first launch loads its module: not timed
    torch.cuda.synchronize()
    before = time.time_ns()
    trace.begin("busy", 0, 0)
    torch.cuda._sleep(50_000_000)  # ~25 ms of GPU clock cycles, enqueued in a few µs
    trace.end("busy", 0, 0)
    trace.begin("idle", 0, 1)
    trace.end("idle", 0, 1)
    enqueued = time.time_ns()
    (busy, idle) = trace.spans()
    after = time.time_ns()
    assert busy.end_ns - busy.start_ns > 10_000_000  # the GPU was busy between the stamps
    assert enqueued - before < (busy.end_ns - busy.start_ns) / 2  # while the host went on
    assert idle.end_ns - idle.start_ns < 1_000_000 and idle.start_ns >= busy.end_ns
    slack = 1_000_000  # the clock mapping's error is far below a millisecond
    assert before - slack <= busy.start_ns and idle.end_ns <= after + slack


def test_stamps_replay_inside_a_cuda_graph() -> None:
    StepTrace("cuda").begin("warm-up", 0, 0)  # the kernel compiles and loads outside a capture
    torch.cuda.synchronize()
    trace = StepTrace("cuda")
    x = torch.zeros(1024, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        x.add_(1)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        trace.begin("add", 0, 0)
        x.add_(1)
        trace.end("add", 0, 0)
    start = time.time_ns()
    graph.replay()
    (span,) = trace.spans()
    assert span.start_ns >= start - 1_000_000 and span.end_ns >= span.start_ns
