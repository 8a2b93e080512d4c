from __future__ import annotations

import pytest
import torch
from afd.models.sampling import Sampler, SamplingError, SamplingParams


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_tokens", 0, "max_tokens: is 0; must be >= 1"),
        ("temperature", -0.5, r"temperature: is -0.5; must be in \[0, 100\]"),
        ("temperature", float("nan"), r"temperature: is nan; must be in \[0, 100\]"),
        ("top_p", 0.0, r"top_p: is 0.0; must be in \(0, 1\]"),
        ("top_p", 1.5, r"top_p: is 1.5; must be in \(0, 1\]"),
        ("top_k", -1, "top_k: is -1; must be >= 0"),
        ("seed", -3, r"seed: is -3; must be in \[0, 2\*\*63\)"),
        ("stop", ("",), "stop: strings must have 1 to 256 characters"),
        ("stop_token_ids", (-1,), "stop_token_ids: is \\[-1\\]; must be token ids >= 0"),
    ],
)
def test_out_of_range_parameters_are_named(field: str, value: float, message: str) -> None:
    with pytest.raises(SamplingError, match=message):
        SamplingParams(**{field: value})


def _logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(300, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_picks_argmax_and_reports_its_logprob() -> None:
    logits = _logits()
    token, logprob = Sampler(SamplingParams()).sample(logits)
    assert token == int(logits.argmax())
    assert logprob == pytest.approx(float(torch.log_softmax(logits, -1)[token]))


def test_same_seed_gives_same_tokens_and_different_seeds_differ() -> None:
    def draw(seed: int) -> list[int]:
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed))
        return [sampler.sample(_logits(i))[0] for i in range(20)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_top_k_one_and_tiny_top_p_reduce_to_greedy() -> None:
    for params in (
        SamplingParams(temperature=1.0, top_k=1, seed=0),
        SamplingParams(temperature=1.0, top_p=1e-6, seed=0),
    ):
        sampler = Sampler(params)
        assert all(sampler.sample(_logits(i))[0] == int(_logits(i).argmax()) for i in range(10))


def test_top_k_never_samples_outside_the_k_best() -> None:
    logits = _logits()
    allowed = set(torch.topk(logits, 5).indices.tolist())
    sampler = Sampler(SamplingParams(temperature=2.0, top_k=5, seed=1))
    assert {sampler.sample(logits)[0] for _ in range(200)} <= allowed
