"""Tagged tensor send/recv between afd nodes over UCX (the synchronous `ucxx` core API).

There is no background thread: the caller's thread drives UCX progress inside every transport
call (`send`, `recv`, a pending send's `result`, `progress`), spinning for a few microseconds
and then sleeping on the worker's epoll descriptor until the call's deadline. Measured on the
2-core host (bench/NOTES.md) this is what makes a round trip cost tens of microseconds instead
of hundreds: the asyncio API hands every message between an event-loop thread and the caller
under the GIL, and that hand-off was the whole cost.

Two listeners: one whose endpoints run with UCX's peer-failure handling (loopback TCP between
peers on one machine), and one without it, over UCX's shared memory, which that mode excludes
(measured on the 2-core host, bench/NOTES.md: 16 GB/s and 18 µs round trips over shared memory
against 1.2 GB/s and 49 µs over loopback TCP). Peers connect to the first unless
`shared_memory` is set, because shared memory does not survive a peer's death: senders write
into the receiver's FIFO in place, and one killed between claiming a slot and marking it
written (SIGKILL, OOM) blocks that FIFO for good, so the receiver never again gets a frame or a
hello from any peer on its machine (tests/transport/test_endpoint.py reproduces it). Set it
only where no node is expected to die. UCX's cross-memory-attach transport is left out too,
because a read from a process that died is fatal to the reader without failure handling.

Connections: a peer opens an endpoint to our listener and sends a hello on the endpoint's
stream (its node id and the tag under which it wants our frames); we answer with the tag it must
use for its frames to us. Both tags are random 60-bit values, so frames of one peer cannot be
matched to another by accident and a rogue process cannot guess its way into a live peer's
stream. A frame is a header message (with the payload inline when small) on the peer's tag,
channel 0, followed for big frames by one message per tensor on channel 1, received straight
into freshly allocated tensors (host or GPU). Small frames of GPU tensors are copied to the host
and inlined too: UCX's GPU rendezvous costs milliseconds per message (bench/NOTES.md). A bad frame fails the peer that sent it, never the
node; frames nobody asked for yet wait in a bounded mailbox.

While the caller computes, nothing progresses: small frames wait in UCX's unexpected queue and
large ones complete the next time either side enters the transport. `send` therefore returns a
handle whose `result()` must be awaited before the step ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any, NamedTuple

import numpy as np
import torch
from afd.transport.wire import (
    HEADER_BYTES,
    INLINE_BYTES,
    FrameKind,
    Header,
    RoundKey,
    WireError,
    layout,
    pack_header,
    unpack,
)

log = logging.getLogger(__name__)
_TAG_BYTES = 8
HELLO_BYTES = HEADER_BYTES + _TAG_BYTES  # hello header + the tag the peer wants our frames on
_HEADER_CHANNEL, _PAYLOAD_CHANNEL = 0, 1
_MAX_SLEEP_S = 0.05  # epoll may miss an event (ucx-py#413); never sleep longer than this
_BUSY_SPIN_S = 0.05  # how long a wait keeps spinning for a big frame in flight (256 MiB at 5 GB/s)


class PeerAddress(NamedTuple):
    """Where a transport listens: what a peer needs to connect, as a picklable value."""

    host: str
    port: int  # endpoints with UCX peer-failure handling: peers on any machine
    local_port: int  # endpoints over shared memory: peers on the same machine only
    machine: str  # which machine (and container) the listeners are on


@cache
def machine_id() -> str:
    """Processes that can share memory see the same boot id and host name."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


class TransportError(RuntimeError):
    """A peer failed (bad frame, closed connection) or did not answer in time."""


class PeerLost(TransportError):
    """The peer died (the orchestrator said so, `mark_lost`, or its connection closed): whoever
    waits on it can stop now."""


@dataclass(frozen=True, slots=True)
class TransportSettings:
    """A node's transport settings; the deployment's `transport` section extends this class,
    so its fields and defaults are defined once, here."""

    host: str = "127.0.0.1"  # the address this node's listeners advertise
    progress_mode: str = "blocking"  # "blocking": spin, then sleep on epoll; "polling": spin
    spin_us: float = 200.0  # how long a "blocking" wait spins before it sleeps
    max_frame_bytes: int = 256 << 20
    max_pending_frames: int = 256  # frames of one peer received but not yet asked for
    connect_timeout_s: float = 30.0  # a peer's hello must be answered by then
    # same-machine peers over shared memory: faster, but a peer killed mid-send can block this
    # node's receives for good (see the module docstring); off wherever nodes may die
    shared_memory: bool = False


@dataclass
class TransportStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    frames_sent: int = 0
    frames_received: int = 0
    rejected_peers: int = 0


def _ucx():
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    try:
        import ucxx._lib.libucxx as ucx
        from ucxx._lib.arr import Array
    except ImportError as err:
        raise TransportError("the afd transport needs `ucxx` (pip install ucxx-cu13)") from err
    return ucx, Array


# what UCX reports for a connection whose other end is gone (with peer-failure handling)
_GONE_ERRORS = frozenset(
    {
        "UCXConnectionResetError",
        "UCXEndpointTimeoutError",
        "UCXUnreachableError",
        "UCXNotConnectedError",
    }
)


def _gone(p: _Peer, err: Exception) -> bool:
    """Whether a peer's failure means its connection is gone (the process died or closed
    it), rather than a fault of one message: only then do waits on it end as for a lost
    peer. Any other failure fails the peer, and the orchestrator decides."""
    return p.closed is not None or type(err).__name__ in _GONE_ERRORS


_context_lock = threading.Lock()
_context = None


def _shared_context():
    global _context
    with _context_lock:
        if _context is None:
            _context = _new_context()
        return _context


# A host-memory frame goes in one eager message, in 64 KiB segments. UCX's default sends a
# frame over 8 KiB by rendezvous, which over TCP costs both sides' progress for a handshake
# before the bytes move: 300–700 µs for an 8 KiB frame on loopback against ~30 µs eager
# (bench/NOTES.md, session 10). Operators override any of these with the UCX_* variables (with
# RDMA, a rendezvous threshold such as 64k moves large frames zero-copy).
EAGER_HOST_FRAMES = {"RNDV_THRESH": "inf", "TCP_TX_SEG_SIZE": "64k", "TCP_RX_SEG_SIZE": "64k"}
_OPERATOR_VARS_KEY = "AFD_UCX_OPERATOR_VARS"


def _operator_ucx_vars() -> frozenset[str]:
    """The UCX_* variables the operator set. Read before ucxx's import writes its own defaults
    into os.environ, and handed to child processes (which inherit those defaults) in
    AFD_UCX_OPERATOR_VARS, so that a child does not take ucxx's choices for the operator's."""
    if _OPERATOR_VARS_KEY not in os.environ:
        names = sorted(k for k in os.environ if k.startswith("UCX_"))
        os.environ[_OPERATOR_VARS_KEY] = ",".join(names)
    return frozenset(n for n in os.environ[_OPERATOR_VARS_KEY].split(",") if n)


_OPERATOR_UCX_VARS = _operator_ucx_vars()


def _new_context(eager_host_frames: bool = False):
    ucx, _ = _ucx()
    # without cross-memory attach unless the operator chose the transports himself
    config = {} if "UCX_TLS" in os.environ else {"TLS": "^cma"}
    if eager_host_frames and "UCX_TLS" not in _OPERATOR_UCX_VARS:
        # nor CUDA's: with them loaded UCX asks the driver what every buffer is (ucxx turns
        # its memory-type cache off), a call per send that MPS makes slow
        config["TLS"] = "^cma,cuda"
    if eager_host_frames:
        config |= {
            k: v for k, v in EAGER_HOST_FRAMES.items() if f"UCX_{k}" not in _OPERATOR_UCX_VARS
        }
    return ucx.UCXContext(
        config, feature_flags=(ucx.Feature.TAG, ucx.Feature.STREAM, ucx.Feature.WAKEUP)
    )


def _wire_view(t: torch.Tensor):
    """The tensor's own memory as bytes: zero-copy, host or GPU (via __cuda_array_interface__)."""
    if t.is_cuda:
        return t.reshape(-1).view(torch.uint8)
    if t.dtype in (torch.bfloat16, torch.float8_e4m3fn):  # numpy has neither
        return t.reshape(-1).view(torch.uint8).numpy()
    return t.numpy().reshape(-1).view(np.uint8)


def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    """A GPU tensor's bytes in page-locked host memory (a copy to pageable memory is slow)."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t)
    return host


def _new_tag_base() -> int:
    return secrets.randbits(60) << 4


@dataclass
class _Peer:
    id: int
    ep: Any  # ucxx endpoint
    send_tag: int
    recv_tag: int
    header_buf: np.ndarray = field(
        default_factory=lambda: np.zeros(HEADER_BYTES + INLINE_BYTES, np.uint8)
    )
    header_req: Any = None  # the ucxx receive of the next header
    header: Header | None = None
    payload: list[torch.Tensor] = field(default_factory=list)
    payload_reqs: list = field(default_factory=list)
    sends: list[PendingSend] = field(default_factory=list)
    closed: str | None = None  # set by UCX's error callback


@dataclass
class _Handshake:
    ep: Any  # ucxx endpoint
    buf: np.ndarray
    req: Any  # ucxx stream receive of the hello
    deadline: float
    reply: list = field(default_factory=list)  # the reply request and its buffer, once sent
    peer: int = -1
    closed: str | None = None


class PendingSend:
    """A frame handed to UCX; `result` drives progress until UCX is done with its tensors."""

    def __init__(self, transport: Transport, peer: int, requests: list, keep: list) -> None:
        self._transport = transport
        self.peer = peer
        self._requests = requests
        self._keep = keep  # the buffers must outlive the requests
        self.error: str | None = None

    def done(self) -> bool:
        return self.error is not None or all(r.completed for r in self._requests)

    def _settle(self) -> None:
        if self.error is None:
            for r in self._requests:
                try:
                    r.check_error()
                except Exception as err:
                    self.error = f"{type(err).__name__}: {err}"
        self._keep = []

    def result(self, timeout_s: float) -> None:
        self._transport._wait_send(self, timeout_s)


class Transport:
    def __init__(
        self,
        node_id: int,
        settings: TransportSettings | None = None,
        device: str = "cpu",
        own_context: bool = False,
    ) -> None:
        """`own_context`: a UCX context for this transport alone, not the process's shared
        one (for a transport driven from another thread than the rest, as a lane's proxy),
        which sends host frames eagerly (`EAGER_HOST_FRAMES`): it must carry host memory only."""
        self.node_id = node_id
        self.settings = settings or TransportSettings()
        if self.settings.progress_mode not in ("blocking", "polling"):
            raise TransportError(
                f"transport.progress_mode {self.settings.progress_mode!r}: use blocking or polling"
            )
        self.device = torch.device(device)
        self.stats = TransportStats()
        if self.device.type == "cuda":
            # UCX picks its GPU transports (CUDA IPC, GPUDirect) only when a CUDA context is
            # current as its context and worker are made
            torch.zeros(1, device=self.device)
        self._ucx, self._array = _ucx()
        self._lock = threading.RLock()  # UCX objects are used by one thread at a time
        self._worker = self._ucx.UCXWorker(
            _new_context(eager_host_frames=True) if own_context else _shared_context()
        )
        self._worker.init_blocking_progress_mode()
        # poll, not select: select fails on descriptors past 1023, which a busy process reaches
        self._wakeup = select.poll()
        self._wakeup.register(self._worker.epoll_file_descriptor, select.POLLIN)
        # `interrupt` writes here, so that a thread asleep in a wait re-checks what it waits for
        self._doorbell_r, self._doorbell_w = os.pipe()
        self._doorbell_lock = threading.Lock()
        os.set_blocking(self._doorbell_r, False)
        os.set_blocking(self._doorbell_w, False)
        self._wakeup.register(self._doorbell_r, select.POLLIN)
        self._peers: dict[int, _Peer] = {}
        self._handshakes: list[_Handshake] = []
        self._mail: dict[tuple[int, RoundKey], list[torch.Tensor]] = {}
        self._pending: dict[int, int] = {}
        self._failed: dict[int, str] = {}
        self._lost: set[int] = set()  # peers reported dead or disconnected; set from any thread
        self._aborted = threading.Event()  # set from another thread to end a wait at once
        self._min_step = 0  # frames of earlier (abandoned) steps are dropped on arrival
        self._graveyard: list[PendingSend] = []  # abandoned sends: UCX may still read them
        self._listener = self._ucx.UCXListener.create(
            worker=self._worker, port=0, cb_func=self._on_connection, cb_args=(True,)
        )
        self._local_listener = self._ucx.UCXListener.create(
            worker=self._worker, port=0, cb_func=self._on_connection, cb_args=(False,)
        )

    # ---- API ---------------------------------------------------------------------------
    @property
    def address(self) -> PeerAddress:
        return PeerAddress(
            self.settings.host, self._listener.port, self._local_listener.port, machine_id()
        )

    def connect(self, peer: int, address: PeerAddress) -> None:
        with self._lock:
            deadline = time.monotonic() + self.settings.connect_timeout_s
            host = address.host
            local = self.settings.shared_memory and address.machine == machine_id()
            port = address.local_port if local else address.port
            ep = self._ucx.UCXEndpoint.create(self._worker, host, port, not local)
            recv_tag = _new_tag_base()
            hello = Header(self.node_id, RoundKey.hello(), ()).pack()
            out = np.frombuffer(hello + recv_tag.to_bytes(_TAG_BYTES, "little"), np.uint8)
            reply = np.zeros(_TAG_BYTES, np.uint8)
            reqs = [ep.stream_send(self._array(out)), ep.stream_recv(self._array(reply))]
            if not self._progress_until(lambda: all(r.completed for r in reqs), deadline):
                raise TransportError(
                    f"node {self.node_id}: peer {peer} at {host}:{port} did not answer the hello "
                    f"within {self.settings.connect_timeout_s}s"
                )
            try:
                for r in reqs:
                    r.check_error()
            except Exception as err:
                raise TransportError(
                    f"node {self.node_id}: peer {peer} at {host}:{port} refused the connection: {err}"
                ) from err
            self._register(peer, ep, int.from_bytes(reply.tobytes(), "little"), recv_tag)

    def wait_for_peers(self, peers: list[int], timeout_s: float) -> None:
        with self._lock:
            deadline = time.monotonic() + timeout_s
            if not self._progress_until(lambda: all(p in self._peers for p in peers), deadline):
                missing = [p for p in peers if p not in self._peers]
                raise TransportError(
                    f"node {self.node_id}: peers {missing} did not connect within {timeout_s}s"
                )

    def send(self, peer: int, key: RoundKey, tensors: list[torch.Tensor]) -> PendingSend:
        """Hands a frame to UCX; call `result()` on the handle before the tensors are reused."""
        with self._lock:
            p = self._peers.get(peer)
            if p is None:
                state = f"failed: {self._failed[peer]}" if peer in self._failed else "not connected"
                raise TransportError(f"node {self.node_id}: peer {peer} is {state}")
            tensors = [t.contiguous() for t in tensors]
            frame_layout = layout(tuple((t.dtype, t.shape) for t in tensors))
            payload = frame_layout.payload
            inline = payload <= INLINE_BYTES
            if any(t.is_cuda for t in tensors):
                if inline:  # a small frame: one host copy beats UCX's GPU rendezvous by far
                    tensors = [_pinned_copy(t) for t in tensors]
                else:
                    torch.cuda.current_stream().synchronize()  # UCX reads memory, not the stream
            if inline:  # one message: the header with the payload packed behind it
                frame = np.empty(HEADER_BYTES + payload, np.uint8)
                pack_header(frame, self.node_id, key, frame_layout, inline)
                offset = HEADER_BYTES
                for t, n in zip(tensors, frame_layout.sizes, strict=True):
                    if n:
                        frame[offset : offset + n] = _wire_view(t)
                        offset += n
                parts = [(frame, _HEADER_CHANNEL)]
            else:
                frame = np.empty(HEADER_BYTES, np.uint8)
                pack_header(frame, self.node_id, key, frame_layout, inline)
                parts = [(frame, _HEADER_CHANNEL)] + [
                    (_wire_view(t), _PAYLOAD_CHANNEL) for t in tensors if t.numel()
                ]
            tag = self._ucx.UCXXTag
            requests = [p.ep.tag_send(self._array(buf), tag(p.send_tag | ch)) for buf, ch in parts]
            handle = PendingSend(self, peer, requests, [parts, tensors])
            p.sends.append(handle)
            self.stats.frames_sent += 1
            self.stats.bytes_sent += HEADER_BYTES + payload
            return handle  # UCX already pushed what fits eagerly; the rest goes on in progress

    def recv(self, peer: int, key: RoundKey, timeout_s: float) -> list[torch.Tensor]:
        with self._lock:
            slot = (peer, key)
            deadline = time.monotonic() + timeout_s
            lost, failed = self._lost, self._failed
            self._progress_until(
                lambda: slot in self._mail or peer in failed or peer in lost, deadline
            )
            if slot in self._mail:
                self._pending[peer] -= 1
                return self._mail.pop(slot)
            if peer in lost:
                raise PeerLost(f"node {self.node_id}: peer {peer} was lost")
            if peer in self._failed:
                raise TransportError(
                    f"node {self.node_id}: peer {peer} failed: {self._failed[peer]}"
                )
            raise TransportError(
                f"node {self.node_id}: no frame {key} from peer {peer} within {timeout_s}s"
            )

    def recv_any(
        self, match: Callable[[int, RoundKey], bool], timeout_s: float
    ) -> tuple[int, RoundKey, list[torch.Tensor]]:
        """The first frame in the mailbox that `match(peer, key)` accepts, whoever sent it: how an
        expert node serves a failover's frames while it waits for its regular ones."""
        with self._lock:
            first = self._first_match(match)
            if not self._progress_until(lambda: first() is not None, time.monotonic() + timeout_s):
                raise TransportError(f"node {self.node_id}: no awaited frame within {timeout_s}s")
            taken = self.take_any(match)
            assert taken is not None  # what the wait waited for
            return taken

    def await_frame(
        self, match: Callable[[int, RoundKey], bool], timeout_s: float, until: Callable[[], bool]
    ) -> bool:
        """Waits, without taking it, for a frame that `match(peer, key)` accepts: True once one
        is in the mailbox, False when `until()` holds first (checked whenever the wait wakes;
        `interrupt` wakes it) or `timeout_s` passed. How an idle node waits for a peer's step
        while staying ready for work of its own."""
        with self._lock:
            first = self._first_match(match)
            deadline = time.monotonic() + timeout_s
            self._progress_until(lambda: first() is not None or until(), deadline, may_spin=False)
            return first() is not None

    def _first_match(
        self, match: Callable[[int, RoundKey], bool]
    ) -> Callable[[], tuple[int, RoundKey] | None]:
        """The first mailbox slot `match` accepts, as a check that scans the mailbox again only
        when mail came in (a wait calls it on every turn of progress). Call under the lock."""
        found: tuple[int, RoundKey] | None = None
        seen = -1

        def first() -> tuple[int, RoundKey] | None:
            nonlocal seen, found
            if seen != self.stats.frames_received:
                seen = self.stats.frames_received
                found = next((slot for slot in self._mail if match(*slot)), None)
            return found

        return first

    def take_any(
        self, match: Callable[[int, RoundKey], bool]
    ) -> tuple[int, RoundKey, list[torch.Tensor]] | None:
        """The first frame in the mailbox that `match` accepts, without waiting (None: none)."""
        with self._lock:
            found = self._first_match(match)()
            if found is None:
                return None
            self._pending[found[0]] -= 1
            return found[0], found[1], self._mail.pop(found)

    def has_frame(self, peer: int, key: RoundKey) -> bool:
        """Whether the frame is in the mailbox now (after one turn of progress)."""
        with self._lock:
            self._worker.progress()
            self._service()
            return (peer, key) in self._mail

    def interrupt(self) -> None:
        """Wakes a wait asleep on UCX's descriptor, so that it checks its condition now.
        Thread-safe."""
        with self._doorbell_lock:  # never a descriptor `close` gave back
            if self._doorbell_w >= 0:
                with contextlib.suppress(BlockingIOError, OSError):
                    os.write(self._doorbell_w, b"x")

    def mark_lost(self, peer: int) -> None:
        """The orchestrator found the peer dead: waits on it end with PeerLost, and its unsent
        frames are given up. Thread-safe (the node's own thread may be blocked in recv)."""
        self._lost.add(peer)

    def is_lost(self, peer: int) -> bool:
        return peer in self._lost

    def abort(self) -> None:
        """Ends the wait in progress (and every later one until `reset`) with a TransportError.
        Thread-safe: the orchestrator calls it while the node's own thread is blocked in recv."""
        self._aborted.set()

    def reset(self, next_step: int) -> None:
        """Forgets an abandoned round: drops its frames, now and when they arrive late, and
        stops waiting for its sends."""
        with self._lock:
            self._aborted.clear()
            self._min_step = next_step
            self._mail.clear()
            for peer in self._pending:
                self._pending[peer] = 0
            for p in self._peers.values():
                self._graveyard.extend(p.sends)
                p.sends = []
            self._graveyard = [s for s in self._graveyard if not s.done()]

    def forget_peer(self, peer: int) -> None:
        """Drops a peer that died, so that its restarted process may connect under its id."""
        with self._lock:
            p = self._peers.pop(peer, None)
            for slot in [slot for slot in self._mail if slot[0] == peer]:
                del self._mail[slot]  # frames of its previous life
            self._pending[peer] = 0
            if p is not None:
                self._graveyard.extend(p.sends)
                if p.closed is None:
                    self._close_ep(p.ep)
            self._failed.pop(peer, None)

    def flush(self, timeout_s: float) -> None:
        """Waits until UCX is done with every send: messages past the eager size only move
        while the sender progresses, so a node must flush before it stops calling in."""
        with self._lock:
            deadline = time.monotonic() + timeout_s
            for p in self._peers.values():
                if p.id in self._lost:  # a dead peer will never take them
                    self._graveyard.extend(p.sends)
                    p.sends = []
            if not self._progress_until(
                lambda: not any(p.sends for p in self._peers.values() if p.id not in self._lost),
                deadline,
            ):
                stuck = [p.id for p in self._peers.values() if p.sends and p.id not in self._lost]
                raise TransportError(
                    f"node {self.node_id}: sends to peers {stuck} not done within {timeout_s}s"
                )

    def progress(self, timeout_s: float) -> None:
        """Serves connections and incoming frames for `timeout_s` (for a node with nothing to do)."""
        with self._lock:
            self._progress_until(lambda: False, time.monotonic() + timeout_s)

    def close(self) -> None:
        with self._lock:
            for ep in [p.ep for p in self._peers.values() if p.closed is None] + [
                h.ep for h in self._handshakes if h.closed is None
            ]:
                self._close_ep(ep)
            self._peers.clear()
            self._handshakes.clear()
            self._worker.progress()
            with self._doorbell_lock:
                if self._doorbell_w >= 0:
                    self._wakeup.unregister(self._doorbell_r)
                    os.close(self._doorbell_r)
                    os.close(self._doorbell_w)
                    self._doorbell_r = self._doorbell_w = -1

    # ---- progress ----------------------------------------------------------------------
    def _progress_until(
        self, done: Callable[[], bool], deadline: float, may_spin: bool = True
    ) -> bool:
        """Progresses UCX until `done()` or the deadline. `may_spin` False: sleep on the
        descriptor even in polling mode (an idle node's wait must not hold a core)."""
        start = time.monotonic()
        spin_until = start + self.settings.spin_us * 1e-6
        busy_until = start + _BUSY_SPIN_S
        polling = self.settings.progress_mode == "polling" and may_spin
        while True:
            self._worker.progress()
            self._service()
            if done():
                return True
            if self._aborted.is_set():
                raise TransportError(f"node {self.node_id}: round aborted by the orchestrator")
            now = time.monotonic()
            if now >= deadline:
                return False
            if polling or now < spin_until or (now < busy_until and self._in_flight()):
                continue
            # nothing left to progress: sleep until UCX has news (or `interrupt` rings)
            if self._worker.arm() and self._wakeup.poll(1000 * min(deadline - now, _MAX_SLEEP_S)):
                with contextlib.suppress(BlockingIOError, OSError):
                    os.read(self._doorbell_r, 4096)

    def _in_flight(self) -> bool:
        """A big frame is moving: UCX's shared-memory rendezvous advances only when both sides
        progress and does not wake a sleeping worker, so a wait keeps spinning while one is in
        flight (bench/NOTES.md: 8 MiB at half the rate otherwise), for a bounded time: a peer
        that stopped progressing must not keep this node's core busy."""
        return any(p.payload_reqs or p.sends for p in self._peers.values())

    def _wait_send(self, handle: PendingSend, timeout_s: float) -> None:
        with self._lock:
            lost = self._lost
            if not self._progress_until(
                lambda: handle.done() or handle.peer in lost, time.monotonic() + timeout_s
            ):
                raise TransportError(
                    f"node {self.node_id}: a send to peer {handle.peer} did not complete "
                    f"within {timeout_s}s"
                )
            if not handle.done() or (handle.error is not None and handle.peer in lost):
                raise PeerLost(f"node {self.node_id}: peer {handle.peer} was lost")
            handle._settle()
            if handle.error is not None:
                raise TransportError(
                    f"node {self.node_id}: send to peer {handle.peer} failed: {handle.error}"
                )

    def _service(self) -> None:
        if self._handshakes:
            self._service_handshakes()
        for p in list(self._peers.values()):
            try:
                if p.closed is not None:
                    raise ConnectionError(p.closed)
                self._pump(p)
                if p.sends:
                    self._retire_sends(p)
            except Exception as err:
                self._fail_peer(
                    p, f"{type(err).__name__}: {err}", isinstance(err, WireError), _gone(p, err)
                )

    def _pump(self, p: _Peer) -> None:
        """Moves this peer's frames from UCX into the mailbox, as far as they have arrived."""
        while True:
            if p.payload_reqs:
                if not all(r.completed for r in p.payload_reqs):
                    return
                for r in p.payload_reqs:
                    r.check_error()
                if p.header is None:
                    raise WireError(f"payload from peer {p.id} without a header")
                self._deliver(p, p.header, p.payload)
                p.payload_reqs, p.payload, p.header = [], [], None
            if p.header_req is None:
                p.header_buf[:HEADER_BYTES] = 0  # a short message must not pass for the last one
                p.header_req = p.ep.tag_recv(
                    self._array(p.header_buf), self._ucx.UCXXTag(p.recv_tag | _HEADER_CHANNEL)
                )
            if not p.header_req.completed:
                return
            req, p.header_req = p.header_req, None
            req.check_error()
            header = unpack(p.header_buf, self.settings.max_frame_bytes)
            if header.kind == FrameKind.HELLO or header.sender != p.id:
                raise WireError(
                    f"frame of kind {header.kind} from sender {header.sender} under peer {p.id}'s tag"
                )
            if header.inline:
                # GPU nodes stage through pinned memory: a copy from pageable memory took
                # ~180 µs per 8 KiB frame on the H100 host (bench/NOTES.md), from pinned a few
                pinned = self.device.type != "cpu"
                tensors = [
                    torch.empty(m.shape, dtype=m.dtype, pin_memory=pinned) for m in header.tensors
                ]
                offset = HEADER_BYTES
                for t in tensors:
                    _wire_view(t)[:] = p.header_buf[offset : offset + t.nbytes]
                    offset += t.nbytes
                if pinned:
                    tensors = [t.to(self.device, non_blocking=True) for t in tensors]
                self._deliver(p, header, tensors)
                # the next receive is posted on the next pass, after the caller has had this
                # frame (and maybe answered it): posting costs ~8 µs, and a frame that comes
                # first waits in UCX's unexpected queue meanwhile
                return
            p.header = header
            # received straight into memory where the node computes
            p.payload = [
                torch.empty(m.shape, dtype=m.dtype, device=self.device) for m in header.tensors
            ]
            tag = self._ucx.UCXXTag(p.recv_tag | _PAYLOAD_CHANNEL)
            p.payload_reqs = [
                p.ep.tag_recv(self._array(_wire_view(t)), tag) for t in p.payload if t.numel()
            ]

    def _deliver(self, p: _Peer, header: Header, tensors: list[torch.Tensor]) -> None:
        if header.key.step < self._min_step:
            return  # a late frame of an abandoned round
        slot = (p.id, header.key)
        if slot in self._mail:
            raise WireError(f"duplicate frame {header.key}")
        if self._pending.get(p.id, 0) >= self.settings.max_pending_frames:
            raise WireError(f"more than {self.settings.max_pending_frames} frames waiting unread")
        self._pending[p.id] = self._pending.get(p.id, 0) + 1
        self._mail[slot] = tensors
        self.stats.frames_received += 1
        self.stats.bytes_received += HEADER_BYTES + header.payload_bytes

    def _retire_sends(self, p: _Peer) -> None:
        still = []
        for s in p.sends:
            if s.done():
                s._settle()
                if s.error is not None:
                    raise ConnectionError(f"send failed: {s.error}")
            else:
                still.append(s)
        p.sends = still

    # ---- connections -------------------------------------------------------------------
    def _on_connection(self, conn_request, handle_errors: bool) -> None:
        """Called inside progress, by the listener for remote (handle_errors) or local peers."""
        listener = self._listener if handle_errors else self._local_listener
        try:
            ep = listener.create_endpoint_from_conn_request(conn_request, handle_errors)
        except Exception as err:
            self.stats.rejected_peers += 1
            log.warning("node %d: rejected a connection: %s", self.node_id, err)
            return
        buf = np.zeros(HELLO_BYTES, np.uint8)
        h = _Handshake(
            ep,
            buf,
            ep.stream_recv(self._array(buf)),
            time.monotonic() + self.settings.connect_timeout_s,
        )
        ep.set_close_callback(self._on_handshake_closed, cb_args=(h,))
        self._handshakes.append(h)

    @staticmethod
    def _on_handshake_closed(h: _Handshake, *_: object) -> None:
        h.closed = "closed during the hello"

    def _service_handshakes(self) -> None:
        waiting = []
        for h in self._handshakes:
            try:
                if h.reply:
                    if not h.reply[0].completed:
                        waiting.append(h)
                        continue
                    h.reply[0].check_error()
                    self._register(
                        h.peer, h.ep, int.from_bytes(h.buf[HEADER_BYTES:], "little"), h.reply[2]
                    )
                    continue
                if h.req.completed:
                    h.req.check_error()
                    self._answer_hello(h)
                    waiting.append(h)
                elif h.closed is not None:
                    raise WireError(h.closed)
                elif time.monotonic() > h.deadline:
                    raise WireError(f"no hello within {self.settings.connect_timeout_s}s")
                else:
                    waiting.append(h)
            except Exception as err:
                self.stats.rejected_peers += 1
                log.warning("node %d: rejected a connection: %s", self.node_id, err)
                if h.closed is None:
                    self._close_ep(h.ep)
        self._handshakes = waiting

    def _answer_hello(self, h: _Handshake) -> None:
        hello = unpack(h.buf[:HEADER_BYTES].tobytes(), self.settings.max_frame_bytes)
        if hello.kind != FrameKind.HELLO or hello.tensors:
            raise WireError(f"first frame must be a hello, got kind {hello.kind}")
        if hello.sender in self._peers:
            raise WireError(f"peer id {hello.sender} is already connected")
        recv_tag = _new_tag_base()
        reply = np.frombuffer(recv_tag.to_bytes(_TAG_BYTES, "little"), np.uint8).copy()
        h.peer = hello.sender
        h.reply = [h.ep.stream_send(self._array(reply)), reply, recv_tag]

    def _register(self, peer: int, ep, send_tag: int, recv_tag: int) -> None:
        p = _Peer(peer, ep, send_tag, recv_tag)
        ep.set_close_callback(self._on_peer_closed, cb_args=(p,))
        self._peers[peer] = p
        self._failed.pop(peer, None)
        self._lost.discard(peer)  # connected again: a restarted peer under its old id
        self._pending[peer] = 0

    @staticmethod
    def _on_peer_closed(p: _Peer, *_: object) -> None:
        p.closed = "the connection closed"

    def _fail_peer(self, p: _Peer, reason: str, protocol: bool, gone: bool = False) -> None:
        # a protocol violation is news; a peer that went away shows up in the next recv anyway
        log.log(
            logging.WARNING if protocol else logging.INFO,
            "node %d: peer %d failed: %s",
            self.node_id,
            p.id,
            reason,
        )
        self._failed[p.id] = reason
        if gone:  # its connection is gone (with peer-failure handling: it died)
            self._lost.add(p.id)  # as if the orchestrator had said so: waits on it end now
        if self._peers.get(p.id) is p:
            del self._peers[p.id]
        for s in p.sends:
            s.error = s.error or reason
        if p.closed is None:  # closing an endpoint UCX already closed crashes ucxx
            self._close_ep(p.ep)

    @staticmethod
    def _close_ep(ep) -> None:
        with contextlib.suppress(Exception):  # already closed
            ep.close()
