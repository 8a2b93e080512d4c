"""Where a traced step's time went: named spans (per layer and micro-batch) timed where the
work runs, for a Chrome/Perfetto timeline merged across nodes.

On a CUDA device a one-thread kernel writes the GPU's global timer (ns) into a buffer in
stream order, so a span is what the GPU did, graphs and device-lane waits included, not when
the host enqueued it; the buffer is read once after the step and the GPU clock is mapped to
the host's (`time.time_ns`) by one stamp taken around a synchronize, within the launch and
sync latency (tens of µs). On the CPU the stamps are the host clock itself. Nodes of one host
share that clock; across hosts the skew is that of their clocks (NTP).
"""

from __future__ import annotations

import time

import torch
from afd.models import kernels
from afd.models.messages import TraceSpan


class StepTrace:
    """Spans of one node's step. `begin`/`end` pairs may nest or interleave across
    micro-batches; each is matched by (name, layer, micro_batch)."""

    def __init__(self, device: torch.device | str, capacity: int = 16384) -> None:
        self.device = torch.device(device)
        self._gpu = self.device.type == "cuda" and kernels.HAVE_TRITON
        self._stamps = torch.zeros(capacity, dtype=torch.int64, device=self.device)
        self._host: list[int] = []
        self._labels: list[tuple[str, int, int, bool]] = []  # (name, layer, mb, is_begin)
        if self._gpu:  # the kernel's first launch compiles it: not inside the first span
            from afd.models.kernels.timer import stamp

            stamp(self._stamps, capacity - 1)

    def taken(self) -> StepTrace:
        """This trace's stamps as they will be once the stream gets here, in a trace of their
        own: a graph that stamps this trace is replayed again by later steps, and each step
        must read its own replay's stamps (a copy in stream order, no wait)."""
        copy = object.__new__(StepTrace)
        copy.device, copy._gpu, copy._host = self.device, self._gpu, list(self._host)
        copy._labels = list(self._labels)
        copy._stamps = self._stamps.clone()
        return copy

    def begin(self, name: str, layer: int, micro_batch: int) -> None:
        self._mark((name, layer, micro_batch, True))

    def end(self, name: str, layer: int, micro_batch: int) -> None:
        self._mark((name, layer, micro_batch, False))

    def _mark(self, label: tuple[str, int, int, bool]) -> None:
        i = len(self._labels)
        if i >= self._stamps.shape[0] - 1:  # the last one is the clock mapping's
            raise RuntimeError(f"a traced step takes at most {self._stamps.shape[0] - 1} stamps")
        self._labels.append(label)
        if self._gpu:
            from afd.models.kernels.timer import stamp

            stamp(self._stamps, i)
        else:
            self._host.append(time.time_ns())

    def spans(self) -> list[TraceSpan]:
        """The step's spans in host time (waits for the GPU to reach the last stamp)."""
        if self._gpu:
            from afd.models.kernels.timer import stamp

            n = len(self._labels)
            torch.cuda.synchronize(self.device)
            before = time.time_ns()
            stamp(self._stamps, n)
            torch.cuda.synchronize(self.device)
            after = time.time_ns()
            raw = self._stamps[: n + 1].tolist()
            offset = (before + after) // 2 - raw[n]
            times = [t + offset for t in raw[:n]]
        else:
            times = self._host
        open_: dict[tuple[str, int, int], int] = {}
        out = []
        for (name, layer, mb, is_begin), t in zip(self._labels, times, strict=True):
            key = (name, layer, mb)
            if is_begin:
                open_[key] = t
            elif key in open_:
                out.append(TraceSpan(name, layer, mb, open_.pop(key), t))
        return out


class StepsToTrace:
    """Which steps a node traces: the next `count` it runs, or `count` from step `first` on
    (armed from another thread: the orchestrator's, or a parent process's pipe)."""

    def __init__(self) -> None:
        self._first: int | None = None
        self._left = 0

    def arm(self, count: int, first: int | None = None) -> None:
        if count < 0:
            raise ValueError(f"steps to trace must be >= 0, got {count}")
        self._first, self._left = first, count

    @property
    def armed(self) -> bool:
        """Whether some step is still to be traced."""
        return self._left > 0

    def take(self, step: int) -> bool:
        """Whether step `step` (about to run) is traced; counts it off if so."""
        if self._left <= 0 or (self._first is not None and step < self._first):
            return False
        self._left -= 1
        return True


def chrome_trace(nodes: dict[str, list[tuple[int, list[TraceSpan]]]]) -> dict:
    """A Chrome/Perfetto JSON trace: a process per node, a thread per micro-batch, one event
    per span (`ts`/`dur` in µs from the first span); `nodes`: node name -> [(step, spans)]."""
    starts = [s.start_ns for steps in nodes.values() for _, spans in steps for s in spans]
    origin = min(starts, default=0)
    events: list[dict] = []
    for pid, (node, steps) in enumerate(sorted(nodes.items())):
        events.append({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": node}})
        threads = sorted({s.micro_batch for _, spans in steps for s in spans})
        for mb in threads:
            events.append(
                {"ph": "M", "name": "thread_name", "pid": pid, "tid": mb,
                 "args": {"name": f"micro-batch {mb}"}}
            )  # fmt: skip
        for step, spans in steps:
            for s in spans:
                events.append(
                    {"ph": "X", "name": f"{s.name} L{s.layer}", "cat": s.name, "pid": pid,
                     "tid": s.micro_batch, "ts": (s.start_ns - origin) / 1e3,
                     "dur": max(0, s.end_ns - s.start_ns) / 1e3,
                     "args": {"step": step, "layer": s.layer, "micro_batch": s.micro_batch}}
                )  # fmt: skip
    return {"traceEvents": events, "displayTimeUnit": "ns"}
