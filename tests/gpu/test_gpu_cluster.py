"""The Ray cluster with its nodes on a GPU (run on the GPU host; skipped where there is none):
attention and expert actors share the one GPU, tensors cross the transport from GPU memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from afd.models.reference import ReferenceEngine
from afd.models.sampling import SamplingParams
from afd.orchestrator.cluster import Cluster
from afd.orchestrator.config import Deployment, ModelSection
from afd.transport.region_memory import mps_running

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.mark.parametrize(
    ("lane", "micro_batches"),
    [("host", 1), ("host", 2), ("device", 1), ("device", 2), ("proxy", 1), ("proxy", 2)],
)
def test_gpu_nodes_match_the_cpu_reference(
    tiny_model: Path, ray_session, lane: str, micro_batches: int
) -> None:
    """On the device and proxy lanes (under MPS) the attention node's decode steps replay
    graphs that hold the exchange, launched ahead of the previous step's tokens being read, each node on
    its own loop: the tokens are still the reference's."""
    from dataclasses import replace

    if lane != "host" and not mps_running():
        pytest.skip("two processes on one GPU need CUDA MPS")
    d = Deployment(model=ModelSection(path=str(tiny_model))).with_shape(1, 1, micro_batches)
    d = replace(
        d,
        attention=replace(d.attention, num_gpus=0.5),
        experts=replace(d.experts, num_gpus=0.5),
        transport=replace(d.transport, lane=lane),
    )
    ref = ReferenceEngine(tiny_model)
    prompts = ["Hello, world!", "The capital of France is", "one two three", "def add(a, b):"]
    requests = [
        (ref.tokenizer.encode(p), SamplingParams(max_tokens=12, ignore_eos=True)) for p in prompts
    ]
    cluster = Cluster(d)
    try:
        outputs = cluster.generate(requests)
    finally:
        cluster.shutdown()
    for (ids, params), out in zip(requests, outputs, strict=True):
        want = ref.generate(ids, params)
        assert [o.token_id for o in out] == want.token_ids
        assert [o.logprob for o in out] == pytest.approx(want.logprobs, abs=1e-3)
