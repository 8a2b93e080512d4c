"""One serving process: the cluster, the gRPC endpoint and the HTTP endpoint on one event loop.

`run_forever` is `afd serve`: SIGTERM (or Ctrl-C) drains — health turns NOT_SERVING, new
requests get UNAVAILABLE, running ones finish — then everything shuts down and it exits 0.
`BackgroundServer` runs the same thing on a thread, for `afd demo` and the tests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from afd.models.tokenizer import Tokenizer
from afd.orchestrator.cluster import Cluster
from afd.orchestrator.config import Deployment, DeploymentError
from afd.orchestrator.grpc_server import SERVICE_NAME, _auth_token, start_grpc
from afd.orchestrator.http_server import make_app
from afd.orchestrator.local_ray import connect_ray, disconnect_ray
from afd.orchestrator.service import Service
from aiohttp import web
from grpc_health.v1 import health_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Endpoints:
    grpc: str  # host:port
    http: str  # http://host:port


class Server:
    def __init__(self, deployment: Deployment, cluster: Cluster | None = None) -> None:
        self.deployment = deployment
        self.cluster = cluster
        self._owns_cluster = cluster is None
        self.service: Service | None = None
        self.endpoints: Endpoints | None = None
        self._grpc: Any = None  # grpc.aio.Server
        self._health: Any = None  # the health servicer
        self._runner: web.AppRunner | None = None

    async def start(self) -> Endpoints:
        d, serve = self.deployment, self.deployment.serve
        token = _auth_token(serve)  # fail before any node starts
        if self.cluster is None:
            log.info("starting the cluster for %s", d.model.path)
            self.cluster = await asyncio.to_thread(Cluster, d)
        self.service = Service(self.cluster, d, Tokenizer(d.model.path))
        if serve.trace_dir is not None:
            Path(serve.trace_dir).mkdir(parents=True, exist_ok=True)  # a bad path fails now
            threading.Thread(
                target=write_trace,
                args=(self.cluster, serve.trace_dir, serve.trace_steps),
                name="afd-trace",
                daemon=True,
            ).start()
        self._grpc, grpc_port, self._health = await start_grpc(
            self.service, serve.host, serve.grpc_port
        )
        self._runner = web.AppRunner(make_app(self.service, token), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, serve.host, serve.http_port, ssl_context=_ssl(serve))
        await site.start()
        http_port = self._runner.addresses[-1][1]
        scheme = "https" if serve.tls_cert else "http"
        self.endpoints = Endpoints(
            f"{serve.host}:{grpc_port}", f"{scheme}://{serve.host}:{http_port}"
        )
        log.info(
            "serving %s: gRPC on %s, HTTP on %s",
            self.service.model_name,
            self.endpoints.grpc,
            self.endpoints.http,
        )
        return self.endpoints

    async def stop(self) -> bool:
        """Drains, then shuts everything down; False if running requests outlived the drain."""
        drained = True
        if self.service is not None:
            for name in ("", SERVICE_NAME):
                await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            drained = await self.service.drain()
            if not drained:
                log.warning("drain timed out with %d request(s) running", self.service.in_flight)
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
        if self._runner is not None:
            await self._runner.cleanup()
        if self.service is not None:
            self.service.close()
        if self.cluster is not None and self._owns_cluster:
            await asyncio.to_thread(self.cluster.shutdown)
        return drained

    def run_forever(self) -> int:
        """`afd serve`: serves until SIGTERM or SIGINT, then drains and exits."""

        async def main() -> int:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await self.start()
            await stop.wait()
            log.info("signal received: draining")
            drained = await self.stop()
            log.info("stopped")
            return 0 if drained else 1

        ray_section = self.deployment.ray
        owns_ray = connect_ray(ray_section.address, ray_section.startup_timeout_s)
        try:
            return asyncio.run(main())
        finally:
            if owns_ray:
                disconnect_ray()


class BackgroundServer:
    """A Server on its own thread and event loop."""

    def __init__(self, deployment: Deployment, cluster: Cluster | None = None) -> None:
        self.server = Server(deployment, cluster)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="afd-server", daemon=True
        )
        self._owns_ray = False

    def start(self, timeout_s: float = 300.0) -> Endpoints:
        ray_section = self.server.deployment.ray
        self._owns_ray = connect_ray(ray_section.address, ray_section.startup_timeout_s)
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(timeout_s)

    def stop(self, timeout_s: float = 120.0) -> bool:
        try:
            return asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(
                timeout_s
            )
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout_s)
            if self._owns_ray:
                disconnect_ray()

    @property
    def service(self) -> Service:
        assert self.server.service is not None
        return self.server.service


def with_trace(deployment: Deployment, trace_dir: str | None, steps: int | None) -> Deployment:
    """`--trace DIR` and `--trace-steps N` over the config's `serve.trace_dir`/`trace_steps`."""
    serve = deployment.serve
    changed = replace(
        serve,
        trace_dir=trace_dir if trace_dir is not None else serve.trace_dir,
        trace_steps=steps if steps is not None else serve.trace_steps,
    )
    if changed.trace_steps < 1:
        raise DeploymentError(f"command line: --trace-steps must be >= 1, got {steps}")
    return replace(deployment, serve=changed)


TRACE_WAIT_S = 60.0  # how long a trace waits for its steps once armed, before it takes what ran


def write_trace(cluster: Cluster, directory: str, steps: int) -> Path:
    """Waits for `steps` steps with traffic, traced, and writes their timeline into
    `directory` (open it in ui.perfetto.dev or chrome://tracing). Until traffic comes it
    tries again every TRACE_WAIT_S; a node that never steps (idle, or failed) is left out."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            trace = cluster.trace(steps, TRACE_WAIT_S)
            break
        except TimeoutError:
            continue  # no traffic yet
    path = out / f"afd-trace-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(trace))
    log.info("wrote a trace of %d step(s) to %s", steps, path)
    return path


def with_ports(
    deployment: Deployment, host: str | None, grpc_port: int | None, http_port: int | None
) -> Deployment:
    serve = deployment.serve
    return replace(
        deployment,
        serve=replace(
            serve,
            host=host if host is not None else serve.host,
            grpc_port=grpc_port if grpc_port is not None else serve.grpc_port,
            http_port=http_port if http_port is not None else serve.http_port,
        ),
    )


def _ssl(serve):
    if not serve.tls_cert:
        return None
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(serve.tls_cert, serve.tls_key)
    return context
