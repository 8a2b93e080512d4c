"""`afd serve` as an operator runs it: a foreground process, stopped by a signal to its whole
process group (`kill -- -PGID`, what a supervisor stopping a process group does)."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import grpc
from afd.orchestrator.client import generate, request

SERVING = re.compile(r"gRPC on (\S+), HTTP on (\S+)")


def _marked_pids(mark: str) -> list[int]:
    """Processes whose environment carries `mark`: the server and everything it started."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if mark.encode() in (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _lines(stream, out: queue.Queue) -> None:
    for line in stream:
        out.put(line)
    out.put(None)


def _await_serving(lines: queue.Queue, log: list[str], timeout_s: float) -> str:
    """The gRPC target, once the server says it serves."""
    while True:
        line = lines.get(timeout=timeout_s)
        assert line is not None, "afd serve exited before serving:\n" + "".join(log)
        log.append(line)
        if match := SERVING.search(line):
            return match.group(1)


def test_sigterm_to_the_process_group_drains_exits_0_and_leaves_no_ray_process(
    tiny_model: Path, tmp_path: Path
) -> None:
    config = tmp_path / "deployment.yaml"
    config.write_text(
        f"model: {{path: {tiny_model}}}\n"
        "attention: {nodes: 1}\nexperts: {nodes: 1}\n"
        "serve: {grpc_port: 0, http_port: 0, drain_timeout_s: 60}\n"
    )
    mark = f"AFD_TEST_MARK_{uuid.uuid4().hex}"
    server = subprocess.Popen(
        [sys.executable, "-m", "afd.orchestrator.cli", "serve", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a supervisor or a shell job has
        env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, mark: "1"},
    )
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_lines, args=(server.stdout, lines), daemon=True).start()
    log: list[str] = []
    try:
        target = _await_serving(lines, log, 180)
        with grpc.insecure_channel(target) as ch:
            stream = generate(ch, request(text="Hello", max_tokens=60, ignore_eos=True))
            first = next(stream)  # a request is running when the signal comes
            os.killpg(server.pid, signal.SIGTERM)
            rest = list(stream)
        assert server.wait(90) == 0, "".join(log)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    tokens = [t for r in [first, *rest] for t in r.token_ids]
    assert len(tokens) == 60 and rest[-1].finish_reason == "length"  # it drained whole
    assert _marked_pids(mark) == [], "processes left behind"
