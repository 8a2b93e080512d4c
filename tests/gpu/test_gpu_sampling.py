"""Sampling on the GPU draws what the CPU draws (run on the GPU host; skipped elsewhere): the
noise is integer arithmetic on (seed, counter, token id), so a seeded request is reproducible
across devices, not only across batches."""

from __future__ import annotations

import pytest
import torch
from afd.models.sampling import RowSampling, SamplingParams, sample_rows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def test_gpu_and_cpu_sample_the_same_tokens() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 151936, generator=g) * 4
    kinds = [
        SamplingParams(),
        SamplingParams(temperature=0.7, seed=1),
        SamplingParams(temperature=1.0, top_k=20, seed=2),
        SamplingParams(temperature=1.3, top_p=0.9, seed=3),
    ]
    rows = [RowSampling(kinds[i % 4], i, 3 * i) for i in range(64)]
    cpu_tokens, cpu_logprobs = sample_rows(logits, rows)
    gpu_tokens, gpu_logprobs = sample_rows(logits.cuda(), rows)
    assert gpu_tokens == cpu_tokens
    assert gpu_logprobs == pytest.approx(cpu_logprobs, abs=1e-3)
