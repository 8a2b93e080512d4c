"""Per-request generation state (sampling, detokenization, stop conditions) and the reference
engine: the single-process oracle every distributed configuration is checked against.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from afd.models.batch import TokenBatch
from afd.models.checkpoint import Checkpoint
from afd.models.config import ModelConfig, load_config
from afd.models.kv_cache import ContiguousKVCache
from afd.models.model import AttentionSideModel
from afd.models.moe import ExpertShard, LocalDispatcher
from afd.models.sampling import Sampler, SamplingParams
from afd.models.tokenizer import IncrementalDetokenizer, Tokenizer

FinishReason = Literal["length", "stop"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PromptError(ValueError):
    """A prompt afd cannot run; the message says what is wrong with it."""


@dataclass(frozen=True, slots=True)
class TokenEvent:
    token_id: int
    logprob: float
    text_delta: str
    finish_reason: FinishReason | None = None


@dataclass
class GenerationResult:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None

    def add(self, event: TokenEvent | Any) -> None:
        """Takes any event with token_id, logprob, text_delta and finish_reason."""
        self.token_ids.append(event.token_id)
        self.logprobs.append(event.logprob)
        self.text += event.text_delta
        self.finish_reason = event.finish_reason

    def as_json(self) -> dict:
        return {
            "token_ids": self.token_ids,
            "logprobs": self.logprobs,
            "text": self.text,
            "finish_reason": self.finish_reason,
        }


def check_prompt(prompt_ids: list[int], params: SamplingParams, config: ModelConfig) -> None:
    if not prompt_ids:
        raise PromptError("prompt is empty: give at least one token")
    bad = [t for t in prompt_ids if not 0 <= t < config.vocab_size]
    if bad:
        raise PromptError(
            f"prompt token id {bad[0]} is outside the vocabulary [0, {config.vocab_size})"
        )
    limit = config.max_position_embeddings
    if len(prompt_ids) >= limit:
        raise PromptError(f"prompt has {len(prompt_ids)} tokens; the model's context is {limit}")


class RequestState:
    """Everything about one request that lives between steps: sampler, output, stop checks."""

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        tokenizer: Tokenizer,
        config: ModelConfig,
    ):
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.sampler = Sampler(params)
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.output_ids: list[int] = []
        self.stop_ids = set(params.stop_token_ids) | (
            set() if params.ignore_eos else set(config.eos_token_ids)
        )
        self.context_limit = config.max_position_embeddings
        self.finished = False

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def accept(self, logits_V: torch.Tensor) -> TokenEvent:
        token, logprob = self.sampler.sample(logits_V)
        self.output_ids.append(token)
        delta = self.detokenizer.push(token)
        finish: FinishReason | None = None
        if token in self.stop_ids:
            finish = "stop"
        elif (cut := self._stop_string_cut(delta)) is not None:
            delta, finish = delta[:cut], "stop"
        elif (
            len(self.output_ids) >= self.params.max_tokens
            or len(self.all_ids) >= self.context_limit
        ):
            finish = "length"
        self.finished = finish is not None
        return TokenEvent(token, logprob, delta, finish)

    def _stop_string_cut(self, delta: str) -> int | None:
        """Where in `delta` the text must end if a stop string just completed, else None."""
        if not self.params.stop or not delta:
            return None
        text = self.detokenizer.text
        before = len(text) - len(delta)
        window = max(len(s) for s in self.params.stop)
        hits = [
            i for s in self.params.stop if (i := text.find(s, max(0, before - window + 1))) >= 0
        ]
        if not hits:
            return None
        self.detokenizer.text = text[: min(hits)]
        return max(0, min(hits) - before)


class ReferenceEngine:
    """The whole model in one process, one request at a time: slow, simple and exact."""

    def __init__(self, model_dir: str | Path, dtype: str = "float32") -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.config = load_config(model_dir)
        checkpoint = Checkpoint(model_dir)
        checkpoint.check_names(self.config)
        self.model = AttentionSideModel.load(checkpoint, self.config, DTYPES[dtype])
        shard = ExpertShard.load(
            checkpoint, self.config, range(self.config.num_experts), DTYPES[dtype]
        )
        self.dispatcher = LocalDispatcher(shard)
        self.tokenizer = Tokenizer(model_dir)

    @torch.inference_mode()
    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[TokenEvent]:
        check_prompt(prompt_ids, params, self.config)
        state = RequestState(prompt_ids, params, self.tokenizer, self.config)
        cache = ContiguousKVCache()
        batch = TokenBatch.build([(0, prompt_ids, 0)])
        while True:
            logits_BV = self.model.forward(batch, cache, self.dispatcher)
            event = state.accept(logits_BV[0])
            yield event
            if state.finished:
                return
            batch = TokenBatch.build([(0, [event.token_id], len(state.all_ids) - 1)])

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> GenerationResult:
        result = GenerationResult()
        for event in self.stream(prompt_ids, params):
            result.add(event)
        return result
