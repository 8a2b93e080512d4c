"""The reference engine: the whole model in one process, one request at a time. Slow, simple
and exact; the oracle every distributed and GPU configuration is checked against.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from afd.models.attention import ContiguousAttention, ContiguousKVCache
from afd.models.batch import TokenBatch
from afd.models.checkpoint import open_checkpoint
from afd.models.config import DTYPES, load_config
from afd.models.messages import FinishReason, TokenOutput
from afd.models.model import AttentionSideModel
from afd.models.moe import ExpertShard, LocalDispatcher
from afd.models.request_state import RequestState, check_prompt
from afd.models.sampling import SamplingParams, sample_rows
from afd.models.tokenizer import Tokenizer


@dataclass
class GenerationResult:
    """A whole request's output, gathered from its tokens."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None

    def add(self, token: TokenOutput) -> None:
        self.token_ids.append(token.token_id)
        self.logprobs.append(token.logprob)
        self.text += token.text_delta
        self.finish_reason = token.finish_reason

    def as_json(self) -> dict:
        return {
            "token_ids": self.token_ids,
            "logprobs": self.logprobs,
            "text": self.text,
            "finish_reason": self.finish_reason,
        }


class ReferenceEngine:
    """The whole model in one process, one request at a time: slow, simple and exact."""

    def __init__(
        self,
        model_dir: str | Path,
        dtype: str = "float32",
        load_format: str = "auto",
        quantization: str = "none",
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.config = load_config(model_dir)
        checkpoint = open_checkpoint(model_dir, load_format)
        checkpoint.check_names(self.config)
        self.model = AttentionSideModel.load(checkpoint, self.config, DTYPES[dtype], quantization)
        shard = ExpertShard.load(
            checkpoint, self.config, range(self.config.num_experts), DTYPES[dtype], quantization
        )
        self.dispatcher = LocalDispatcher(shard)
        self.tokenizer = Tokenizer(model_dir)

    @torch.inference_mode()
    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[TokenOutput]:
        check_prompt(prompt_ids, params, self.config)
        state = RequestState("", prompt_ids, params, self.tokenizer, self.config)
        cache = ContiguousKVCache()
        batch = TokenBatch.build([(0, prompt_ids, 0)])
        while True:
            logits_BV = self.model.forward(
                batch, ContiguousAttention(cache, batch), self.dispatcher
            )
            tokens, logprobs = sample_rows(logits_BV, [state.sampling()])
            event = state.record(tokens[0], logprobs[0])
            yield event
            if state.finished:
                return
            batch = TokenBatch.build([(0, [event.token_id], len(state.all_ids) - 1)])

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> GenerationResult:
        result = GenerationResult()
        for token in self.stream(prompt_ids, params):
            result.add(token)
        return result
