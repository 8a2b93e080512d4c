"""The proxy lane: the device lane's slots between peers on other hosts, moved by a thread.

The kernels see the lane they see on the device lane (`SlotLane`): dispatch and combine write a
peer's slot and release its word, waits spin on this node's words. What differs is where the
slots lie. The peer's slot is an *outbox* in this process, one per peer, all of it in host memory
(pinned on a GPU node: the node's stream copies the rows there, then its release kernel writes
the word). A proxy thread per node watches the outbox words; when a round is released it sends
the round's rows to the peer's proxy as one frame, and that proxy copies them into its node's
*inbox*, also in pinned host memory, then stores the round's number in the inbox word. The
node's wait kernel spins on that word, and then its stream copies the rows that came into the
node's own region on the GPU (`wait` knows how many). No host code of the node runs per layer,
a CUDA graph of the whole step captures the node's side, and the proxy thread makes no CUDA
call at all: a copy it enqueued could wait behind the node's queue of work, which waits for the
proxy (bench/NOTES.md: that deadlock is how the first version failed on the H100). On a CPU
node the inbox is the region itself.

One frame per (peer, micro-batch, layer): rows, local expert ids and weights (dispatch) or
partial sums (combine), only the rows the step uses (`begin_step` says how many). Frames go as
UCX tag messages over the proxy's own transport (a worker and endpoints of its own: the node's
transport belongs to the node's thread). UCX RMA is not used.

Waking: a release on the CPU rings the proxy's bell. A GPU kernel cannot ring it, so while a
step it was told of still has rounds to send, the proxy polls the outbox words and its
transport without sleeping, yielding the CPU between looks (and with it the GIL, if only for
the call: the node's thread may then wait up to Python's switch interval for it). Measured on
the GPU hosts, polling this way gave shorter round trips and decode steps than naps of ~13 µs
(bench/NOTES.md, session 10). Otherwise it sleeps on its transport until a frame comes, a step
begins or a release rings.

Connections: the attention node's proxy connects to each expert node's proxy (whose address is
in the expert node's handle); the expert node's proxy accepts them, as the node transports do.

Faults: a frame that is malformed, or from a node that is not a writer of this region, is
dropped and recorded; the wait for its round then ends at its deadline and `check` names what
was wrong. A peer that died: sends to it fail, and waits end at their deadline or at the node's
abort, as on the device lane. `reset(next_step)` drops frames of abandoned steps, now and when
they arrive late.

Shape legend: P = peers, M = micro-batches.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from afd.transport import lane_signals
from afd.transport.device_lane import check_peer_layout
from afd.transport.endpoint import PeerAddress, Transport, TransportSettings
from afd.transport.region_memory import RegionError, writer_index
from afd.transport.slot_lane import SlotLane
from afd.transport.slots import SlotKind, SlotLayout, SlotRegion, sequence
from afd.transport.wire import FrameKind, RoundKey

log = logging.getLogger(__name__)

IDLE_S = 0.05  # how long an idle proxy sleeps on its transport between looks
STEPS_QUEUED = 64  # steps a stream may hold begun but not yet run, before one counts as lost
CLOSE_FLUSH_S = 5.0  # how long closing waits for the last sends


@dataclass(frozen=True, slots=True)
class ProxyHandle:
    """What a peer needs to reach a node's proxy-lane region: picklable, any host."""

    layout: SlotLayout
    owner: int  # node id of the region's owner
    writers: tuple[int, ...]  # node ids of the peers that write into it, in slot order
    address: PeerAddress  # the owner's proxy

    def writer_index(self, node_id: int) -> int:
        return writer_index(self.owner, self.writers, node_id)


class ProxyLane(SlotLane):
    def __init__(
        self,
        own: SlotRegion,
        handle_writers: tuple[int, ...],
        node_id: int,
        num_layers: int,
        last_layer: int,
        settings: TransportSettings,
        timeout_s: float,
    ) -> None:
        """`last_layer`: the last layer with an exchange (a step's sends end there);
        `timeout_s`: how long connecting waits for peers, and a step for its sends."""
        super().__init__(own, num_layers)
        self.node_id, self.last_layer, self.timeout_s = node_id, last_layer, timeout_s
        self._writers = handle_writers
        self._gpu = own.device.type == "cuda"  # a kernel's release rings no bell: the proxy looks
        # a UCX context of its own: its worker is driven from this thread while the node's
        # transport is driven from the node's
        self.transport = Transport(node_id, settings, "cpu", own_context=True)
        self.handle = ProxyHandle(own.layout, node_id, handle_writers, self.transport.address)
        self._lock = threading.Lock()  # the peers, their outboxes and the steps to send
        self._out_words_PM = torch.zeros(0, own.layout.micro_batches, dtype=torch.int64)
        self._sent_PM = np.zeros((0, own.layout.micro_batches), np.int64)
        # where our peers' rounds land: pinned host memory on a GPU node, else our region
        self.inbox = _host_region(own.layout, pinned=True) if self._gpu else own
        self._min_step = 0  # rounds of earlier steps are dropped (set by `reset`)
        # step -> (rows per (peer, micro-batch), (peer, micro-batch) pairs whose last layer is
        # still to send, when the step began)
        self._steps: dict[int, tuple[list[list[int]], set[tuple[int, int]], float]] = {}
        self._failure: str | None = None
        self.frames_sent = self.frames_delivered = 0
        self._bell = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, name=f"afd-proxy-{node_id}", daemon=True
        )
        self._thread.start()

    # ---- wiring --------------------------------------------------------------------------
    def connect(self, handles: Sequence[object], node_id: int) -> None:
        """An outbox per peer, in peer order, and a connection to every peer's proxy: made by
        an attention node, awaited by an expert node (replacing earlier ones)."""
        peer_handles = [_proxy_handle(h, node_id) for h in handles]
        for h in peer_handles:
            check_peer_layout(self.own.layout, h.layout, h.owner, node_id)
            h.writer_index(node_id)  # we must be one of its writers
        if self._gpu:  # no copy or release of ours may still target the outboxes replaced
            torch.cuda.synchronize(self.own.device)
        M = self.own.layout.micro_batches
        words_PM = torch.zeros(len(peer_handles), M, dtype=torch.int64, pin_memory=self._gpu)
        outboxes = [
            (_host_region(_outbox_layout(h.layout), self._gpu, words_PM[p].view(M, 1)), 0)
            for p, h in enumerate(peer_handles)
        ]
        with self._lock:
            self.peers, self.peer_ids = outboxes, [h.owner for h in peer_handles]
            self._out_words_PM, self._sent_PM = words_PM, np.zeros((len(peer_handles), M), np.int64)
        for h in peer_handles:
            self._join(h)

    def reconnect(self, new: object, node_id: int) -> None:
        """Joins a restarted peer's new proxy in place of its old one (same outbox)."""
        handle = _proxy_handle(new, node_id)
        if handle.owner not in self.peer_ids:
            raise RegionError(f"node {handle.owner} is not a peer of node {node_id}")
        check_peer_layout(self.own.layout, handle.layout, handle.owner, node_id)
        self._join(handle)

    def forget(self, peer: int) -> None:
        """Drops a dead peer's connection, so that its restarted proxy may connect again."""
        self.transport.forget_peer(peer)

    def _join(self, h: ProxyHandle) -> None:
        if self.own.layout.kind == SlotKind.COMBINE:  # an attention node: it connects
            self.transport.forget_peer(h.owner)
            self.transport.connect(h.owner, h.address)
        else:
            self.transport.wait_for_peers([h.owner], self.timeout_s)

    # ---- the node's side -----------------------------------------------------------------
    def begin_step(self, step: int, rows_PM: list[list[int]] | None = None) -> None:
        if rows_PM is None or len(rows_PM) != len(self.peers):
            raise ValueError(
                f"the proxy lane needs the rows for each of its {len(self.peers)} peers"
            )
        M = self.own.layout.micro_batches
        for rows_M in rows_PM:
            if len(rows_M) > M or any(not 0 <= n <= self.own.layout.capacity for n in rows_M):
                raise ValueError(
                    f"rows {rows_PM} do not fit {M} slots of {self.own.layout.capacity}"
                )
        super().begin_step(step)
        pending = {(p, mb) for p in range(len(rows_PM)) for mb in range(M)}
        rows = [list(r) + [0] * (M - len(r)) for r in rows_PM]
        with self._lock:
            self._steps[step] = (rows, pending, time.monotonic())
        self._ring()

    def wait(
        self, layer: int, micro_batch: int, timeout_s: float, rows_P: list[int] | None = None
    ) -> None:
        """Until every peer's round is in our inbox; on a GPU node then copies each peer's
        `rows_P` rows into our region, in stream order (a graph replays the same sizes)."""
        lane_signals.wait(
            self.inbox.words_MP[micro_batch],
            self.step_1,
            self.num_layers,
            layer,
            self.own.control_2,
            timeout_s,
        )
        if self.inbox is self.own:
            return
        if rows_P is None or len(rows_P) != len(self._writers):
            raise ValueError(
                f"the proxy lane needs the rows of each of {len(self._writers)} writers"
            )
        for w, n in enumerate(rows_P):
            for sink, source in zip(
                _slot_arrays(self.own, micro_batch, w),
                _slot_arrays(self.inbox, micro_batch, w),
                strict=True,
            ):
                sink[:n].copy_(source[:n], non_blocking=True)

    def release(self, peer: int, layer: int, micro_batch: int) -> None:
        super().release(peer, layer, micro_batch)
        if not self._gpu:
            self._ring()

    def reset(self, next_step: int | None = None) -> None:
        super().reset(next_step)
        if next_step is None:
            return
        with self._lock:
            self._steps.clear()
            self._min_step = next_step
            self._failure = None
        self.transport.reset(next_step)

    def close(self) -> None:
        """Stops the proxy once what was released went out (a node that ends right after its
        last release must not take that round with it)."""
        self._stop.set()
        self._ring()
        self._thread.join(timeout=self.timeout_s)
        try:
            self._send_released()
            self.transport.flush(min(self.timeout_s, CLOSE_FLUSH_S))
        except Exception as err:  # a peer that is gone takes nothing more
            log.info("node %d: proxy lane closed with sends undone: %s", self.node_id, err)
        self.transport.close()
        self.peers = []

    def _failure_note(self) -> str | None:
        moved = f"the proxy sent {self.frames_sent} frames and delivered {self.frames_delivered}"
        return moved if self._failure is None else f"{moved}; {self._failure}"

    def _ring(self) -> None:
        self._bell.set()
        self.transport.interrupt()

    # ---- the proxy thread ----------------------------------------------------------------
    def _serve(self) -> None:
        while not self._stop.is_set():
            self._bell.clear()
            try:
                if self._send_released() + self._deliver_arrived():
                    continue
                if self._gpu and self._sends_due():
                    self.transport.progress(0.0)  # one turn: frames in, sends out
                    os.sched_yield()
                else:
                    self.transport.await_frame(
                        _any_frame, IDLE_S, lambda: self._bell.is_set() or self._stop.is_set()
                    )
            except Exception as err:  # the proxy must outlive what went wrong
                self._fail(f"{type(err).__name__}: {err}")
                self._stop.wait(IDLE_S)

    def _sends_due(self) -> bool:
        """A step begun still has rounds to send. A stream may hold many steps queued behind
        the one it runs (a node launches one ahead; a bench's replays queue a whole phase), so
        only a step `STEPS_QUEUED` older than the newest counts as abandoned; and one that
        outlived every wait it can have (layers × micro-batches deadlines, and one for the
        step before) was too."""
        with self._lock:
            M = self.own.layout.micro_batches
            now, limit = time.monotonic(), self.timeout_s * (self.num_layers * M + 1)
            newest = max(self._steps, default=0)
            for step in [
                s
                for s, (_, _, t) in self._steps.items()
                if s <= newest - STEPS_QUEUED or now - t > limit
            ]:
                del self._steps[step]
            return bool(self._steps)

    def _send_released(self) -> int:
        with self._lock:
            ready = np.argwhere(self._out_words_PM.numpy() > self._sent_PM)
            for p, mb in ready:
                seq = int(self._out_words_PM[p, mb])
                self._sent_PM[p, mb] = seq  # a round that cannot go is not tried again
                try:
                    self._send(int(p), int(mb), seq)
                except Exception as err:  # the other peers' rounds still go
                    self._fail(
                        f"round {seq} to node {self.peer_ids[p]}: {type(err).__name__}: {err}"
                    )
            return len(ready)

    def _send(self, p: int, mb: int, seq: int) -> None:
        step, layer = divmod(seq - 1, self.num_layers)
        if step < self._min_step:
            return  # a round of a step abandoned in a failure, released after the reset
        entry = self._steps.get(step)
        if entry is None:
            raise RuntimeError(f"round {seq} released for step {step}, which did not begin")
        rows_PM, pending, _ = entry
        outbox, _ = self.peers[p]
        n = rows_PM[p][mb]
        # the outbox is ours until the peer answers this round: UCX may read it until then
        arrays = [a[:n] for a in _slot_arrays(outbox, mb, 0)]
        self.transport.send(self.peer_ids[p], RoundKey.exchange(step, layer, mb), arrays)
        self.frames_sent += 1
        if layer == self.last_layer:
            pending.discard((p, mb))
            if not pending:
                del self._steps[step]

    def _deliver_arrived(self) -> int:
        delivered = 0
        while (frame := self.transport.take_any(_any_frame)) is not None:
            peer, key, tensors = frame
            try:
                self._deliver(peer, key, tensors)
                delivered += 1
            except ValueError as err:
                self._fail(f"a frame from node {peer} for {tuple(key)} was dropped: {err}")
        return delivered

    def _deliver(self, peer: int, key: RoundKey, tensors: list[torch.Tensor]) -> None:
        """Copies a peer's round into our region and stores its word (after the bytes)."""
        layout = self.own.layout
        if peer not in self._writers:
            raise ValueError(f"node {peer} does not write into node {self.node_id}'s slots")
        if key.kind != FrameKind.EXCHANGE:
            raise ValueError(f"kind {key.kind.name} on the proxy lane")
        if not (0 <= key.micro_batch < layout.micro_batches and 0 <= key.layer < self.num_layers):
            raise ValueError(f"micro-batch {key.micro_batch} or layer {key.layer} out of range")
        w = self._writers.index(peer)
        sinks = _slot_arrays(self.inbox, key.micro_batch, w)
        _check_frame(tensors, sinks)
        seq = sequence(key.step, key.layer, self.num_layers)
        word = self.inbox.words_MP[key.micro_batch, w]  # host memory: ours to read
        if key.step < self._min_step or seq <= int(word):
            return  # stale: its bytes must not overwrite a newer round's, nor its word go back
        for sink, t in zip(sinks, tensors, strict=True):
            sink[: t.shape[0]].copy_(t)
        word.fill_(seq)  # after the bytes
        self.frames_delivered += 1

    def _fail(self, what: str) -> None:
        log.warning("node %d: proxy lane: %s", self.node_id, what)
        self._failure = what


def _proxy_handle(handle: object, node_id: int) -> ProxyHandle:
    if not isinstance(handle, ProxyHandle):
        raise RegionError(
            f"node {node_id} runs the proxy lane, a peer gave a {type(handle).__name__}: "
            "every node of a deployment must run the same lane"
        )
    return handle


def _any_frame(peer: int, key: RoundKey) -> bool:
    return True


def _check_frame(tensors: list[torch.Tensor], sinks: list[torch.Tensor]) -> None:
    if len(tensors) != len(sinks):
        raise ValueError(f"{len(tensors)} tensors, the slot takes {len(sinks)}")
    rows = tensors[0].shape[0] if tensors[0].dim() else -1
    for t, sink in zip(tensors, sinks, strict=True):
        if t.dtype != sink.dtype or t.dim() != 2 or t.shape[1] != sink.shape[1]:
            raise ValueError(
                f"a {t.dtype} tensor of shape {tuple(t.shape)} for slots of "
                f"[rows, {sink.shape[1]}] {sink.dtype}"
            )
        if t.shape[0] != rows or rows > sink.shape[0]:
            raise ValueError(f"{t.shape[0]} rows for a slot of {sink.shape[0]}")


def _slot_arrays(region: SlotRegion, mb: int, index: int) -> list[torch.Tensor]:
    """The arrays of one slot, as a frame carries them: rows, then (dispatch) local expert
    ids and weights."""
    arrays = [region.rows_MPCD[mb, index]]
    if region.local_ids_MPCK is not None and region.weights_MPCK is not None:
        arrays += [region.local_ids_MPCK[mb, index], region.weights_MPCK[mb, index]]
    return arrays


def _outbox_layout(peer: SlotLayout) -> SlotLayout:
    """A peer's slots as this node writes them: its layout with one writer, us."""
    return dataclasses.replace(peer, peers=1)


def _host_region(
    layout: SlotLayout, pinned: bool, words_MP: torch.Tensor | None = None
) -> SlotRegion:
    """Slots in host memory (pinned for a GPU node, whose stream copies in and out of them)."""
    memory_N = torch.zeros(layout.nbytes, dtype=torch.uint8, pin_memory=pinned)
    return SlotRegion(layout, memory_N, words_MP)
