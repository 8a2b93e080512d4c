"""Property: whatever bytes a peer sends — as its hello, or as frames once connected — the node
neither crashes nor stalls, rejects or fails that peer only, and still serves a good peer."""

from __future__ import annotations

import itertools
import struct
import threading
import time

import numpy as np
import pytest
import torch
from afd.transport.endpoint import HELLO_BYTES, Transport, TransportError, TransportSettings
from afd.transport.wire import HEADER_BYTES, MAGIC, VERSION, RoundKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

_ids = itertools.count(100)


class ServedNode:
    """A Transport whose own thread keeps progressing, as a live node's does."""

    def __init__(self) -> None:
        self.t = Transport(0, TransportSettings(connect_timeout_s=2.0, max_frame_bytes=1 << 20))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            self.t.progress(0.005)


@pytest.fixture(scope="module")
def node():
    n = ServedNode()
    yield n
    n.stop.set()
    n.thread.join(5)
    n.t.close()


def _exchange_ok(node: ServedNode) -> None:
    """A good peer connects, sends a frame, and the node has it."""
    peer_id = next(_ids)
    good = Transport(peer_id)
    try:
        good.connect(0, node.t.address)
        good.send(0, RoundKey.exchange(1, 2, 3), [torch.arange(6.0)]).result(10)
        assert torch.equal(
            node.t.recv(peer_id, RoundKey.exchange(1, 2, 3), 10)[0], torch.arange(6.0)
        )
    finally:
        good.close()


def _header_like(data: bytes) -> bytes:
    """Random bytes behind a valid magic and version, so the checks past them get exercised."""
    return MAGIC + struct.pack("<H", VERSION) + data


frames = st.one_of(
    st.binary(min_size=0, max_size=HEADER_BYTES + 64),
    st.binary(min_size=HEADER_BYTES - 6, max_size=HEADER_BYTES + 256).map(_header_like),
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(frame=frames)
def test_random_frames_from_a_connected_peer(node: ServedNode, frame: bytes) -> None:
    rogue_id = next(_ids)
    rogue = Transport(rogue_id)
    try:
        rogue.connect(0, node.t.address)
        peer = rogue._peers[0]
        buf = np.frombuffer(frame, np.uint8).copy() if frame else np.zeros(0, np.uint8)
        req = peer.ep.tag_send(rogue._array(buf), rogue._ucx.UCXXTag(peer.send_tag))
        rogue._progress_until(lambda: req.completed, time.monotonic() + 5)
        try:  # either the node took it as a frame, or it failed that peer: never anything else
            node.t.recv(rogue_id, RoundKey.exchange(0, 0, 0), 0.3)
        except TransportError as err:
            assert f"peer {rogue_id}" in str(err)
    finally:
        rogue.close()
    _exchange_ok(node)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(hello=st.binary(min_size=1, max_size=HELLO_BYTES * 2))
def test_random_hellos(node: ServedNode, hello: bytes) -> None:
    import ucxx._lib.libucxx as ucx
    from ucxx._lib.arr import Array

    before = node.t.stats.rejected_peers
    worker = ucx.UCXWorker(ucx.UCXContext({}))
    ep = ucx.UCXEndpoint.create(worker, node.t.address.host, node.t.address.port, True)
    req = ep.stream_send(Array(np.frombuffer(hello, np.uint8).copy()))
    deadline = time.monotonic() + 10  # until the hello is out: only then has the node seen it
    while not req.completed and time.monotonic() < deadline:
        worker.progress()
    assert req.completed
    ep.close()
    for _ in range(100):
        worker.progress()
    _exchange_ok(node)
    deadline = time.monotonic() + 5  # judged when it closes, or at the 2 s hello deadline
    while node.t.stats.rejected_peers == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert node.t.stats.rejected_peers == before + 1
