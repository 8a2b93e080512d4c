"""The control round that opens every step, on every lane: how nodes that each run their own
loop stay in lockstep through the exchange itself, with no driver in the step.

- An attention node opens step s by sending each expert node a control frame: the rows of each
  micro-batch and whether it replays a CUDA graph (the device lane's expert node replays one of
  its own for those rows; the host lane's only checks the frame).
- An expert node, on the first control frame of step s from any attention node, sends every
  attention node a call to step s (`call_step`) and then gathers the control frames of all.
- An attention node with nothing to run waits for either work of its own or a call
  (`Transport.await_frame` on `is_call`), and then runs step s, empty if need be. Every node
  that runs step s takes the calls of step s from every live expert node when it ends the step
  (`take_calls`), so none is left in its mailbox.

So a step runs exactly when some attention node has work; an idle cluster sends nothing.
"""

from __future__ import annotations

import torch
from afd.transport.endpoint import PeerLost, Transport, TransportError
from afd.transport.wire import RoundKey


def control_frame(rows_per_micro_batch: list[int], graphed: bool) -> list[torch.Tensor]:
    return [torch.tensor([*rows_per_micro_batch, int(graphed)], dtype=torch.int64)]


def read_control_frame(
    frame: list[torch.Tensor], micro_batches: int, capacity: int | None, what: str
) -> tuple[tuple[int, ...], bool]:
    """The rows of each micro-batch (each within `capacity`, when slots bound them) and the
    graph flag; a TransportError naming `what` (the node and peer) for anything else."""
    m = micro_batches
    ok = len(frame) == 1 and frame[0].shape == (m + 1,) and not frame[0].is_floating_point()
    values = frame[0].tolist() if ok else []
    limit = capacity if capacity is not None else 1 << 31
    if not ok or not all(0 <= r <= limit for r in values[:m]) or values[m] not in (0, 1):
        raise TransportError(
            f"{what}: bad control frame {[list(t.shape) for t in frame]} {values}, expected "
            f"{m} row counts within 0..{limit} and a graph flag"
        )
    return tuple(values[:m]), bool(values[m])


def open_step(transport: Transport, expert_peers: list[int], step: int, frame: list) -> None:
    """An attention node opens `step` on every expert node it can still reach."""
    key = RoundKey.control(step)
    for peer in expert_peers:
        if not transport.is_lost(peer):
            transport.send(peer, key, frame)


def call_step(transport: Transport, attention_peers: list[int], step: int) -> None:
    """An expert node calls every attention node to `step` (some are idle and wait for it)."""
    key = RoundKey.control(step)
    for peer in attention_peers:
        transport.send(peer, key, [])


def is_call(expert_peers: frozenset[int], step: int):
    """The match for `Transport.await_frame`: an expert node's call to `step`."""
    key = RoundKey.control(step)
    return lambda peer, got: got == key and peer in expert_peers


def is_opening(attention_peers: frozenset[int], step: int):
    """The match for `Transport.await_frame`: an attention node opening `step`."""
    key = RoundKey.control(step)
    return lambda peer, got: got == key and peer in attention_peers


def take_calls(transport: Transport, expert_peers: list[int], step: int, timeout_s: float) -> None:
    """Takes the call to `step` of every expert node not lost (each sent it before answering
    this step's first exchange, so it is here or on its way)."""
    key = RoundKey.control(step)
    for peer in expert_peers:
        if transport.is_lost(peer):
            continue
        try:
            frame = transport.recv(peer, key, timeout_s)
        except PeerLost:
            continue  # its replicas served the step; the orchestrator takes it out
        if frame:
            raise TransportError(f"expert peer {peer} sent a call to step {step} with a payload")
