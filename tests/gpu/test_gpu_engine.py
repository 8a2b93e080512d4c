"""The served engine on a GPU, colocated, in-process (run on the GPU host; skipped elsewhere):
decode steps replay CUDA graphs, launched ahead of the previous step's tokens being read, and
tokens equal the CPU reference's (and a node's stepping one at a time), a seeded sampled
request's included."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from afd.attention_nodes.node import AttentionNode, AttentionNodeSettings
from afd.models.messages import NewRequest, TokenOutput
from afd.models.reference import ReferenceEngine
from afd.models.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
PROMPTS = ["Hello, world!", "The capital of France is", "one two three", "def add(a, b):", "Hi"]


def _serve(node: AttentionNode, requests: list[NewRequest]) -> dict[str, list[TokenOutput]]:
    """One new request a step (batches of every size, prefill beside decode), to the end."""
    out: dict[str, list[TokenOutput]] = {r.request_id: [] for r in requests}
    waiting, step = list(requests), 0
    while waiting or any(not t or t[-1].finish_reason is None for t in out.values()):
        result = node.step(step, waiting[:1], [])
        waiting, step = waiting[1:], step + 1
        for token in result.outputs:
            out[token.request_id].append(token)
        assert step < 300
    return out


def test_colocated_gpu_engine_replays_graphs_and_matches_the_cpu_reference(
    tiny_model: Path,
) -> None:
    ref = ReferenceEngine(tiny_model)
    params = [SamplingParams(max_tokens=20, ignore_eos=True)] * (len(PROMPTS) - 1)
    params.append(SamplingParams(max_tokens=20, ignore_eos=True, temperature=0.8, top_k=40, seed=9))
    requests = [
        NewRequest(f"r{i}", ref.tokenizer.encode(text), p)
        for i, (text, p) in enumerate(zip(PROMPTS, params, strict=True))
    ]
    settings = AttentionNodeSettings(0, str(tiny_model), device="cuda", block_size=4)
    graphed = AttentionNode(settings, None)
    eager = AttentionNode(replace(settings, cuda_graphs=False), None)
    sync = AttentionNode(replace(settings, decode_ahead=False), None)  # no step launched ahead
    got, got_eager, got_sync = (
        _serve(graphed, requests),
        _serve(eager, requests),
        _serve(sync, requests),
    )
    assert graphed.steps_ahead > 0 and eager.steps_ahead > 0 and sync.steps_ahead == 0
    for r in requests:
        want = ref.generate(r.prompt_ids, r.params)
        ids = [t.token_id for t in got[r.request_id]]
        assert ids == want.token_ids == [t.token_id for t in got_eager[r.request_id]]
        assert ids == [t.token_id for t in got_sync[r.request_id]]
        assert [t.logprob for t in got[r.request_id]] == pytest.approx(want.logprobs, abs=1e-3)
    assert graphed.graphs is not None and graphed.graphs.replays >= 15  # most decode steps
    assert len(graphed.graphs.graphs) >= 3  # several batch and block buckets


def test_programmatic_dependent_launch_changes_no_bit(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PDL changes when a kernel's programs are placed, never what they compute: with it on
    and off (`AFD_PDL=0`) the same tokens and logprobs, bit for bit. An ordering race (a
    program touching memory before its wait) would show here first."""
    from afd.models.kernels import pdl

    if not pdl.pdl(torch.empty(0, device="cuda")):
        pytest.skip("PDL needs an NVIDIA GPU of compute capability 9 or later")
    ref = ReferenceEngine(tiny_model)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    requests = [NewRequest(f"r{i}", ref.tokenizer.encode(p), params) for i, p in enumerate(PROMPTS)]
    settings = AttentionNodeSettings(0, str(tiny_model), device="cuda", block_size=4)
    runs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("AFD_PDL", flag)
        pdl._pdl_on.cache_clear()
        assert pdl.pdl(torch.empty(0, device="cuda")) == (flag == "1")
        runs.append(_serve(AttentionNode(settings, None), requests))
    monkeypatch.setenv("AFD_PDL", "1")
    pdl._pdl_on.cache_clear()
    on, off = runs
    for r in requests:
        assert [(t.token_id, t.logprob) for t in on[r.request_id]] == [
            (t.token_id, t.logprob) for t in off[r.request_id]
        ]


def test_traced_decode_steps_replay_a_graph_that_stamps_the_trace(tiny_model: Path) -> None:
    """A traced decode step replays a graph captured for tracing (the same kernels plus the
    timer's), so that the trace shows the step as it serves: the same tokens as untraced
    steps, every layer's spans in order, and graph replays, not eager steps. (A colocated
    node's graphs are one micro-batch; the device lane's m = 2 traces: bench/decode.py.)"""
    ref = ReferenceEngine(tiny_model)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    requests = [NewRequest(f"r{i}", ref.tokenizer.encode(p), params) for i, p in enumerate(PROMPTS)]
    settings = AttentionNodeSettings(0, str(tiny_model), device="cuda", block_size=4)
    plain, traced = AttentionNode(settings, None), AttentionNode(settings, None)
    traced.trace_steps(4, first=len(PROMPTS) + 1)  # decode-only steps, once every request is in
    spans: list = []
    out: dict[str, list[TokenOutput]] = {r.request_id: [] for r in requests}
    waiting, step = list(requests), 0
    while waiting or any(not t or t[-1].finish_reason is None for t in out.values()):
        replays = traced.graphs.replays if traced.graphs is not None else 0
        result = traced.step(step, waiting[:1], [])
        if result.trace:  # a replay (the last traced step also launches the next one ahead)
            assert traced.graphs is not None and traced.graphs.replays > replays
            spans.append(result.trace)
        waiting, step = waiting[1:], step + 1
        for token in result.outputs:
            out[token.request_id].append(token)
        assert step < 300
    want = _serve(plain, requests)
    for r in requests:
        assert [t.token_id for t in out[r.request_id]] == [t.token_id for t in want[r.request_id]]
    assert len(spans) == 4
    layers = traced.config.num_layers
    for step_spans in spans:
        names = {(s.name, s.layer, s.micro_batch) for s in step_spans}
        assert names == {(n, layer, 0) for n in ("attention", "combine") for layer in range(layers)}
        attention = sorted(
            (s for s in step_spans if s.name == "attention"), key=lambda s: s.start_ns
        )
        assert [s.layer for s in attention if s.micro_batch == 0] == list(range(layers))
        assert all(s.end_ns >= s.start_ns for s in step_spans)
