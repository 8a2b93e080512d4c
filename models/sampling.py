"""Sampling parameters (validated where requests come in) and the per-request sampler.

Each request owns a seeded `torch.Generator`, so a request samples the same tokens whether it
runs alone in the reference or batched on any attention node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

MAX_TEMPERATURE = 100.0
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


def greedy_tokens(logits_BV: torch.Tensor) -> tuple[list[int], list[float]]:
    """Every row's argmax and its logprob, computed where the logits are; only 2·B numbers
    reach the host (a [B, V] copy and a host softmax per row cost milliseconds at B = 64)."""
    logits_BV = logits_BV.float()
    token_B = logits_BV.argmax(-1)
    logprob_B = logits_BV.gather(1, token_B[:, None])[:, 0] - torch.logsumexp(logits_BV, -1)
    host = torch.stack([token_B.double(), logprob_B.double()]).cpu()
    return [int(t) for t in host[0].tolist()], host[1].tolist()


@dataclass
class Sampler:
    params: SamplingParams
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator()
        if self.params.seed is not None:
            self.generator.manual_seed(self.params.seed)
        else:
            self.generator.seed()

    def sample(self, logits_V: torch.Tensor) -> tuple[int, float]:
        """Next token and its logprob under the model's own (unfiltered, T=1) distribution."""
        logits_V = logits_V.float().cpu()
        logprobs_V = torch.log_softmax(logits_V, dim=-1)
        p = self.params
        if p.temperature == 0:
            token = int(torch.argmax(logits_V))
        else:
            token = self._draw(logits_V / p.temperature)
        return token, float(logprobs_V[token])

    def _draw(self, scaled_V: torch.Tensor) -> int:
        p = self.params
        if 0 < p.top_k < scaled_V.shape[0]:
            kth = torch.topk(scaled_V, p.top_k).values[-1]
            scaled_V = scaled_V.masked_fill(scaled_V < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_V, order = torch.sort(scaled_V, descending=True)
            cumulative = torch.softmax(sorted_V, dim=-1).cumsum(-1)
            drop = (
                cumulative - torch.softmax(sorted_V, dim=-1) >= p.top_p
            )  # keep the token crossing p
            scaled_V = scaled_V.scatter(0, order, sorted_V.masked_fill(drop, float("-inf")))
        probs_V = torch.softmax(scaled_V, dim=-1)
        return int(torch.multinomial(probs_V, 1, generator=self.generator))
