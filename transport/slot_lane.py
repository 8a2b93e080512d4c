"""What every slot lane does the same way: one node's step counter, waits and releases.

A lane (`DeviceLane`, `ProxyLane`) is this node's region, which peers' rounds are delivered
into, and one writable slot region per peer (the peer's own region on the device lane, an
outbox here on the proxy lane), each with the index under which this node writes there. Both
follow one step counter in device memory (`step_1`, set once a step), from which the waits and
releases compute each round's sequence number, so that the same kernels, or a CUDA graph of
them, serve every step. How the bytes reach the peer is the subclass's business.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from afd.transport import lane_signals
from afd.transport.slots import SlotRegion


class SlotLane(ABC):
    def __init__(self, own: SlotRegion, num_layers: int) -> None:
        self.own, self.num_layers = own, num_layers
        self.peers: list[tuple[SlotRegion, int]] = []  # (slots we write, our index among writers)
        self.peer_ids: list[int] = []
        self.step_1 = torch.zeros(1, dtype=torch.int64, device=own.device)
        self._abort = lane_signals.AbortSwitch(own.control_2)

    def begin_step(self, step: int, rows_PM: list[list[int]] | None = None) -> None:
        """Sets the step the kernels follow. `rows_PM[p][mb]`: the rows this node writes to
        peer p in micro-batch mb this step (a lane that copies slots must be told)."""
        self.step_1.fill_(step)

    def wait(
        self, layer: int, micro_batch: int, timeout_s: float, rows_P: list[int] | None = None
    ) -> None:
        """Until every peer delivered round (step, layer) into our slots of `micro_batch`;
        `rows_P`: the rows each peer delivers (a lane that lands them in device memory copies
        that many)."""
        lane_signals.wait(
            self.own.words_MP[micro_batch],
            self.step_1,
            self.num_layers,
            layer,
            self.own.control_2,
            timeout_s,
        )

    def release(self, peer: int, layer: int, micro_batch: int) -> None:
        """Tells peer `peer` (an index into `peers`) its slot of `micro_batch` holds round
        (step, layer)."""
        region, me = self.peers[peer]
        word_1 = region.words_MP[micro_batch, me : me + 1]
        lane_signals.release(word_1, self.step_1, self.num_layers, layer, self.own.control_2)

    def abort(self) -> None:
        """Ends every wait of the step in progress at once (from any thread)."""
        self._abort.set()

    def quiet(self) -> None:
        """Sets the abort word now, in stream order: the runs that warm a CUDA graph up
        execute for real, and must neither wait for peers nor tell them anything."""
        self.own.control_2[0:1].fill_(1)

    def reset(self, next_step: int | None = None) -> None:
        """Clears the abort and status words; `next_step`: after a failure, from which step
        the lane goes on (a lane that moves frames drops the earlier steps' late ones)."""
        self.own.control_2.zero_()

    def check(self, what: str) -> None:
        lane_signals.check(self.own.control_2, what, self._failure_note)

    def status_snapshot(self) -> StatusSnapshot:
        """The status word as the work enqueued so far leaves it, copied to the host without
        waiting: a node that launches its next step before checking this one's."""
        return StatusSnapshot(self.own.control_2, self._failure_note)

    @abstractmethod
    def close(self) -> None:
        """Lets go of this node's region and the peers' slots."""

    def close_after_gpu(self) -> None:
        """Closes the lane once no kernel can touch its slots any more: waits still spinning
        (a step launched ahead, a dead peer) end at once on the abort word, and the device
        finishes before the peers' slots are let go (a peer's mapping unmapped under a running
        kernel is an illegal memory access)."""
        if self.own.device.type == "cuda":
            self.abort()
            torch.cuda.synchronize(self.own.device)
        self.close()

    def _failure_note(self) -> str | None:
        """What went wrong outside the kernels, if anything (for a failed wait's message)."""
        return None


class HostCopy:
    """A device tensor copied to the host in stream order, without waiting (`result` waits)."""

    def __init__(self, t: torch.Tensor) -> None:
        if not t.is_cuda:
            self._host, self._done = t, None
            return
        self._host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self._host.copy_(t, non_blocking=True)
        self._done = torch.cuda.Event()
        self._done.record()

    def result(self) -> torch.Tensor:
        if self._done is not None:
            self._done.synchronize()
        return self._host


class StatusSnapshot:
    """A copy of a lane's status word in stream order, read on the host by `check`."""

    def __init__(self, control_2: torch.Tensor, failure: Callable[[], str | None]) -> None:
        self._copy = HostCopy(control_2.clone() if not control_2.is_cuda else control_2)
        self._failure = failure

    def check(self, what: str) -> None:
        lane_signals.check(self._copy.result(), what, self._failure)
