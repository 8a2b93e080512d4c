"""Real UCX endpoints: one Transport in this process, peers in child processes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from afd.transport.endpoint import (
    HELLO_BYTES,
    PeerAddress,
    Transport,
    TransportError,
    TransportSettings,
)
from afd.transport.wire import RoundKey

ECHO_PEER = textwrap.dedent(
    """
    import sys, torch
    from afd.transport.endpoint import PeerAddress, Transport, TransportSettings
    from afd.transport.wire import RoundKey
    shared = len(sys.argv) < 7 or sys.argv[6] == "shared"
    t = Transport(int(sys.argv[1]), TransportSettings(shared_memory=shared))
    t.connect(0, PeerAddress(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]))
    for step in range(3):
        key = RoundKey.exchange(step, 1, 0)
        frames = t.recv(0, key, 30)
        t.send(0, key, [f * 2 if f.is_floating_point() else f for f in frames]).result(30)
    t.close()
    """
)
ROGUE_PEER = textwrap.dedent(
    """
    import sys, time, numpy as np
    import ucxx._lib.libucxx as ucx
    from ucxx._lib.arr import Array
    worker = ucx.UCXWorker(ucx.UCXContext({}))
    handle_errors = sys.argv[3] == "remote"
    ep = ucx.UCXEndpoint.create(worker, sys.argv[1], int(sys.argv[2]), handle_errors)
    req = ep.stream_send(Array(np.frombuffer(bytes.fromhex(sys.argv[4]), np.uint8)))
    deadline = time.monotonic() + 10
    while not req.completed and time.monotonic() < deadline:
        worker.progress()
    ep.close()
    for _ in range(1000):
        worker.progress()
    """
)


@pytest.fixture(scope="module")
def node() -> Transport:
    t = Transport(0, TransportSettings(connect_timeout_s=3.0))
    yield t
    t.close()


def _spawn(script: str, *args: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.parametrize(("lane", "peer_id"), [("shared", 5), ("remote", 6)])
def test_tensors_of_every_dtype_cross_processes_intact(
    node: Transport, lane: str, peer_id: int
) -> None:
    """Over shared memory (same machine) and over the failure-handling lane other machines use;
    small frames go inline, a 1 MiB one as a separate payload message."""
    peer = _spawn(ECHO_PEER, peer_id, *node.address, lane)
    node.wait_for_peers([peer_id], 30)
    for step in range(3):
        key = RoundKey.exchange(step, 1, 0)
        rows = 7 if step < 2 else 16384  # the last frame is past the inline limit
        x = torch.randn(rows, 16, dtype=torch.bfloat16)
        ids = torch.randint(-1, 8, (rows, 2), dtype=torch.int16)
        node.send(peer_id, key, [x, ids, torch.empty(0, 16)]).result(30)
        y, ids_back, empty = node.recv(peer_id, key, 30)
        assert torch.equal(y, x * 2) and torch.equal(ids_back, ids) and empty.shape == (0, 16)
    assert peer.wait(30) == 0


def test_recv_has_a_deadline(node: Transport) -> None:
    with pytest.raises(TransportError, match=r"no frame .* from peer 99 within 0.2s"):
        node.recv(99, RoundKey.exchange(1, 2, 3), 0.2)


WRONG_VERSION = (b"AFDW" + bytes([9, 0]) + bytes(HELLO_BYTES - 6)).hex()


@pytest.mark.parametrize(
    ("listener", "payload"),
    [
        ("remote", "00" * HELLO_BYTES),
        ("remote", WRONG_VERSION),
        ("remote", "ff" * 4096),
        ("remote", "00" * 3),
        ("local", "ff" * 4096),
        ("local", "00" * 3),
    ],
    ids=["zeros", "version", "garbage", "short", "local-garbage", "local-short"],
)
def test_a_rogue_connection_is_rejected_and_the_node_keeps_serving(
    node: Transport, listener: str, payload: str
) -> None:
    before = node.stats.rejected_peers
    port = node.address.port if listener == "remote" else node.address.local_port
    rogue = _spawn(ROGUE_PEER, node.address.host, port, listener, payload)
    deadline = time.monotonic() + 30
    while rogue.poll() is None and time.monotonic() < deadline:
        node.progress(0.05)  # a live node progresses all the time
    peer_id = 10 + before
    good = _spawn(ECHO_PEER, peer_id, *node.address)
    node.wait_for_peers([peer_id], 30)
    for step in range(3):
        node.send(peer_id, RoundKey.exchange(step, 1, 0), [torch.ones(2, 2)]).result(30)
        assert torch.equal(
            node.recv(peer_id, RoundKey.exchange(step, 1, 0), 30)[0], torch.full((2, 2), 2.0)
        )
    assert good.wait(30) == 0
    deadline = time.monotonic() + 10  # a short hello is judged when it closes or times out
    while node.stats.rejected_peers == before and time.monotonic() < deadline:
        node.progress(0.05)
    assert node.stats.rejected_peers == before + 1


SENDING_PEER = textwrap.dedent(
    """
    import json, sys, torch
    from afd.transport.endpoint import Transport
    from afd.transport.wire import RoundKey
    t = Transport(int(sys.argv[1]))  # the settings a node runs with by default
    print(json.dumps(list(t.address)), flush=True)
    t.wait_for_peers([0], 30)  # the receiver connects, as attention nodes do to expert nodes
    x, gap = torch.randn(1024), float(sys.argv[2])
    for step in range(1 << 40):
        t.send(0, RoundKey.exchange(step, 0, 0), [x])
        t.progress(gap)
    """
)


@pytest.mark.parametrize("attempt", range(3))
def test_a_peer_killed_mid_send_costs_the_others_nothing(attempt: int) -> None:
    """Nodes get SIGKILLed (fault injection, OOM). Over UCX's shared memory, a sender killed
    between claiming a slot of the receiver's FIFO and marking it written blocks that FIFO for
    good: no frame of any other peer, no new hello gets through any more (about half the kills
    of a peer sending flat out do it). The endpoints a node makes by default come through."""
    node = Transport(0, TransportSettings(connect_timeout_s=10.0, max_pending_frames=1 << 30))
    spawned = [_spawn(SENDING_PEER, 1, 0.02), _spawn(SENDING_PEER, 2, 0.0)]  # ticker, victim
    try:
        for peer, p in enumerate(spawned, 1):
            assert p.stdout is not None
            node.connect(peer, PeerAddress(*json.loads(p.stdout.readline())))
        last, until = -1, time.monotonic() + 1.0 + 0.2 * attempt
        while time.monotonic() < until:
            peer, key, _ = node.recv_any(lambda p, k: True, 10)
            if peer == 1:
                last = max(last, key.step)
        spawned[1].kill()
        spawned[1].wait()
        for _ in range(5):  # frames the ticker sends after the kill still arrive
            _, key, _ = node.recv_any(lambda p, k, after=last + 3: p == 1 and k.step > after, 10)
            last = key.step
        deadline = time.monotonic() + 10  # and the dead peer's closed connection is noticed:
        while not node.is_lost(2):  # waits on it end as if the orchestrator had said so
            assert time.monotonic() < deadline, "the killed peer was not noticed"
            node.progress(0.05)
        newcomer = _spawn(SENDING_PEER, 3, 0.02)
        spawned.append(newcomer)
        assert newcomer.stdout is not None
        node.connect(3, PeerAddress(*json.loads(newcomer.stdout.readline())))  # hello answered
    finally:
        for p in spawned:
            p.kill()
            p.wait()
        node.close()
