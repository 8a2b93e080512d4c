"""Step traces on the host clock: spans pair up by (name, layer, micro-batch) however they
interleave; a node traces the steps it was asked to; the Chrome trace names every node."""

from __future__ import annotations

import pytest
from afd.models.step_trace import StepsToTrace, StepTrace, chrome_trace


def test_interleaved_spans_pair_up_by_name_layer_and_micro_batch() -> None:
    trace = StepTrace("cpu", capacity=16)
    trace.begin("attention", 0, 0)
    trace.begin("attention", 0, 1)
    trace.end("attention", 0, 0)
    trace.begin("combine", 0, 0)
    trace.end("attention", 0, 1)
    trace.end("combine", 0, 0)
    trace.end("combine", 1, 1)  # never begun: dropped
    spans = trace.spans()
    assert [(s.name, s.layer, s.micro_batch) for s in spans] == [
        ("attention", 0, 0),
        ("attention", 0, 1),
        ("combine", 0, 0),
    ]
    assert all(s.end_ns >= s.start_ns for s in spans)
    assert spans[2].start_ns >= spans[0].end_ns  # the combine began after the attention ended
    with pytest.raises(RuntimeError, match="at most 15 stamps"):
        for _ in range(16):
            trace.begin("x", 0, 0)


def test_a_node_traces_the_steps_it_was_asked_to() -> None:
    steps = StepsToTrace()
    assert not steps.take(0)
    steps.arm(2)  # the next two
    assert [steps.take(s) for s in (5, 6, 7)] == [True, True, False]
    steps.arm(2, first=10)  # two from step 10 on
    assert [steps.take(s) for s in (8, 9, 10, 11, 12)] == [False, False, True, True, False]
    steps.arm(3)
    steps.arm(0)  # disarmed
    assert not steps.take(1)
    with pytest.raises(ValueError, match=">= 0"):
        steps.arm(-1)


def test_the_chrome_trace_has_a_process_per_node_and_a_thread_per_micro_batch() -> None:
    a, e = StepTrace("cpu"), StepTrace("cpu")
    a.begin("attention", 0, 1)
    e.begin("experts", 0, 1)
    e.end("experts", 0, 1)
    a.end("attention", 0, 1)
    out = chrome_trace({"attention-0": [(7, a.spans())], "expert-0": [(7, e.spans())]})
    meta = [x for x in out["traceEvents"] if x["ph"] == "M"]
    assert {x["args"]["name"] for x in meta} == {"attention-0", "expert-0", "micro-batch 1"}
    spans = [x for x in out["traceEvents"] if x["ph"] == "X"]
    assert {x["name"] for x in spans} == {"attention L0", "experts L0"}
    assert min(x["ts"] for x in spans) == 0 and all(x["args"]["step"] == 7 for x in spans)
    outer = next(x for x in spans if x["cat"] == "attention")
    inner = next(x for x in spans if x["cat"] == "experts")
    assert outer["ts"] <= inner["ts"] and inner["ts"] + inner["dur"] <= outer["ts"] + outer["dur"]
