"""The local Ray head `afd serve` starts when the deployment names no Ray address."""

from __future__ import annotations

import socket

import pytest
from afd.orchestrator import local_ray


def test_a_taken_port_starts_the_head_on_another(monkeypatch: pytest.MonkeyPatch) -> None:
    """The port is chosen free, but another process may bind it before Ray does (seen in CI:
    the GCS failed with the address in use); the head then starts on another port."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        offered = [taken]
        free = local_ray._free_port
        monkeypatch.setattr(local_ray, "_free_port", lambda: offered.pop() if offered else free())
        head = local_ray.LocalRayHead(120.0)
        try:
            assert not offered and f":{taken}" not in head.address
        finally:
            head.stop()
