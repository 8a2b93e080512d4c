"""Sampling parameters (validated where requests come in) and batched sampling on the logits'
device: greedy, temperature, top-k and top-p, with logprobs. A request's random draws are a
function of its seed and its token count only, so it samples the same tokens whether it runs
alone in the reference or batched on any attention node, on CPU or GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeVar

import torch

MAX_TEMPERATURE = 100.0
T = TypeVar("T", int, torch.Tensor)
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


class SamplingError(ValueError):
    """A sampling parameter outside its allowed range; `field` names it, `detail` says why."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request samples and when it stops. Every rule on these values is checked here,
    whoever builds them (command line, gRPC, HTTP); rules that depend on the model or the
    prompt (vocabulary, context room) are the front door's."""

    max_tokens: int = 16
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k filter
    seed: int | None = None  # None: a fresh random stream per request
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings; the text ends before the first one
    ignore_eos: bool = False
    logprobs: bool = True

    def __post_init__(self) -> None:
        rules = [
            ("max_tokens", self.max_tokens, self.max_tokens >= 1, ">= 1"),
            (
                "temperature",
                self.temperature,
                math.isfinite(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE,
                f"in [0, {MAX_TEMPERATURE:g}]",
            ),
            ("top_p", self.top_p, math.isfinite(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", self.top_k, self.top_k >= 0, ">= 0 (0 turns it off)"),
            ("seed", self.seed, self.seed is None or 0 <= self.seed < 2**63, "in [0, 2**63)"),
            (
                "stop",
                len(self.stop),
                len(self.stop) <= MAX_STOP_STRINGS,
                f"at most {MAX_STOP_STRINGS} strings",
            ),
            (
                "stop_token_ids",
                list(self.stop_token_ids),
                all(t >= 0 for t in self.stop_token_ids),
                "token ids >= 0",
            ),
        ]
        for name, value, ok, allowed in rules:
            if not ok:
                raise SamplingError(name, f"is {value}; must be {allowed}")
        if any(not 1 <= len(s) <= MAX_STOP_CHARS for s in self.stop):
            raise SamplingError("stop", f"strings must have 1 to {MAX_STOP_CHARS} characters")


@dataclass(frozen=True, slots=True)
class RowSampling:
    """What `sample_rows` needs of one row: the request's rules, its seed (drawn at admission
    when the request named none) and how many tokens it has sampled before this one."""

    params: SamplingParams
    seed: int
    counter: int


class SampledRows:
    """Tokens [B] and logprobs [B] drawn on the logits' device, with their copy to the host
    under way: `tokens_B` can feed the next step before the host has read them."""

    def __init__(self, tokens_B: torch.Tensor, logprobs_B: torch.Tensor) -> None:
        self.tokens_B = tokens_B
        both = torch.stack([tokens_B.double(), logprobs_B.double()])
        if both.is_cuda:  # pinned and asynchronous: the host waits only in `result`
            self._host = torch.empty(both.shape, dtype=both.dtype, pin_memory=True)
            self._host.copy_(both, non_blocking=True)
            self._copied: torch.cuda.Event | None = torch.cuda.Event()
            self._copied.record()
        else:
            self._host, self._copied = both, None

    def result(self) -> tuple[list[int], list[float]]:
        """The tokens and logprobs on the host (waits for the copy)."""
        if self._copied is not None:
            self._copied.synchronize()
        return [int(t) for t in self._host[0].tolist()], self._host[1].tolist()


def sample_rows(logits_BV: torch.Tensor, rows: list[RowSampling]) -> tuple[list[int], list[float]]:
    """`draw_rows`, read on the host."""
    return draw_rows(logits_BV, rows).result()


def draw_rows(logits_BV: torch.Tensor, rows: list[RowSampling]) -> SampledRows:
    """Every row's next token and its logprob under the model's own (unfiltered, T = 1)
    distribution, computed where the logits are; only 2·B numbers reach the host.

    Greedy rows take the argmax. The others draw by the Gumbel-max trick: argmax of the
    temperature-scaled, top-k/top-p-filtered logits plus Gumbel noise, the noise a fixed
    function of (seed, counter, token id) (`gumbel_noise`). So a seeded request draws the
    same tokens whatever else shares its batch, on any node, after a preemption, and in the
    single-process reference."""
    logits_BV = logits_BV.float()
    V = logits_BV.shape[1]
    token_B = logits_BV.argmax(-1)
    drawn = [i for i, r in enumerate(rows) if r.params.temperature > 0]
    if drawn:
        device = logits_BV.device
        picked = [rows[i] for i in drawn]
        # every per-row number in two host-to-device copies
        ints = torch.tensor(
            [
                drawn,
                [r.params.top_k for r in picked],
                [noise_key(r.seed, r.counter) for r in picked],
            ]
        )
        floats = torch.tensor(
            [[r.params.temperature for r in picked], [r.params.top_p for r in picked]]
        )
        if device.type == "cuda":  # pinned and asynchronous: no wait for the step's kernels
            ints, floats = ints.pin_memory(), floats.pin_memory()
        index, top_k, keys = ints.to(device, non_blocking=True)
        temperature, top_p = floats.to(device, non_blocking=True)
        scaled = logits_BV[index] / temperature[:, None]
        rules = _Rules(
            top_k, top_p, max(r.params.top_k for r in picked), min(r.params.top_p for r in picked)
        )
        if all(0 < r.params.top_k < V for r in picked):  # only the k best can be drawn
            values, ids = _top_k_top_p(scaled, rules)
            noise = gumbel_noise(keys, ids)
            token_B[index] = ids.gather(1, (values + noise).argmax(-1, keepdim=True))[:, 0]
        else:
            vocab = torch.arange(V, device=device)[None, :]
            token_B[index] = (_filtered(scaled, rules) + gumbel_noise(keys, vocab)).argmax(-1)
    logprob_B = logits_BV.gather(1, token_B[:, None])[:, 0] - torch.logsumexp(logits_BV, -1)
    return SampledRows(token_B, logprob_B)


@dataclass(frozen=True, slots=True)
class _Rules:
    """The drawn rows' filters on the device, and their extremes on the host."""

    top_k_B: torch.Tensor  # 0: no top-k
    top_p_B: torch.Tensor
    most_k: int
    least_p: float


def _top_k_top_p(scaled_BV: torch.Tensor, rules: _Rules) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidates of rows that all set top-k: the k best (values, ids) [B, k_max] by
    falling value, the ones past a row's k or outside its top-p set at -inf. The same
    candidates `_filtered` leaves, without sorting the vocabulary."""
    values, ids = torch.topk(scaled_BV, rules.most_k, dim=-1)
    past_k = torch.arange(rules.most_k, device=scaled_BV.device) >= rules.top_k_B[:, None]
    values = values.masked_fill(past_k, float("-inf"))
    if rules.least_p < 1.0:
        probs = torch.softmax(values, dim=-1)
        values = values.masked_fill(
            probs.cumsum(-1) - probs >= rules.top_p_B[:, None], float("-inf")
        )
    return values, ids


def _filtered(scaled_BV: torch.Tensor, rules: _Rules) -> torch.Tensor:
    """Top-k, then top-p (the smallest set of most likely tokens whose probability reaches
    p, the token crossing p included) per row; filtered tokens get -inf."""
    V = scaled_BV.shape[1]
    if rules.most_k > 0:
        k = torch.where((rules.top_k_B > 0) & (rules.top_k_B < V), rules.top_k_B, V)
        values = torch.topk(scaled_BV, min(rules.most_k, V), dim=-1).values
        values = torch.cat([values, values.new_full((values.shape[0], 1), float("-inf"))], 1)
        kth = values.gather(1, torch.clamp(k - 1, max=values.shape[1] - 1)[:, None])
        kth = torch.where(k[:, None] < V, kth, float("-inf"))  # rows without top-k keep all
        scaled_BV = scaled_BV.masked_fill(scaled_BV < kth, float("-inf"))
    if rules.least_p < 1.0:
        sorted_BV, order = torch.sort(scaled_BV, descending=True, dim=-1)
        probs = torch.softmax(sorted_BV, dim=-1)
        drop = probs.cumsum(-1) - probs >= rules.top_p_B[:, None]
        scaled_BV = scaled_BV.scatter(1, order, sorted_BV.masked_fill(drop, float("-inf")))
    return scaled_BV


_MASK32 = 0xFFFFFFFF


def _mix32(x: T) -> T:
    """A bijection of 32-bit values (xor-shift-multiply rounds), on Python ints or on int64
    tensors; multipliers below 2**31 keep every product inside int64, so CPU and GPU agree
    bit for bit."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _MASK32
    return x ^ (x >> 16)


def noise_key(seed: int, counter: int) -> int:
    """The 32-bit key of a request's draw number `counter` (its tokens so far)."""
    return _mix32((seed & _MASK32) ^ _mix32(((seed >> 32) ^ _mix32(counter & _MASK32)) & _MASK32))


def gumbel_noise(keys_B: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise for each row's `token_ids` ([B, N], or [1, N] for every row), a
    fixed function of the row's key (`noise_key`) and the token id: a hash to 24 uniform
    bits, then -log(-log(u))."""
    row = keys_B.long()[:, None]
    bits = _mix32(_mix32(row ^ token_ids.long()) ^ row)
    u = ((bits >> 8).float() + 0.5) / float(1 << 24)
    return -torch.log(-torch.log(u))
