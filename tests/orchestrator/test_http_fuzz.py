"""Hostile input to every HTTP route: random bytes, wrong types, huge and deeply nested bodies,
wrong methods and paths. Each gets a 4xx with OpenAI's JSON error shape, and the server keeps
answering. The real aiohttp app and `Service` serve on 127.0.0.1; the cluster behind them is an
in-process fake that answers every request with one token, so thousands of requests stay fast.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from afd.models.config import load_config
from afd.models.messages import TokenOutput
from afd.models.tokenizer import Tokenizer
from afd.orchestrator.config import Deployment, ModelSection
from afd.orchestrator.http_server import make_app
from afd.orchestrator.service import Service
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROUTES = {"/v1/completions": "POST", "/v1/chat/completions": "POST", "/v1/models": "GET"}
ROUTES |= {"/metrics": "GET", "/health": "GET"}
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI stays reproducible
    suppress_health_check=[HealthCheck.too_slow],
)


class OneTokenCluster:
    """Stands in for `Cluster`: every request gets one token that ends it."""

    def __init__(self, model_dir: Path) -> None:
        self.config = load_config(model_dir)
        self.step_hooks: list = []
        self.submitted = 0

    def submit(self, prompt_ids, params, request_id, sink) -> None:
        self.submitted += 1
        sink.put(TokenOutput(request_id, 7, -0.5, "x", "length"))

    def abort(self, request_id: str) -> None:
        pass


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[tuple[str, int]]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    deployment = Deployment(model=ModelSection(path=str(tiny_model)))
    service = Service(OneTokenCluster(tiny_model), deployment, Tokenizer(tiny_model))

    async def start() -> tuple[web.AppRunner, int]:
        runner = web.AppRunner(make_app(service, None), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, site._server.sockets[0].getsockname()[1]

    runner, port = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    yield "127.0.0.1", port
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def _send(server: tuple[str, int], method: str, path: str, body: bytes | None = None):
    conn = http.client.HTTPConnection(*server, timeout=30)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _assert_json_client_error(status: int, payload: bytes) -> dict:
    assert 400 <= status < 500, (status, payload[:300])
    error = json.loads(payload)["error"]
    assert isinstance(error["message"], str) and error["message"]
    return error


def _assert_still_serving(server: tuple[str, int]) -> None:
    status, payload = _send(server, "POST", "/v1/completions", b'{"prompt": "hi"}')
    assert status == 200 and json.loads(payload)["choices"][0]["text"] == "x"


post_routes = st.sampled_from(["/v1/completions", "/v1/chat/completions"])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
fields = st.sampled_from(
    ["prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed", "n", "stop"]
    + ["stop_token_ids", "stream", "stream_options", "logprobs", "model", "ignore_eos"]
)


@FUZZ
@given(path=post_routes, raw=st.binary(max_size=300))
def test_random_bytes_get_a_json_4xx(server, path: str, raw: bytes) -> None:
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if isinstance(body, dict):  # the rare bytes that are a JSON object: covered below
        return
    _assert_json_client_error(*_send(server, "POST", path, raw))


@FUZZ
@given(path=post_routes, raw=st.binary(min_size=1, max_size=64))
def test_invalid_utf8_gets_a_400_naming_the_body(server, path: str, raw: bytes) -> None:
    body = b'{"prompt": "' + b"\xff" + raw + b'"}'
    status, payload = _send(server, "POST", path, body)
    assert status == 400 and _assert_json_client_error(status, payload)["param"] == "body"


@FUZZ
@given(path=post_routes, field=fields, value=json_values)
def test_a_field_of_the_wrong_type_gets_a_json_4xx_or_is_served(
    server,
    path: str,
    field: str,
    value: object,
) -> None:
    base = (
        {"prompt": "hi"}
        if path == "/v1/completions"
        else {"messages": [{"role": "user", "content": "hi"}]}
    )
    status, payload = _send(server, "POST", path, json.dumps({**base, field: value}).encode())
    if status != 200:
        _assert_json_client_error(status, payload)


@FUZZ
@given(
    path=st.sampled_from(list(ROUTES)),
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
)
def test_wrong_methods_get_a_json_405(server, path: str, method: str) -> None:
    if ROUTES[path] == method or (method == "HEAD" and ROUTES[path] == "GET"):
        return
    status, payload = _send(server, method, path, b"{}")
    assert status == 405
    _assert_json_client_error(status, payload)


@FUZZ
@given(path=st.text(alphabet="abcdefghijklmnopqrstuvwxyz/._-%0123456789", max_size=40))
def test_unknown_paths_get_a_json_404(server, path: str) -> None:
    path = "/" + path.lstrip("/")
    if path in ROUTES:
        return
    status, payload = _send(server, "GET", path)
    assert status in (404, 400)
    _assert_json_client_error(status, payload)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "body"),  # nested past Python's recursion limit
        (b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", "body"),  # too many digits
        (json.dumps({"prompt": "\ud800"}).encode(), "prompt"),  # a lone surrogate
        (json.dumps({"prompt": "hi", "stream_options": "yes"}).encode(), "stream_options"),
        (json.dumps({"prompt": "hi", "temperature": "hot"}).encode(), "temperature"),
        (json.dumps({"prompt": "hi", "max_tokens": True}).encode(), "max_tokens"),
        (json.dumps({"prompt": "hi", "top_p": 1e999}).encode(), "top_p"),
        (json.dumps({"prompt": "x" * 70_000}).encode(), "prompt"),
    ],
)
def test_hostile_bodies_get_a_400_naming_what_is_wrong(server, body: bytes, param: str) -> None:
    status, payload = _send(server, "POST", "/v1/completions", body)
    assert _assert_json_client_error(status, payload)["param"] == param
    _assert_still_serving(server)


def test_a_body_over_the_size_limit_gets_a_json_413(server) -> None:
    status, payload = _send(
        server, "POST", "/v1/completions", b'{"prompt": "' + b"a" * (5 << 20) + b'"}'
    )
    assert status == 413
    _assert_json_client_error(status, payload)
    _assert_still_serving(server)


def test_a_request_that_cannot_fit_a_nodes_kv_cache_is_refused(tiny_model: Path) -> None:
    from dataclasses import replace

    from afd.orchestrator.service import InvalidRequest

    deployment = Deployment(model=ModelSection(path=str(tiny_model)))
    deployment = replace(deployment, attention=replace(deployment.attention, kv_blocks=2))
    service = Service(OneTokenCluster(tiny_model), deployment, Tokenizer(tiny_model))
    assert service.parse(ids=[1] * 10, max_tokens=22).params.max_tokens == 22  # 32 tokens: fits
    with pytest.raises(InvalidRequest, match=r"max_tokens: is 23; must be in \[1, 22\]"):
        service.parse(ids=[1] * 10, max_tokens=23)
    with pytest.raises(InvalidRequest, match="KV cache holds 32"):
        service.parse(ids=[1] * 32)


class SlowCluster(OneTokenCluster):
    """Streams a token every 20 ms until aborted (or 500 tokens)."""

    def __init__(self, model_dir: Path) -> None:
        super().__init__(model_dir)
        self.aborted = threading.Event()

    def submit(self, prompt_ids, params, request_id, sink) -> None:
        def stream() -> None:
            for i in range(500):
                if self.aborted.wait(0.02):
                    return
                sink.put(TokenOutput(request_id, 7, -0.5, "x", "length" if i == 499 else None))

        threading.Thread(target=stream, daemon=True).start()

    def abort(self, request_id: str) -> None:
        self.aborted.set()


def test_a_client_leaving_mid_stream_aborts_the_request_and_the_server_goes_on(
    tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import socket

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    cluster = SlowCluster(tiny_model)
    deployment = Deployment(model=ModelSection(path=str(tiny_model)))
    service = Service(cluster, deployment, Tokenizer(tiny_model))

    async def start() -> tuple[web.AppRunner, int]:
        runner = web.AppRunner(make_app(service, None), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, runner.addresses[-1][1]

    runner, port = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        body = json.dumps({"prompt": "hi", "max_tokens": 500, "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            received = b""
            while b"data: " not in received:  # streaming has begun
                chunk = s.recv(4096)
                assert chunk, "the server closed before streaming"
                received += chunk
        assert cluster.aborted.wait(10), "the request was not aborted"
        status, payload = _send(("127.0.0.1", port), "GET", "/health")
        failures = [r for r in caplog.records if r.name.endswith("http_server")]
        assert failures == [], "a client leaving is not a server error"
        assert status == 200 and json.loads(payload)["status"] == "ok"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
