from __future__ import annotations

import pytest
import torch
from afd.models.sampling import (
    RowSampling,
    SamplingError,
    SamplingParams,
    gumbel_noise,
    noise_key,
    sample_rows,
)


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


def _sample(logits_V: torch.Tensor, params: SamplingParams, counter: int = 0) -> tuple[int, float]:
    seed = params.seed if params.seed is not None else 0
    tokens, logprobs = sample_rows(logits_V[None], [RowSampling(params, seed, counter)])
    return tokens[0], logprobs[0]


def test_greedy_picks_argmax_and_reports_its_logprob() -> None:
    logits = _logits()
    token, logprob = _sample(logits, SamplingParams())
    assert token == int(logits.argmax())
    assert logprob == pytest.approx(float(torch.log_softmax(logits, -1)[token]))


def test_same_seed_gives_same_tokens_and_different_seeds_differ() -> None:
    def draw(seed: int) -> list[int]:
        params = SamplingParams(temperature=1.0, seed=seed)
        return [_sample(_logits(i), params, counter=i)[0] for i in range(20)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_a_row_draws_the_same_token_whatever_shares_its_batch() -> None:
    rows = [
        RowSampling(SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=s), s, c)
        for s, c in [(1, 0), (2, 5), (3, 9)]
    ]
    logits = torch.stack([_logits(i) for i in range(3)])
    together = sample_rows(logits, rows)
    alone = [sample_rows(logits[i : i + 1], [rows[i]]) for i in range(3)]
    assert together[0] == [a[0][0] for a in alone]
    assert together[1] == pytest.approx([a[1][0] for a in alone])
    greedy = RowSampling(SamplingParams(), 0, 0)  # a greedy row beside them changes nothing
    mixed = sample_rows(torch.cat([logits[:1], logits]), [greedy, *rows])
    assert mixed[0][1:] == together[0] and mixed[0][0] == int(logits[0].argmax())


def test_draws_follow_the_softmax_of_the_scaled_logits() -> None:
    """Counts over 4000 draws (counter 0..3999) against softmax(logits / T): the noise is
    uniform enough that every token's frequency is within 4 standard deviations."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    params = SamplingParams(temperature=1.5, seed=11)
    n = 4000
    rows = [RowSampling(params, 11, c) for c in range(n)]
    tokens, _ = sample_rows(logits.expand(n, -1), rows)
    counts = torch.bincount(torch.tensor(tokens), minlength=6).double()
    p = torch.softmax(logits.double() / 1.5, -1)
    sd = (n * p * (1 - p)).sqrt()
    assert ((counts - n * p).abs() <= 4 * sd + 1).all(), (counts, n * p)


def test_top_k_one_and_tiny_top_p_reduce_to_greedy() -> None:
    for params in (
        SamplingParams(temperature=1.0, top_k=1, seed=0),
        SamplingParams(temperature=1.0, top_p=1e-6, seed=0),
    ):
        assert all(_sample(_logits(i), params, i)[0] == int(_logits(i).argmax()) for i in range(10))


def test_top_k_and_top_p_never_sample_outside_their_set() -> None:
    logits = _logits()
    allowed = set(torch.topk(logits, 5).indices.tolist())
    params = SamplingParams(temperature=2.0, top_k=5, seed=1)
    assert {_sample(logits, params, c)[0] for c in range(200)} <= allowed
    logits = logits / 3  # flatter: the nucleus holds several tokens
    probs = torch.softmax(logits, -1)
    order = torch.argsort(probs, descending=True)
    nucleus = set(order[: int((probs[order].cumsum(0) < 0.5).sum()) + 1].tolist())
    params = SamplingParams(temperature=1.0, top_p=0.5, seed=2)
    drawn = {_sample(logits, params, c)[0] for c in range(200)}
    assert drawn <= nucleus and len(drawn) > 1


def test_rows_with_top_k_draw_what_the_whole_vocabulary_would() -> None:
    """The top-k shortcut (noise for the k candidates only) against the plain rule: filter
    the scaled logits over the whole vocabulary, add every token's noise, take the argmax."""
    logits = torch.stack([_logits(i) for i in range(3)]) / 2
    for params in (
        SamplingParams(temperature=0.9, top_k=20, seed=4),
        SamplingParams(temperature=1.2, top_k=40, top_p=0.8, seed=4),
    ):
        for counter in range(30):
            rows = [RowSampling(params, 4 + i, counter) for i in range(3)]
            got, _ = sample_rows(logits, rows)
            scaled = logits / params.temperature
            kth = torch.topk(scaled, params.top_k).values[:, -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
            sorted_, order = torch.sort(scaled, descending=True)
            probs = torch.softmax(sorted_, -1)
            drop = probs.cumsum(-1) - probs >= params.top_p
            scaled = scaled.scatter(1, order, sorted_.masked_fill(drop, float("-inf")))
            keys = torch.tensor([noise_key(seed, counter) for seed in (4, 5, 6)])
            noise = gumbel_noise(keys, torch.arange(300)[None, :])
            assert got == (scaled + noise).argmax(-1).tolist()


def test_a_top_k_row_draws_the_same_beside_rows_without_top_k() -> None:
    """Beside a row without top-k the batch takes the whole-vocabulary path; the top-k row
    must still draw what it draws alone (through the k-candidate path)."""
    logits = torch.stack([_logits(i) for i in range(2)]) / 2
    with_k = SamplingParams(temperature=1.0, top_k=10, top_p=0.9, seed=1)
    without = SamplingParams(temperature=1.0, seed=2)
    for counter in range(20):
        rows = [RowSampling(with_k, 1, counter), RowSampling(without, 2, counter)]
        together, _ = sample_rows(logits, rows)
        assert together[0] == sample_rows(logits[:1], rows[:1])[0][0]
        assert together[1] == sample_rows(logits[1:], rows[1:])[0][0]
