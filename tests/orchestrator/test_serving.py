"""The real server on loopback (gRPC and HTTP) in front of a real 2+2 Ray cluster with m=2."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import grpc
import openai
import pytest
from afd.models.reference import ReferenceEngine
from afd.models.sampling import SamplingParams
from afd.orchestrator.client import channel, generate, request
from afd.orchestrator.config import Deployment, ModelSection, ServeSection
from afd.orchestrator.server import BackgroundServer
from afd.protos import afd_v1_pb2 as pb
from afd.protos import afd_v1_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

TOKEN = "s3cret-token"


def _deployment(model: Path, **serve: object) -> Deployment:
    d = Deployment(model=ModelSection(path=str(model))).with_shape(2, 2, 2)
    base = ServeSection(grpc_port=0, http_port=0, max_prompt_chars=4000, max_message_bytes=64 << 10)
    return replace(d, serve=replace(base, **serve))


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trace")


@pytest.fixture(scope="module")
def server(tiny_models: dict[str, Path], trace_dir: Path, ray_session):
    deployment = _deployment(tiny_models["qwen3_moe"], trace_dir=str(trace_dir), trace_steps=3)
    s = BackgroundServer(deployment)
    s.start()
    yield s
    assert s.stop()


@pytest.fixture(scope="module")
def ch(server: BackgroundServer):
    with channel(server.server.endpoints.grpc) as c:
        yield c


@pytest.fixture(scope="module")
def reference(tiny_models: dict[str, Path]) -> ReferenceEngine:
    return ReferenceEngine(tiny_models["qwen3_moe"])


def _status(ch: grpc.Channel) -> pb.ClusterStatusResponse:
    return pb_grpc.AfdStub(ch).ClusterStatus(pb.ClusterStatusRequest(), timeout=10)


def _wait_all_blocks_free(ch: grpc.Channel, timeout_s: float = 20.0) -> pb.ClusterStatusResponse:
    deadline = time.monotonic() + timeout_s
    while True:
        s = _status(ch)
        attention = [n for n in s.nodes if n.pool == "attention"]
        if s.running == 0 and all(n.free_kv_blocks == n.total_kv_blocks for n in attention):
            return s
        assert time.monotonic() < deadline, f"blocks still held: {s}"
        time.sleep(0.05)


# ---- streaming equals the reference ----------------------------------------------------------
@pytest.mark.parametrize(
    "sampling",
    [
        {"max_tokens": 12, "ignore_eos": True, "logprobs": True},
        {"max_tokens": 10, "temperature": 0.8, "top_p": 0.9, "seed": 7, "logprobs": True},
    ],
    ids=["greedy", "seeded"],
)
def test_grpc_stream_equals_the_reference(
    ch: grpc.Channel, reference: ReferenceEngine, sampling: dict
) -> None:
    prompt = "The capital of France is"
    responses = list(generate(ch, request(text=prompt, **sampling), timeout_s=60))
    params = SamplingParams(**{k: v for k, v in sampling.items() if k != "logprobs"}, logprobs=True)
    want = reference.generate(reference.tokenizer.encode(prompt), params)
    assert [t for r in responses for t in r.token_ids] == want.token_ids
    assert "".join(r.text for r in responses) == want.text
    got_logprobs = [lp for r in responses for lp in r.logprobs]
    assert got_logprobs == pytest.approx(want.logprobs, abs=1e-5)
    assert [r.finish_reason for r in responses[:-1]] == [""] * (len(responses) - 1)
    last = responses[-1]
    assert last.finish_reason == want.finish_reason
    assert last.usage.prompt_tokens == len(reference.tokenizer.encode(prompt))
    assert last.usage.completion_tokens == len(want.token_ids)


def test_token_id_prompts_and_stop_strings(ch: grpc.Channel, reference: ReferenceEngine) -> None:
    ids = reference.tokenizer.encode("Once upon a time")
    full = reference.generate(ids, SamplingParams(max_tokens=16, ignore_eos=True))
    stop = full.text[4:7]
    want = reference.generate(ids, SamplingParams(max_tokens=16, ignore_eos=True, stop=(stop,)))
    got = list(generate(ch, request(ids=ids, max_tokens=16, ignore_eos=True, stop=[stop])))
    assert "".join(r.text for r in got) == want.text
    assert got[-1].finish_reason == "stop"
    assert not got[-1].logprobs  # not asked for


def test_model_info_health_and_reflection(ch: grpc.Channel, server: BackgroundServer) -> None:
    info = pb_grpc.AfdStub(ch).ModelInfo(pb.ModelInfoRequest(), timeout=10)
    assert info.model_type == "qwen3_moe" and info.num_experts == 8 and info.vocab_size > 0
    health = health_pb2_grpc.HealthStub(ch)
    for name in ("", "afd.v1.Afd"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(ch)
    answers = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    names = {s.name for a in answers for s in a.list_services_response.service}
    assert {"afd.v1.Afd", "grpc.health.v1.Health"} <= names


# ---- bad input ---------------------------------------------------------------------------------
BAD_REQUESTS = [
    (pb.GenerateRequest(text=""), "prompt: is empty"),
    (pb.GenerateRequest(), "prompt: give exactly one"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[])), "prompt: is empty"),
    (
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 10**6])),
        "prompt: token id 1000000 is outside",
    ),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[-3])), "prompt: token id -3 is outside"),
    (
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 600)),
        "prompt: has 600 tokens; the model's context is 512",
    ),
    (pb.GenerateRequest(text="x" * 4001), "prompt: has 4001 characters, at most 4000"),
    (request(text="hi", temperature=-0.5), "sampling.temperature: is -0.5; must be in [0, 100]"),
    (request(text="hi", top_p=1.5), "sampling.top_p: is 1.5; must be in (0, 1]"),
    (request(text="hi", top_p=0.0), "sampling.top_p: is 0.0; must be in (0, 1]"),
    (request(text="hi", max_tokens=0), "sampling.max_tokens: is 0; must be in [1, "),
    (request(text="hi", max_tokens=100000), "sampling.max_tokens: is 100000; must be in [1, "),
    (request(text="hi", top_k=-1), "sampling.top_k: is -1; must be >= 0"),
    (request(text="hi", stop=[""]), "sampling.stop: strings must have 1 to 256 characters"),
    (request(text="hi", stop_token_ids=[10**7]), "sampling.stop_token_ids: token id 10000000"),
]


@pytest.mark.parametrize(("req", "message"), BAD_REQUESTS)
def test_bad_input_is_invalid_argument_naming_the_field(
    ch: grpc.Channel, req: pb.GenerateRequest, message: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(generate(ch, req, timeout_s=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


def test_an_oversize_message_is_refused_and_the_server_goes_on(ch: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(generate(ch, request(text="y" * (70 << 10)), timeout_s=10))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(list(generate(ch, request(text="hi", max_tokens=2, ignore_eos=True)))) == 2


# ---- cancellation, deadlines, a full server -------------------------------------------------
def test_a_cancelled_stream_frees_its_blocks(ch: grpc.Channel) -> None:
    call = generate(ch, request(text="Once upon a time", max_tokens=400, ignore_eos=True))
    next(call), next(call)
    busy = _status(ch)
    assert busy.running == 1
    assert (
        min(n.free_kv_blocks for n in busy.nodes if n.pool == "attention")
        < busy.nodes[0].total_kv_blocks
    )
    call.cancel()
    _wait_all_blocks_free(ch)


def test_a_deadline_ends_the_request_and_frees_its_blocks(ch: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(generate(ch, request(text="Hello", max_tokens=480, ignore_eos=True), timeout_s=0.5))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_all_blocks_free(ch)


def test_a_full_server_answers_resource_exhausted_at_once(
    server: BackgroundServer, tiny_models: dict[str, Path]
) -> None:
    small = BackgroundServer(
        _deployment(tiny_models["qwen3_moe"], max_requests=2), cluster=server.server.cluster
    )
    endpoints = small.start()
    try:
        with channel(endpoints.grpc) as c:
            held = [
                generate(c, request(text="Hi", max_tokens=300, ignore_eos=True)) for _ in range(2)
            ]
            for call in held:
                next(call)
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                list(generate(c, request(text="Hi", max_tokens=4), timeout_s=10))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limit of 2 requests" in err.value.details()
            assert time.monotonic() - start < 2.0  # refused, not queued
            http = openai.OpenAI(base_url=f"{endpoints.http}/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.RateLimitError):
                http.completions.create(model="qwen3_moe", prompt="Hi", max_tokens=2)
            for call in held:
                call.cancel()
    finally:
        assert small.stop()
    _wait_all_blocks_free(channel(server.server.endpoints.grpc))


def _timed_streams(target: str, n: int, max_tokens: int) -> list[tuple[str, float, list[float]]]:
    """n concurrent streams at once: (outcome, seconds to the outcome's first sign, token times)."""
    import threading

    out: list[tuple[str, float, list[float]]] = [("", 0.0, [])] * n
    go = threading.Event()

    def one(k: int) -> None:
        with channel(target) as c:
            go.wait()
            start, times = time.monotonic(), []
            try:
                req = request(text="Hi there", max_tokens=max_tokens, ignore_eos=True)
                for _ in generate(c, req, timeout_s=120):
                    times.append(time.monotonic())
                out[k] = ("ok", times[0] - start, times)
            except grpc.RpcError as err:
                out[k] = (err.code().name, time.monotonic() - start, times)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join(180)
    return out


def _median_gap(results: list[tuple[str, float, list[float]]]) -> float:
    gaps = sorted(b - a for _, _, ts in results for a, b in zip(ts, ts[1:], strict=False))
    return gaps[len(gaps) // 2]


def test_ten_times_the_limit_refuses_the_excess_at_once_and_serves_the_rest(
    server: BackgroundServer, tiny_models: dict[str, Path]
) -> None:
    limit, tokens = 8, 24
    small = BackgroundServer(
        _deployment(tiny_models["qwen3_moe"], max_requests=limit), cluster=server.server.cluster
    )
    endpoints = small.start()
    try:
        alone = _timed_streams(endpoints.grpc, limit, tokens)  # the limit: all admitted
        assert [o for o, _, _ in alone] == ["ok"] * limit
        flood = _timed_streams(endpoints.grpc, 10 * limit, tokens)
    finally:
        assert small.stop()
    admitted = [r for r in flood if r[0] == "ok"]
    refused = [r for r in flood if r[0] != "ok"]
    assert {o for o, _, _ in refused} <= {"RESOURCE_EXHAUSTED"}
    assert len(admitted) >= limit and len(admitted) + len(refused) == 10 * limit
    assert all(len(ts) == tokens for _, _, ts in admitted)  # every admitted stream whole
    assert max(t for _, t, _ in refused) < 2.0  # refused at once, never queued
    # admitted streams keep their pace: the time between tokens stays within a small factor
    # of the same load without the flood (a loose bound: this is a 2-core CI host)
    assert _median_gap(admitted) <= 3 * _median_gap(alone) + 0.05
    _wait_all_blocks_free(channel(server.server.endpoints.grpc))


def test_bearer_token_when_configured(
    server: BackgroundServer, tiny_models: dict[str, Path]
) -> None:
    guarded = BackgroundServer(
        _deployment(tiny_models["qwen3_moe"], auth_token=TOKEN), cluster=server.server.cluster
    )
    endpoints = guarded.start()
    try:
        with channel(endpoints.grpc) as c:
            for token in (None, "wrong"):
                with pytest.raises(grpc.RpcError) as err:
                    list(generate(c, request(text="Hi", max_tokens=2), token=token, timeout_s=10))
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            got = list(generate(c, request(text="Hi", max_tokens=2, ignore_eos=True), token=TOKEN))
            assert len(got) == 2
            health = health_pb2_grpc.HealthStub(c).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no secret
        from afd.orchestrator.plan_experts import read_server_load

        assert len(read_server_load(endpoints.grpc, token=TOKEN)) == 2  # afd plan-experts --token
        with pytest.raises(grpc.RpcError) as err:
            read_server_load(endpoints.grpc)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(
                base_url=f"{endpoints.http}/v1", api_key="wrong", max_retries=0
            ).models.list()
        good = openai.OpenAI(base_url=f"{endpoints.http}/v1", api_key=TOKEN, max_retries=0)
        assert [m.id for m in good.models.list().data] == ["qwen3_moe"]
    finally:
        assert guarded.stop()


# ---- OpenAI-compatible HTTP -------------------------------------------------------------------
@pytest.fixture(scope="module")
def oai(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{server.server.endpoints.http}/v1", api_key="unused", max_retries=0
    )


def test_openai_completions_match_grpc(oai: openai.OpenAI, ch: grpc.Channel) -> None:
    grpc_text = "".join(
        r.text for r in generate(ch, request(text="Hello, world!", max_tokens=10, ignore_eos=True))
    )
    done = oai.completions.create(
        model="qwen3_moe", prompt="Hello, world!", max_tokens=10, extra_body={"ignore_eos": True}
    )
    assert done.choices[0].text == grpc_text
    assert done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 10
    chunks = list(
        oai.completions.create(
            model="qwen3_moe",
            prompt="Hello, world!",
            max_tokens=10,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == grpc_text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_openai_chat_uses_the_checkpoint_template(
    oai: openai.OpenAI, ch: grpc.Channel, reference: ReferenceEngine
) -> None:
    messages = [{"role": "user", "content": "What is two plus two?"}]
    templated = "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n"
    want = reference.generate(
        reference.tokenizer.encode(templated), SamplingParams(max_tokens=8, ignore_eos=True)
    )
    chat = oai.chat.completions.create(
        model="qwen3_moe", messages=messages, max_tokens=8, extra_body={"ignore_eos": True}
    )
    assert chat.choices[0].message.content == want.text
    assert chat.choices[0].message.role == "assistant"
    stream = oai.chat.completions.create(
        model="qwen3_moe",
        messages=messages,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == 8


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"prompt": "", "max_tokens": 4}, "prompt"),
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": "hi", "top_p": 2}, "top_p"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "n": 2}, "n"),
    ],
)
def test_openai_errors_are_400_naming_the_param(
    oai: openai.OpenAI, kwargs: dict, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model="qwen3_moe", **kwargs)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param
    assert param in err.value.body["message"]


def test_openai_unknown_model_is_404(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="gpt-4", prompt="hi", max_tokens=2)


def test_metrics_after_traffic(server: BackgroundServer, ch: grpc.Channel) -> None:
    list(generate(ch, request(text="metrics please", max_tokens=4, ignore_eos=True)))
    with urllib.request.urlopen(f"{server.server.endpoints.http}/metrics", timeout=10) as r:
        text = r.read().decode()
    for name in (
        "afd:num_requests_running",
        "afd:num_requests_waiting",
        "afd:time_to_first_token_seconds_count",
        "afd:time_per_output_token_seconds_count",
        "afd:e2e_request_latency_seconds_count",
        "afd:prompt_tokens_total",
        "afd:generation_tokens_total",
        "afd:kv_cache_usage_perc",
        'afd:expert_tokens_total{expert="0"',
        'afd:expert_node_tokens_total{model_name="qwen3_moe",node="expert-1"}',
        'afd:node_busy_fraction{model_name="qwen3_moe",node="attention-0"}',
        'afd:transport_bytes_total{model_name="qwen3_moe",node="expert-0"}',
        "afd:transport_round_trip_seconds_count",
        'afd:expert_node_load_imbalance{layer="0",model_name="qwen3_moe"}',
        'afd:expert_rebalances_total{model_name="qwen3_moe"} 0.0',  # rebalancing is off here
    ):
        assert name in text, name
    ttft = next(
        line
        for line in text.splitlines()
        if line.startswith("afd:time_to_first_token_seconds_count")
    )
    assert float(ttft.split()[-1]) >= 1


# ---- load -----------------------------------------------------------------------------------------
def test_cluster_status_reports_expert_load_per_layer(ch: grpc.Channel) -> None:
    """Every token goes to exactly top-k experts in every MoE layer, so over the window each
    layer's counts add up to the same multiple of k, and by expert as by node."""
    list(generate(ch, request(text="load", max_tokens=6, ignore_eos=True)))
    s = _status(ch)
    experts = [n for n in s.nodes if n.pool == "expert"]
    assert s.load_window_steps == 128 and len(s.layers) == 2  # both layers of the tiny model
    assert s.expert_rebalances == 0
    totals = {sum(x.expert_tokens) for x in s.layers}
    assert len(totals) == 1 and totals.pop() % 2 == 0 and sum(s.layers[0].expert_tokens) > 0
    for x in s.layers:
        assert len(x.expert_tokens) == 8 and len(x.node_tokens) == len(experts)
        assert sum(x.node_tokens) == sum(x.expert_tokens)
        assert x.imbalance == pytest.approx(
            max(x.node_tokens) / (sum(x.node_tokens) / len(experts))
        )
    for j, node in enumerate(experts):  # each node's own view: its experts, per layer
        assert [x.layer for x in node.layers] == [0, 1]
        for x, total in zip(node.layers, s.layers, strict=True):
            assert list(x.expert_ids) == list(node.expert_ids) and len(x.tokens) == 4
            assert sum(x.tokens) == total.node_tokens[j]
            for e, t in zip(x.expert_ids, x.tokens, strict=True):
                assert t == total.expert_tokens[e]  # no replicas here: the node has it all


def test_plan_experts_reads_a_running_servers_load(
    server: BackgroundServer, ch: grpc.Channel
) -> None:
    from afd.orchestrator.plan_experts import plan, read_server_load

    list(generate(ch, request(text="plan", max_tokens=3, ignore_eos=True)))
    layers = read_server_load(server.server.endpoints.grpc)
    assert [x["layer"] for x in layers] == [0, 1]
    assert all(len(x["expert_tokens"]) == 8 and sum(x["expert_tokens"]) > 0 for x in layers)
    rows = plan(layers, nodes=2, redundant_slots=1, slack=0.1)
    for r in rows:  # every expert placed, on at most 4 + 1 slots a node
        assert {e for ids in r["assignment"] for e in ids} == set(range(8))
        assert all(len(ids) <= 5 for ids in r["assignment"]) and r["imbalance_after"] >= 1.0


def test_200_concurrent_streams_all_finish(server: BackgroundServer) -> None:
    async def one(stub: pb_grpc.AfdStub, i: int) -> int:
        n = 3 + i % 6
        tokens = 0
        async for r in stub.Generate(
            request(text=f"stream {i}", max_tokens=n, ignore_eos=True), timeout=240
        ):
            tokens += len(r.token_ids)
        assert r.finish_reason == "length" and r.usage.completion_tokens == n
        return tokens - n

    async def main() -> list[int]:
        async with grpc.aio.insecure_channel(server.server.endpoints.grpc) as c:
            stub = pb_grpc.AfdStub(c)
            return await asyncio.gather(*(one(stub, i) for i in range(200)))

    assert asyncio.run(main()) == [0] * 200


# ---- property: nothing a client sends produces INTERNAL -------------------------------------
def _sampling_strategy():
    from hypothesis import strategies as st

    floats = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32))
    return st.fixed_dictionaries(
        {},
        optional={
            "max_tokens": st.one_of(st.integers(-10, 6), st.integers(10**6, 2**62)),
            "temperature": floats,
            "top_p": floats,
            "top_k": st.integers(-(2**40), 2**40),
            "seed": st.integers(0, 2**64 - 1),
            "stop": st.lists(st.text(max_size=300), max_size=20),
            "stop_token_ids": st.lists(st.integers(-(2**40), 2**40), max_size=5),
            "logprobs": st.booleans(),
            "ignore_eos": st.booleans(),
        },
    ).map(lambda d: {k: v for k, v in d.items() if v is not None})


def test_random_requests_never_give_internal_errors(ch: grpc.Channel) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    prompts = st.one_of(
        st.builds(lambda t: {"text": t}, st.text(max_size=200)),
        st.builds(lambda ids: {"ids": ids}, st.lists(st.integers(-(2**40), 2**40), max_size=40)),
    )

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(prompt=prompts, sampling=_sampling_strategy())
    def check(prompt: dict, sampling: dict) -> None:
        try:
            req = request(**prompt, **sampling)
        except ValueError:
            return  # not even a valid protobuf message: the client library refuses it
        try:
            for _ in generate(ch, req, timeout_s=60):
                pass
        except grpc.RpcError as err:
            assert err.code() in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            ), (
                err.code(),
                err.details(),
            )

    check()
    assert len(list(generate(ch, request(text="still here", max_tokens=3, ignore_eos=True)))) == 3


# ---- the timeline (`afd serve --trace`) ---------------------------------------------------------
def test_the_server_writes_a_timeline_of_its_first_steps(ch: grpc.Channel, trace_dir: Path) -> None:
    """Every node's spans per layer and micro-batch, on one clock: an expert node computes a
    (layer, micro-batch) after the attention node started sending it, and the attention node's
    combine of it ends after the expert node started on it."""
    list(generate(ch, request(text="trace me", max_tokens=8, ignore_eos=True)))
    deadline = time.monotonic() + 60
    while not (files := list(trace_dir.glob("afd-trace-*.json"))):
        assert time.monotonic() < deadline, "no trace was written"
        time.sleep(0.1)
    events = json.loads(files[0].read_text())["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert sorted(names.values()) == ["attention-0", "attention-1", "expert-0", "expert-1"]
    spans: dict[tuple, dict] = {}
    for e in events:
        if e["ph"] == "X":
            a = e["args"]
            spans[names[e["pid"]], e["cat"], a["step"], a["layer"], a["micro_batch"]] = e
    steps = {key[2] for key in spans if key[0] == "expert-0"}
    assert len(steps) == 3
    for (node, cat, step, layer, mb), e in spans.items():
        assert e["dur"] >= 0
        if node.startswith("expert") and cat == "experts":
            senders = [
                spans[a, "attention", step, layer, mb]
                for a in ("attention-0", "attention-1")
                if (a, "attention", step, layer, mb) in spans
            ]
            assert senders and e["ts"] >= min(s["ts"] for s in senders)
            combines = [
                spans[a, "combine", step, layer, mb]
                for a in ("attention-0", "attention-1")
                if (a, "combine", step, layer, mb) in spans
            ]
            assert all(c["ts"] + c["dur"] >= e["ts"] for c in combines)
    layers = {key[3] for key in spans if key[1] == "attention"}
    assert layers == {0, 1} and {key[4] for key in spans if key[1] == "attention"} <= {0, 1}
