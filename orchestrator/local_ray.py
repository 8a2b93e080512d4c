"""A local Ray instance that only its owner stops.

`ray.init()` starts the Ray head (GCS, raylet, workers) as children in the caller's process
group, so a signal to that group (`kill -- -PGID`, a terminal's Ctrl-C, a supervisor stopping a
process group) kills Ray under a server that is still draining. `LocalRayHead` starts the head
with `ray start --head --block` in a session of its own: a group signal reaches the server only,
the server drains, shuts its cluster down, then stops the head. The head process is told to die
with its parent (Linux `PR_SET_PDEATHSIG`), so a server killed outright leaves nothing behind.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

log = logging.getLogger(__name__)
_ADDRESS = re.compile(r"--address='([^']+)'")
_PR_SET_PDEATHSIG = 1


class LocalRayError(RuntimeError):
    """The local Ray head did not start; the message carries what Ray printed."""


# resolved here, not in the forked child (no dlopen between fork and exec)
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM when the thread that started it ends (start it
    from the main thread: it ends with the process)."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


PORT_ATTEMPTS = 3
_PORT_TAKEN = re.compile(r"Address already in use|Failed to start the grpc server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalRayHead:
    """A Ray head in its own session; `address` is what `ray.init(address=...)` takes."""

    def __init__(self, timeout_s: float) -> None:
        # the port is free when chosen, but another process may take it before Ray binds it:
        # a head that fails for a port in use is started again on another one
        for attempt in range(PORT_ATTEMPTS):
            try:
                self._start(timeout_s)
                return
            except LocalRayError as err:
                if attempt + 1 == PORT_ATTEMPTS or not _PORT_TAKEN.search(str(err)):
                    raise
                log.warning("the local Ray head's port was taken; starting it on another")

    def _start(self, timeout_s: float) -> None:
        self._temp_dir = tempfile.mkdtemp(prefix="afd-ray-")
        command = [  # Ray's CLI through this interpreter: no console script needs to be on PATH
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            f"--port={_free_port()}",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={self._temp_dir}",  # not /tmp/ray: another ray.init() must not find it
            "--block",
        ]
        self._process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
            preexec_fn=_die_with_parent,
            # the driver's auth mode (read when it imported ray; off unless set): `ray start`
            # alone would turn token auth on, and a driver without it cannot connect
            env={
                **os.environ,
                "PYTHONUNBUFFERED": "1",
                "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
            },
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._output: list[str] = []
        threading.Thread(target=self._read, name="afd-ray-head", daemon=True).start()
        self.address = self._await_address(timeout_s)

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _await_address(self, timeout_s: float) -> str:
        """The GCS address, once the head says it runs; LocalRayError after `timeout_s`."""
        address, deadline = None, time.monotonic() + timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.stop()
                tail = "".join(self._output[-20:])
                raise LocalRayError(
                    f"the local Ray head did not start within {timeout_s}s:\n{tail}"
                )
            self._output.append(line)
            if match := _ADDRESS.search(line):
                address = match.group(1)
            if address and "block forever" in line:
                return address

    @property
    def pid(self) -> int:
        return self._process.pid

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stops the head and every Ray process under it (the head's own SIGTERM handling)."""
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout_s)
        shutil.rmtree(self._temp_dir, ignore_errors=True)


_owned: LocalRayHead | None = None


def connect_ray(address: str | None, timeout_s: float) -> bool:
    """Joins the Ray cluster at `address`, or (None, and no RAY_ADDRESS) starts a local head
    this process owns. Call from the main thread; False if Ray was already connected."""
    global _owned
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        _owned = LocalRayHead(timeout_s)
        address = _owned.address
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except BaseException:
        disconnect_ray()
        raise
    return True


def disconnect_ray() -> None:
    """Leaves Ray, and stops the local head if this process started one."""
    global _owned
    import ray

    ray.shutdown()
    if _owned is not None:
        _owned.stop()
        _owned = None
