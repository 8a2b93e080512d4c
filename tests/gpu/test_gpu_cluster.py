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

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_gpu_nodes_match_the_cpu_reference(
    tiny_model: Path, ray_session, micro_batches: int
) -> None:
    from dataclasses import replace

    d = Deployment(model=ModelSection(path=str(tiny_model))).with_shape(1, 1, micro_batches)
    d = replace(
        d,
        attention=replace(d.attention, num_gpus=0.5),
        experts=replace(d.experts, num_gpus=0.5),
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
