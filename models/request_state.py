"""The state of one request between steps: its sampling seed, its detokenizer and its stop rules,
and the checks a prompt passes before it runs. Shared by the reference engine and the
attention nodes, so both sample and stop the same way.
"""

from __future__ import annotations

import secrets

from afd.models.config import ModelConfig
from afd.models.messages import FinishReason, TokenOutput
from afd.models.sampling import RowSampling, SamplingParams
from afd.models.tokenizer import IncrementalDetokenizer, Tokenizer


class PromptError(ValueError):
    """A prompt afd cannot run; the message says what is wrong with it."""


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
    """Everything about one request that lives between steps: seed, output, stop checks."""

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        tokenizer: Tokenizer,
        config: ModelConfig,
    ):
        self.request_id = request_id
        self.prompt_ids = list(prompt_ids)
        self.params = params
        # a request without a seed still draws from one seed throughout (recomputation after
        # a preemption repeats its tokens)
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
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

    def sampling(self) -> RowSampling:
        """What `sample_rows` needs to draw this request's next token."""
        return RowSampling(self.params, self.seed, len(self.output_ids))

    def record(self, token: int, logprob: float) -> TokenOutput:
        """Takes the sampled token (rows are sampled together, by `sample_rows`)."""
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
        return TokenOutput(self.request_id, token, logprob, delta, finish)

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
