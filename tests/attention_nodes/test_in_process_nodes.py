"""Attention and expert nodes as plain objects in one process, over real UCX transports, with
no Ray: the ping-pong pipeline for every m, and the remote dispatcher's failover and checks.

Expert nodes only react, so each runs its step on a thread while the attention node steps on
the test's thread, as the orchestrator's engine drives them on separate actors.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from afd.attention_nodes.device_dispatch import DeviceDispatcher
from afd.attention_nodes.node import AttentionNode, AttentionNodeSettings
from afd.attention_nodes.pipeline import PingPongPipeline
from afd.attention_nodes.remote_dispatch import RemoteDispatcher
from afd.expert_nodes.node import ExpertNode, ExpertNodeSettings
from afd.models import kernels
from afd.models.checkpoint import Checkpoint
from afd.models.config import load_config
from afd.models.expert_placement import ExpertPlacement
from afd.models.fp8 import dequantize_rows, quantize_rows
from afd.models.messages import ExpertStepResult, NewRequest, TokenOutput
from afd.models.moe import ExpertShard, LocalDispatcher
from afd.models.reference import ReferenceEngine
from afd.models.sampling import SamplingParams
from afd.transport.device_lane import DeviceLane
from afd.transport.endpoint import Transport, TransportError
from afd.transport.proxy_lane import ProxyLane
from afd.transport.wire import FrameKind

from tests.conftest import ARCHS

EXPERT_BASE = 1000
TIMEOUT_S = 30.0
PROMPTS = ["Hello, world!", "The capital of France is", "one two three", "Water", "def f(x):"]


def _wire(attention: AttentionNode, experts: list[ExpertNode], lane: bool = False) -> None:
    """Connects the nodes as the orchestrator does (on the device lane, the slots too)."""
    capacity = attention.settings.max_batch_tokens
    regions = [e.open_lane([0], capacity) for e in experts] if lane else None
    with ThreadPoolExecutor(len(experts)) as pool:
        waits = [pool.submit(e.wait_for_attention_nodes, [0], TIMEOUT_S) for e in experts]
        own = attention.connect([(e.settings.node_id, e.address()) for e in experts], regions)
        for w in waits:
            w.result(TIMEOUT_S)
    if lane:
        assert own is not None
        for e in experts:
            e.connect_lane([own])


def _expert_nodes(
    tiny_model: Path, placement: ExpertPlacement, **settings: int | bool
) -> list[ExpertNode]:
    """One expert node per node of the placement, with these settings."""
    return [
        ExpertNode(ExpertNodeSettings(EXPERT_BASE + j, str(tiny_model), ids, **settings))
        for j, ids in enumerate(placement.assignment)
    ]


def _serve(
    attention: AttentionNode,
    experts: list[ExpertNode],
    requests: list[NewRequest],
    expert_results: list[list[ExpertStepResult]] | None = None,
) -> dict[str, list[TokenOutput]]:
    """Steps every node until each request has finished; the tokens of each request (and each
    expert node's step results, into `expert_results` when given)."""
    out: dict[str, list[TokenOutput]] = {r.request_id: [] for r in requests}
    new, step = list(requests), 0
    with ThreadPoolExecutor(max(1, len(experts))) as pool:
        while new or any(not t or t[-1].finish_reason is None for t in out.values()):
            runs = [pool.submit(e.run_step, step) for e in experts]
            result = attention.step(step, new, [])
            for j, r in enumerate(runs):
                done = r.result(TIMEOUT_S)
                if expert_results is not None:
                    expert_results[j].append(done)
            for token in result.outputs:
                out[token.request_id].append(token)
            new, step = [], step + 1
            assert step < 200, "requests did not finish"
    return out


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> ReferenceEngine:
    return ReferenceEngine(tiny_model)


def _requests(engine: ReferenceEngine) -> list[NewRequest]:
    params = [SamplingParams(max_tokens=3 + 2 * i, ignore_eos=True) for i in range(len(PROMPTS))]
    params[-1] = SamplingParams(max_tokens=6, temperature=0.9, seed=5, ignore_eos=True)
    return [
        NewRequest(f"r{i}", engine.tokenizer.encode(text), p)
        for i, (text, p) in enumerate(zip(PROMPTS, params, strict=True))
    ]


@pytest.mark.parametrize("micro_batches", [1, 2, 3, 4])
def test_ping_pong_gives_the_reference_tokens_for_every_m(
    tiny_model: Path, reference: ReferenceEngine, micro_batches: int
) -> None:
    config = load_config(tiny_model)
    placement = ExpertPlacement.even(config.num_experts, 2)
    attention = AttentionNode(
        AttentionNodeSettings(0, str(tiny_model), micro_batches=micro_batches), placement
    )
    experts = _expert_nodes(tiny_model, placement, micro_batches=micro_batches)
    try:
        _wire(attention, experts)
        requests = _requests(reference)
        got = _serve(attention, experts, requests)
    finally:
        for node in [attention, *experts]:
            node.shutdown()
    for r in requests:
        want = reference.generate(r.prompt_ids, r.params)
        tokens = got[r.request_id]
        assert [t.token_id for t in tokens] == want.token_ids, r.request_id
        assert [t.logprob for t in tokens] == pytest.approx(want.logprobs, abs=1e-5)


@pytest.mark.parametrize(
    ("lane", "micro_batches", "forced"),
    [
        ("device", 1, False),
        ("device", 2, False),
        ("device", 2, True),
        ("device", 3, False),
        ("proxy", 1, False),
        ("proxy", 3, False),
    ],
)
def test_a_slot_lane_gives_the_reference_tokens(
    tiny_model: Path,
    reference: ReferenceEngine,
    lane: str,
    micro_batches: int,
    forced: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rows and sums through slots (host memory on CPU: shared on the device lane, copied by
    the nodes' proxies over UCX on the proxy lane), the control frames through the transport:
    the same tokens as the reference, and each expert node counts its own. `forced`: through
    the Triton kernels (the interpreter), the dispatch's one-kernel share of each node too."""
    if forced and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the forced kernels run on CPU tensors in Triton's interpreter only")
    from afd.models.kernels import node_share, small_ops

    calls = {"write_node_share": 0, "count_slots": 0}
    for module in (node_share, small_ops):
        for name in calls:
            if (real := getattr(module, name, None)) is not None:

                def counted(*args, _real=real, _name=name, **kw):  # type: ignore[no-untyped-def]
                    calls[_name] += 1
                    return _real(*args, **kw)

                monkeypatch.setattr(module, name, counted)
    with kernels.force(forced):
        _slot_lane_gives_the_reference_tokens(tiny_model, reference, lane, micro_batches)
    assert (min(calls.values()) > 0) == forced  # the kernels ran, and only when forced


def _slot_lane_gives_the_reference_tokens(
    tiny_model: Path, reference: ReferenceEngine, lane: str, micro_batches: int
) -> None:
    config = load_config(tiny_model)
    placement = ExpertPlacement.even(config.num_experts, 2)
    settings = AttentionNodeSettings(0, str(tiny_model), micro_batches=micro_batches, lane=lane)
    attention = AttentionNode(settings, placement)
    experts = [
        ExpertNode(
            ExpertNodeSettings(
                EXPERT_BASE + j, str(tiny_model), ids, micro_batches=micro_batches, lane=lane
            )
        )
        for j, ids in enumerate(placement.assignment)
    ]
    results: list[list[ExpertStepResult]] = [[], []]
    try:
        _wire(attention, experts, lane=True)
        assert attention.pipeline is not None
        assert isinstance(attention.pipeline.dispatcher, DeviceDispatcher)
        assert isinstance(attention.lane, ProxyLane if lane == "proxy" else DeviceLane)
        requests = _requests(reference)
        got = _serve(attention, experts, requests, results)
    finally:
        for node in [attention, *experts]:
            node.shutdown()
    _check(reference, requests, got)
    for j, steps in enumerate(results):  # every (token, slot) counted once, on its holder
        assert set(steps[0].tokens_per_expert) == set(placement.assignment[j])
    counted = sum(sum(s.tokens_per_expert.values()) for steps in results for s in steps)
    assert counted == 2 * _slots(requests)


@pytest.mark.parametrize("lane", ["device", "proxy"])
def test_a_slot_lane_step_without_its_expert_node_ends_at_the_deadline(
    tiny_model: Path, reference: ReferenceEngine, lane: str
) -> None:
    """An expert node that never runs its step: the attention node's first wait ends at its
    deadline with an error naming the step; after a reset, the next step runs."""
    config = load_config(tiny_model)
    placement = ExpertPlacement.even(config.num_experts, 1)
    settings = AttentionNodeSettings(0, str(tiny_model), lane=lane, round_timeout_s=0.2)
    attention = AttentionNode(settings, placement)
    expert = ExpertNode(
        ExpertNodeSettings(EXPERT_BASE, str(tiny_model), placement.assignment[0], lane=lane)
    )
    try:
        _wire(attention, [expert], lane=True)
        requests = _requests(reference)[:1]
        with pytest.raises(TransportError, match="did not deliver its round within 0.2 s"):
            attention.step(0, requests, [])
        attention.reset(1)
        runs = ThreadPoolExecutor(1).submit(expert.run_step, 1)
        assert attention.step(1, [], []).tokens > 0  # the request, still waiting, runs now
        runs.result(TIMEOUT_S)
    finally:
        for node in [attention, expert]:
            node.shutdown()


def _check(
    reference: ReferenceEngine, requests: list[NewRequest], got: dict[str, list[TokenOutput]]
) -> None:
    """Every request's tokens are the reference's, logprobs within 1e-5."""
    for r in requests:
        want = reference.generate(r.prompt_ids, r.params)
        assert [t.token_id for t in got[r.request_id]] == want.token_ids, r.request_id
        assert [t.logprob for t in got[r.request_id]] == pytest.approx(want.logprobs, abs=1e-5)


def _serve_placement(
    tiny_model: Path, reference: ReferenceEngine, placement: ExpertPlacement, micro_batches: int
) -> tuple[list[NewRequest], list[list[ExpertStepResult]]]:
    """Serves `_requests` on 1 attention node + the placement's expert nodes (each loading
    its experts of every layer), checks the tokens against the reference, and returns the
    requests and every expert node's step results."""
    attention = AttentionNode(
        AttentionNodeSettings(0, str(tiny_model), micro_batches=micro_batches), placement
    )
    experts = [
        ExpertNode(
            ExpertNodeSettings(
                EXPERT_BASE + j,
                str(tiny_model),
                ids,
                micro_batches=micro_batches,
                layer_expert_ids=placement.node_layers(j),
            )
        )  # fmt: skip
        for j, ids in enumerate(placement.assignment)
    ]
    results: list[list[ExpertStepResult]] = [[] for _ in experts]
    try:
        _wire(attention, experts)
        requests = _requests(reference)
        got = _serve(attention, experts, requests, results)
    finally:
        for node in [attention, *experts]:
            node.shutdown()
    _check(reference, requests, got)
    return requests, results


def _slots(requests: list[NewRequest]) -> int:
    """(token, top-k slot) pairs of one MoE layer over the whole run (top-2)."""
    return sum(len(r.prompt_ids) + r.params.max_tokens - 1 for r in requests) * 2


def test_a_replicated_expert_splits_its_tokens_between_its_holders(
    tiny_model: Path, reference: ReferenceEngine
) -> None:
    """Experts 0-3 on both expert nodes, 4-7 on node 0 only: each (token, slot) of experts
    0-3 goes to one holder by row, so both count tokens of them; tokens stay the reference's."""
    placement = ExpertPlacement.explicit(8, [list(range(8)), [0, 1, 2, 3]])
    requests, results = _serve_placement(tiny_model, reference, placement, 1)
    per_node = [
        {e: sum(s.tokens_per_expert[e] for s in steps) for e in steps[0].tokens_per_expert}
        for steps in results
    ]
    assert set(per_node[1]) == {0, 1, 2, 3}
    assert any(per_node[0][e] > 0 and per_node[1][e] > 0 for e in range(4))
    assert sum(per_node[0][e] for e in range(4, 8)) > 0
    assert sum(sum(n.values()) for n in per_node) == 2 * _slots(requests)  # 2 layers, once each


def test_a_placement_per_layer_gives_the_reference_tokens(
    tiny_model: Path, reference: ReferenceEngine
) -> None:
    """Layer 0 split evenly, layer 1 its own way (expert 0 on both nodes, the rest swapped):
    each node loads and counts each layer's own experts; tokens stay the reference's."""
    placement = ExpertPlacement.even(8, 2).with_layers({1: [[4, 5, 6, 7, 0], [0, 1, 2, 3]]})
    requests, results = _serve_placement(tiny_model, reference, placement, 2)
    layer_rows = [[len(row) for row in steps[0].layer_tokens] for steps in results]
    assert layer_rows == [[4, 5], [4, 4]]  # node 0: 4 experts in layer 0, 5 in layer 1
    assert set(results[1][0].tokens_per_expert) == set(range(8))  # 4-7, then 0-3
    for layer in range(2):  # each layer's slots, all counted once, on the nodes holding them
        counted = sum(sum(s.layer_tokens[layer]) for steps in results for s in steps)
        assert counted == _slots(requests)


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_a_colocated_node_gives_the_reference_tokens(
    tiny_model: Path, reference: ReferenceEngine, micro_batches: int
) -> None:
    settings = AttentionNodeSettings(0, str(tiny_model), micro_batches=micro_batches)
    node = AttentionNode(settings, None)  # every expert on the node, no transport
    try:
        assert node.address() is None
        requests = _requests(reference)
        got = _serve(node, [], requests)
    finally:
        node.shutdown()
    _check(reference, requests, got)


# ---- the remote dispatcher against hand-driven expert peers ---------------------------------
class ExpertPeer:
    """A transport answering dispatch frames with every expert of the model (so any node's
    slots get the right partial sums), or, when told, with a wrong shape or not at all."""

    def __init__(self, node_id: int) -> None:
        self.transport = Transport(node_id)
        self.shard: ExpertShard | None = None  # the experts its node holds, set by each test
        self.kinds: list[FrameKind] = []
        self.answer: Callable[[torch.Tensor], torch.Tensor] | None = lambda y: y

    def serve(self, frames: int) -> None:
        for _ in range(frames):
            peer, key, (x, ids, w) = self.transport.recv_any(lambda p, k: True, TIMEOUT_S)
            self.kinds.append(key.kind)
            if self.answer is not None and self.shard is not None:
                y = self.shard.forward(key.layer, x, ids.long(), w.to(x.dtype))
                self.transport.send(peer, key, [self.answer(y)])


@pytest.fixture()
def peers(tiny_model: Path) -> Iterator[tuple[Transport, list[ExpertPeer]]]:
    attention = Transport(0)
    experts = [ExpertPeer(EXPERT_BASE + j) for j in range(2)]
    waits = [
        threading.Thread(target=e.transport.wait_for_peers, args=([0], TIMEOUT_S)) for e in experts
    ]
    for w in waits:
        w.start()
    for e in experts:
        attention.connect(e.transport.node_id, e.transport.address)
    for w in waits:
        w.join(TIMEOUT_S)
    yield attention, experts
    for t in [attention, *(e.transport for e in experts)]:
        t.close()


def _inputs(
    tiny_model: Path, placement_of: Callable[[int], ExpertPlacement], experts: list[ExpertPeer]
) -> tuple[ExpertShard, ExpertPlacement, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every expert (the expected answer), the placement, and a batch routed over it; each
    peer gets the shard of its node."""
    config = load_config(tiny_model)
    checkpoint = Checkpoint(tiny_model)
    shard = ExpertShard.load(checkpoint, config, range(config.num_experts), torch.float32)
    placement = placement_of(config.num_experts)
    for peer, ids in zip(experts, placement.assignment, strict=True):
        peer.shard = ExpertShard.load(checkpoint, config, ids, torch.float32)
    g = torch.Generator().manual_seed(3)
    x_TD = torch.randn(6, config.hidden_size, generator=g)
    ids_TK = torch.stack(
        [torch.randperm(config.num_experts, generator=g)[: config.top_k] for _ in range(6)]
    )
    weights_TK = torch.rand(6, config.top_k, generator=g)
    return shard, placement, x_TD, ids_TK, weights_TK


def test_a_lost_expert_node_is_failed_over_to_its_replica_within_the_exchange(
    tiny_model: Path, peers: tuple[Transport, list[ExpertPeer]]
) -> None:
    attention, (first, second) = peers
    shard, placement, x_TD, ids_TK, weights_TK = _inputs(
        tiny_model, lambda e: ExpertPlacement.even(e, 2, replicas=2), [first, second]
    )
    dispatcher = RemoteDispatcher(attention, placement, [EXPERT_BASE, EXPERT_BASE + 1], TIMEOUT_S)
    first.answer = None  # receives its frame, then dies without answering
    serving = [
        threading.Thread(target=first.serve, args=(1,)),
        threading.Thread(target=second.serve, args=(2,)),
    ]
    for t in serving:
        t.start()
    plan = dispatcher.dispatch(0, 0, 0, x_TD, ids_TK, weights_TK)
    threading.Timer(0.2, attention.mark_lost, args=(EXPERT_BASE,)).start()  # the orchestrator
    out_TD = dispatcher.combine(plan, x_TD)
    for t in serving:
        t.join(TIMEOUT_S)
    assert second.kinds == [FrameKind.EXCHANGE, FrameKind.FAILOVER]
    want_TD = shard.forward(0, x_TD, ids_TK, weights_TK)
    torch.testing.assert_close(out_TD, want_TD, rtol=1e-5, atol=1e-6)


def test_an_answer_of_the_wrong_shape_is_an_error_naming_the_peer(
    tiny_model: Path, peers: tuple[Transport, list[ExpertPeer]]
) -> None:
    attention, experts = peers
    shard, placement, x_TD, ids_TK, weights_TK = _inputs(
        tiny_model, lambda e: ExpertPlacement.even(e, 2), experts
    )
    dispatcher = RemoteDispatcher(attention, placement, [EXPERT_BASE, EXPERT_BASE + 1], TIMEOUT_S)
    experts[1].answer = lambda y: y[:, :-1]  # one hidden column short
    serving = [threading.Thread(target=e.serve, args=(1,)) for e in experts]
    for t in serving:
        t.start()
    plan = dispatcher.dispatch(0, 0, 0, x_TD, ids_TK, weights_TK)
    with pytest.raises(
        TransportError, match=f"expert peer {EXPERT_BASE + 1} answered .* with shape"
    ):
        dispatcher.combine(plan, x_TD)
    for t in serving:
        t.join(TIMEOUT_S)


def test_a_colocated_node_steps_on_its_own_loop_and_sleeps_when_idle(
    tiny_model: Path, reference: ReferenceEngine
) -> None:
    node = AttentionNode(AttentionNodeSettings(0, str(tiny_model)), None)
    node.start_loop()
    try:
        assert node.poll(0.05).results == []  # nothing submitted: no step at all
        requests = _requests(reference)
        node.submit(requests[:2], [])
        node.submit(requests[2:], [])
        got: dict[str, list[TokenOutput]] = {r.request_id: [] for r in requests}
        while any(not t or t[-1].finish_reason is None for t in got.values()):
            for _, result in node.poll(TIMEOUT_S).results:
                for token in result.outputs:
                    got[token.request_id].append(token)
        assert node.poll(0.05).results == []  # every request finished: the loop sleeps again
    finally:
        node.shutdown()
    for r in requests:
        want = reference.generate(r.prompt_ids, r.params)
        assert [t.token_id for t in got[r.request_id]] == want.token_ids, r.request_id


def test_a_request_the_cache_can_never_hold_does_not_spin_the_loop(tiny_model: Path) -> None:
    settings = AttentionNodeSettings(0, str(tiny_model), kv_blocks=2, block_size=4)
    node = AttentionNode(settings, None)  # room for 8 tokens
    node.start_loop()
    try:
        node.submit([NewRequest("big", list(range(1, 13)), SamplingParams(max_tokens=2))], [])
        results = node.poll(TIMEOUT_S).results
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            results += node.poll(0.05).results
        results = [r for _, r in results]
        assert len(results) == 1 and results[0].tokens == 0 and results[0].waiting == 1
    finally:
        node.shutdown()


@pytest.mark.skipif(not kernels.HAVE_TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("arch", ARCHS)
def test_the_kernels_give_the_reference_tokens_colocated_and_disaggregated(
    tiny_models: dict[str, Path], arch: str
) -> None:
    """The served math through the Triton kernels (the interpreter on CPU): fused MoE on
    both node kinds, fused norms, router and, where the model allows, q/k norm + RoPE + cache
    write and the paged decode kernel."""
    model = tiny_models[arch]
    engine = ReferenceEngine(model)
    placement = ExpertPlacement.even(load_config(model).num_experts, 2)
    with kernels.force():
        colocated = AttentionNode(AttentionNodeSettings(0, str(model)), None)
        attention = AttentionNode(AttentionNodeSettings(0, str(model), micro_batches=2), placement)
        experts = [
            ExpertNode(ExpertNodeSettings(EXPERT_BASE + j, str(model), ids, micro_batches=2))
            for j, ids in enumerate(placement.assignment)
        ]
        try:
            _wire(attention, experts)
            requests = _requests(engine)
            runs = [_serve(colocated, [], requests), _serve(attention, experts, requests)]
        finally:
            for node in [colocated, attention, *experts]:
                node.shutdown()
    for r in requests:
        want = engine.generate(r.prompt_ids, r.params)
        for got in runs:
            assert [t.token_id for t in got[r.request_id]] == want.token_ids, r.request_id
            assert [t.logprob for t in got[r.request_id]] == pytest.approx(want.logprobs, abs=1e-4)


@pytest.mark.skipif(not kernels.HAVE_TRITON, reason="Triton is not installed")
def test_projections_split_over_k_give_the_reference_tokens(
    tiny_model: Path, reference: ReferenceEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tuned table that splits the router and the output projection over K (as the H100's
    does): their partial sums, added by the router's top-k and the next add+norm, give the
    reference's tokens. The QKV takes the skinny kernel whole."""
    from afd.models.kernels import skinny_linear, tuning

    c = load_config(tiny_model)
    D, H, G, Dh = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    split = {str(m): {"block_n": 16, "block_k": 32, "split_k": 2} for m in (1, 16)}
    whole = {str(m): {"block_n": 16, "block_k": 32} for m in (1, 16)}
    table = tmp_path / "tuned.json"
    tuning.save(
        {
            tuning.shape_key("linear", torch.float32, "cpu", N=D, K=H * Dh): split,
            tuning.shape_key("linear", torch.float32, "cpu", N=c.num_experts, K=D): split,
            tuning.shape_key("linear", torch.float32, "cpu", N=(H + 2 * G) * Dh, K=D): whole,
        },
        table,
    )
    monkeypatch.setattr(tuning, "TABLE_FILE", table)
    tuning.load_table.cache_clear()
    skinny_linear._tuned.cache_clear()
    calls: list[bool] = []
    real = skinny_linear.skinny_linear

    def counted(*args, partials: bool = False, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(partials)
        return real(*args, partials=partials, **kwargs)

    monkeypatch.setattr(skinny_linear, "skinny_linear", counted)
    try:
        with kernels.force():
            node = AttentionNode(AttentionNodeSettings(0, str(tiny_model)), None)
            try:
                requests = _requests(reference)
                got = _serve(node, [], requests)
            finally:
                node.shutdown()
    finally:
        tuning.load_table.cache_clear()
        skinny_linear._tuned.cache_clear()
    assert True in calls and False in calls  # split projections and a whole one ran
    for r in requests:
        want = reference.generate(r.prompt_ids, r.params)
        assert [t.token_id for t in got[r.request_id]] == want.token_ids, r.request_id
        assert [t.logprob for t in got[r.request_id]] == pytest.approx(want.logprobs, abs=1e-4)


def _reports_until_done(
    nodes: list[AttentionNode], requests: list[NewRequest]
) -> tuple[dict[str, list[TokenOutput]], list[list[int]]]:
    """Polls the attention nodes' loops until every request finished: the tokens of each
    request, and the steps each node ran."""
    out: dict[str, list[TokenOutput]] = {r.request_id: [] for r in requests}
    steps: list[list[int]] = [[] for _ in nodes]
    deadline = time.monotonic() + 120
    while any(not t or t[-1].finish_reason is None for t in out.values()):
        assert time.monotonic() < deadline, "requests did not finish"
        for i, node in enumerate(nodes):
            report = node.poll(0.05)
            assert report.state.error is None, report.state.error
            for step, result in report.results:
                steps[i].append(step)
                for token in result.outputs:
                    out[token.request_id].append(token)
    while True:  # the others' last steps: until every loop is parked at the same step
        reports = [node.poll(0.05) for node in nodes]
        for i, report in enumerate(reports):
            steps[i] += [step for step, _ in report.results]
        states = [r.state for r in reports]
        one_step = len({s.next_step for s in states}) == 1
        if all(s.parked for s in states) and one_step and not any(r.results for r in reports):
            return out, steps
        assert time.monotonic() < deadline, "the loops did not park at one step"


def test_disaggregated_nodes_step_in_lockstep_on_their_own_loops(
    tiny_model: Path, reference: ReferenceEngine
) -> None:
    """2 attention + 2 expert nodes, each on its own loop, no driver: work on one attention
    node calls the idle one to every step, tokens equal the reference, and once all is done
    every loop parks at the same step. Paused and halted there, the cluster goes on from it."""
    config = load_config(tiny_model)
    placement = ExpertPlacement.even(config.num_experts, 2)
    attention = [
        AttentionNode(AttentionNodeSettings(i, str(tiny_model), micro_batches=2), placement)
        for i in range(2)
    ]
    experts = _expert_nodes(tiny_model, placement, micro_batches=2)
    peers = [(e.settings.node_id, e.address()) for e in experts]
    try:
        with ThreadPoolExecutor(len(experts)) as pool:
            waits = [pool.submit(e.wait_for_attention_nodes, [0, 1], TIMEOUT_S) for e in experts]
            for a in attention:
                a.connect(peers)
            for w in waits:
                w.result(TIMEOUT_S)
        for node in [*experts, *attention]:
            node.start_loop(1)
        requests = _requests(reference)
        attention[0].submit(requests[:3], [])
        got, steps = _reports_until_done(attention, requests[:3])
        assert steps[0] == steps[1] == list(range(1, len(steps[0]) + 1))  # the idle one too
        _check(reference, requests[:3], got)
        # idle: every loop parks at the same step, and no step runs until there is work
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            states = [n.poll(0.05).state for n in [*attention, *experts]]
            if len({s.next_step for s in states}) == 1 and all(s.parked for s in states):
                break
            assert time.monotonic() < deadline, states
        parked_at = states[0].next_step
        assert [n.poll(0.2).results for n in attention] == [[], []]
        # a boundary: paused, then halted at that step; the cluster goes on from it
        for a in attention:
            a.pause()
        for node in [*attention, *experts]:
            node.halt()
        assert all(n.poll(TIMEOUT_S).state.halted for n in [*attention, *experts])
        for node in [*experts, *attention]:
            node.start_loop(parked_at)
        attention[1].submit(requests[3:], [])  # now the other node has the work
        got, steps = _reports_until_done(attention, requests[3:])
        assert steps[0] == steps[1] and steps[1][0] == parked_at
        _check(reference, requests[3:], got)
    finally:
        for node in [*attention, *experts]:
            node.shutdown()


def test_decoding_ahead_gives_the_tokens_of_stepping_one_at_a_time(
    tiny_model: Path, reference: ReferenceEngine
) -> None:
    """A colocated node launches decode step n+1 before it reads step n's tokens. Sequences
    that end on a stop token or string (unknown until read) waste one row, an abort or new
    requests stop the run ahead: every request still gets exactly the tokens a node stepping
    one at a time gives it (and the reference's, for those not aborted)."""
    requests = _requests(reference)
    first = reference.generate(requests[0].prompt_ids, requests[0].params).token_ids
    stop_token = replace(requests[0].params, max_tokens=12, stop_token_ids=(first[2],))
    text = reference.tokenizer.decode(first[:4])
    stop_text = replace(
        requests[0].params, max_tokens=12, stop=(text[-2:],) if len(text) > 2 else ()
    )
    requests += [
        NewRequest("stop-token", requests[0].prompt_ids, stop_token),
        NewRequest("stop-text", requests[0].prompt_ids, stop_text),
        NewRequest("aborted", requests[1].prompt_ids, replace(requests[1].params, max_tokens=12)),
    ]
    script = {0: (requests[:2] + requests[5:], []), 3: (requests[2:5], []), 6: ([], ["aborted"])}
    got = []
    for ahead in (True, False):
        node = AttentionNode(AttentionNodeSettings(0, str(tiny_model), decode_ahead=ahead), None)
        out: dict[str, list[TokenOutput]] = {r.request_id: [] for r in requests}
        for step in range(40):
            new, aborts = script.get(step, ([], []))
            for token in node.step(step, list(new), list(aborts)).outputs:
                out[token.request_id].append(token)
        assert not node.scheduler.running and not node.scheduler.waiting
        assert (node.steps_ahead > 0) == ahead
        got.append(out)
    assert {k: [t.token_id for t in v] for k, v in got[0].items()} == {
        k: [t.token_id for t in v] for k, v in got[1].items()
    }
    assert got[0]["stop-token"][-1].token_id == first[2]
    assert got[0]["stop-token"][-1].finish_reason == "stop"
    assert got[0]["aborted"] and got[0]["aborted"][-1].finish_reason is None
    _check(reference, requests[:5], {r.request_id: got[0][r.request_id] for r in requests[:5]})


class _RoundingDispatcher(LocalDispatcher):
    """Every expert here, computing on rows rounded as fp8 dispatch rounds them."""

    def dispatch(self, step, layer, micro_batch, x_TD, ids_TK, weights_TK):  # type: ignore[no-untyped-def]
        x_TD = dequantize_rows(*quantize_rows(x_TD), x_TD.dtype)
        return super().dispatch(step, layer, micro_batch, x_TD, ids_TK, weights_TK)


def test_fp8_dispatch_sends_half_the_row_bytes_and_the_tokens_of_fp8_rounded_rows(
    tiny_model: Path, reference: ReferenceEngine
) -> None:
    """Rows go to the expert nodes in E4M3 with their scales (real transports): the tokens
    are those of a colocated node whose experts see the same rounded rows, and the row bytes
    on the wire are a quarter of fp32's plus the scales."""
    config = load_config(tiny_model)
    placement = ExpertPlacement.even(config.num_experts, 2)
    requests = _requests(reference)
    sent = {}
    got = {}
    for fp8_rows in (True, False):
        attention = AttentionNode(
            AttentionNodeSettings(0, str(tiny_model), dispatch_fp8=fp8_rows), placement
        )
        experts = _expert_nodes(tiny_model, placement, dispatch_fp8=fp8_rows)
        try:
            _wire(attention, experts)
            got[fp8_rows] = _serve(attention, experts, requests)
            assert attention.transport is not None
            sent[fp8_rows] = attention.transport.stats.bytes_sent
        finally:
            for node in [attention, *experts]:
                node.shutdown()
    rounded = AttentionNode(AttentionNodeSettings(0, str(tiny_model), decode_ahead=False), None)
    assert rounded.pipeline is not None
    shard = rounded.pipeline.dispatcher.shard  # type: ignore[attr-defined]
    rounded.pipeline = PingPongPipeline(rounded.model, rounded.cache, _RoundingDispatcher(shard))
    want = _serve(rounded, [], requests)
    for r in requests:
        assert [t.token_id for t in got[True][r.request_id]] == [
            t.token_id for t in want[r.request_id]
        ], r.request_id
    # the same exchanges with rows of 4 bytes a feature, then of 1 byte plus a 4-byte scale
    # for each 128: the fp8 frames carry well under half the bytes
    assert sent[True] < 0.5 * sent[False]
