"""Sampling parameters (validated where requests come in) and the per-request sampler.

Each request owns a seeded `torch.Generator`, so a request samples the same tokens whether it
runs alone in the reference or batched on any attention node.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class SamplingError(ValueError):
    """A sampling parameter outside its allowed range; the message names it."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k filter
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = True

    def __post_init__(self) -> None:
        checks = [
            ("max_tokens", self.max_tokens >= 1, ">= 1", self.max_tokens),
            ("temperature", self.temperature >= 0, ">= 0", self.temperature),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]", self.top_p),
            ("top_k", self.top_k >= 0, ">= 0 (0 disables it)", self.top_k),
        ]
        for name, ok, allowed, value in checks:
            if not ok:
                raise SamplingError(f"{name} must be {allowed}, got {value}")
        if any(s == "" for s in self.stop):
            raise SamplingError("stop strings must be non-empty")


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
