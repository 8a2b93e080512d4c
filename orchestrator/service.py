"""What both front ends (gRPC and OpenAI HTTP) share: request checking, admission, streaming
from the engine thread into asyncio, cancellation, draining, and request metrics.

Every check names the field and the allowed range, so that each front end only maps the
exception types onto its own status codes.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

from afd.models.messages import TokenOutput
from afd.models.sampling import SamplingError, SamplingParams
from afd.models.tokenizer import Tokenizer
from afd.orchestrator.cluster import Cluster, RequestFailed, StepRecord
from afd.orchestrator.config import Deployment
from afd.orchestrator.metrics import Metrics


class InvalidRequest(ValueError):
    """A client error; `field` is the canonical name of the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message


class Overloaded(RuntimeError):
    """The cluster holds as many requests as it admits; retry later."""


class Unavailable(RuntimeError):
    """The server is draining or the cluster failed the request."""


@dataclass(frozen=True, slots=True)
class Prompt:
    ids: list[int]
    params: SamplingParams


@dataclass(frozen=True, slots=True)
class Finished:
    """The usage that goes with a request's last token."""

    prompt_tokens: int
    completion_tokens: int


class _AsyncSink:
    """Hands the engine thread's items to one request's asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[TokenOutput | Exception] = asyncio.Queue()

    def put(self, item: TokenOutput | Exception) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class Service:
    def __init__(self, cluster: Cluster, deployment: Deployment, tokenizer: Tokenizer) -> None:
        self.cluster = cluster
        self.deployment = deployment
        self.tokenizer = tokenizer
        self.config = cluster.config
        self.model_name = deployment.serve.model_name or _dir_name(deployment.model.path)
        self.metrics = Metrics(self.model_name, self.config.moe_layers)
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._ids = itertools.count()
        cluster.step_hooks.append(self._on_step)

    # ---- checking ------------------------------------------------------------------------
    def parse(
        self,
        *,
        text: str | None = None,
        ids: Sequence[int] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        logprobs: bool = False,
    ) -> Prompt:
        """Turns a client's fields into a prompt and sampling parameters, or names what's wrong."""
        vocab, context = self.config.vocab_size, self.config.max_position_embeddings
        limit = self.deployment.serve.max_prompt_chars
        if (text is None) == (ids is None):
            raise InvalidRequest("prompt", "give exactly one of prompt text or prompt token ids")
        if text is not None:
            if not text:
                raise InvalidRequest("prompt", "is empty")
            if len(text) > limit:
                raise InvalidRequest("prompt", f"has {len(text)} characters, at most {limit}")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise InvalidRequest("prompt", f"is not valid Unicode ({err.reason})") from err
            ids = self.tokenizer.encode(text)
            if not ids:
                raise InvalidRequest("prompt", "encodes to no tokens")
        ids = list(ids or ())
        if not ids:
            raise InvalidRequest("prompt", "is empty: give at least one token id")
        for t in ids:
            if not 0 <= t < vocab:
                raise InvalidRequest(
                    "prompt", f"token id {t} is outside the vocabulary [0, {vocab})"
                )
        if len(ids) >= context:
            raise InvalidRequest(
                "prompt", f"has {len(ids)} tokens; the model's context is {context} tokens"
            )
        a = self.deployment.attention
        kv_tokens = a.kv_blocks * a.block_size  # a sequence must fit one node's whole cache
        if len(ids) >= kv_tokens:
            raise InvalidRequest(
                "prompt", f"has {len(ids)} tokens; an attention node's KV cache holds {kv_tokens}"
            )
        room = min(context, kv_tokens) - len(ids)
        max_tokens = 16 if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= room:
            raise InvalidRequest(
                "max_tokens", f"is {max_tokens}; must be in [1, {room}] for this prompt"
            )
        for t in stop_token_ids:
            if not 0 <= t < vocab:
                raise InvalidRequest(
                    "stop_token_ids", f"token id {t} is outside the vocabulary [0, {vocab})"
                )
        try:
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=0.0 if temperature is None else temperature,
                top_p=1.0 if top_p is None else top_p,
                top_k=0 if top_k is None else top_k,
                seed=seed,
                stop=tuple(stop),
                stop_token_ids=tuple(stop_token_ids),
                ignore_eos=ignore_eos,
                logprobs=logprobs,
            )
        except SamplingError as err:
            raise InvalidRequest(err.field, err.detail) from err
        return Prompt(ids, params)

    # ---- serving -------------------------------------------------------------------------
    async def stream(self, prompt: Prompt) -> AsyncGenerator[TokenOutput | Finished, None]:
        """Yields the request's tokens, then its usage; abandoning the iterator aborts it."""
        if self.draining:
            raise Unavailable("the server is shutting down and admits no new requests")
        limit = self.deployment.serve.max_requests
        if self.in_flight >= limit:
            self.metrics.failed("RESOURCE_EXHAUSTED")
            raise Overloaded(f"the server holds its limit of {limit} requests; retry later")
        request_id = f"req-{next(self._ids)}"
        sink = _AsyncSink(asyncio.get_running_loop())
        self._admit()
        start = last = time.perf_counter()
        generated, finish_reason = 0, None
        try:
            self.cluster.submit(prompt.ids, prompt.params, request_id, sink=sink)
            timeout = self.deployment.transport.round_timeout_s * 4
            while finish_reason is None:
                try:
                    item = await asyncio.wait_for(sink.queue.get(), timeout)
                except TimeoutError:
                    raise Unavailable(f"request {request_id}: no token within {timeout}s") from None
                if isinstance(item, Exception):
                    raise Unavailable(str(item)) from item
                now = time.perf_counter()
                (self.metrics.ttft if generated == 0 else self.metrics.tpot).observe(now - last)
                last, generated = now, generated + 1
                finish_reason = item.finish_reason
                yield item
            self.metrics.e2e.observe(time.perf_counter() - start)
            self.metrics.prompt_tokens.inc(len(prompt.ids))
            self.metrics.finished(finish_reason)
            yield Finished(len(prompt.ids), generated)
        except (RequestFailed, Unavailable):
            self.metrics.failed("UNAVAILABLE")
            raise
        finally:
            self.metrics.generation_tokens.inc(generated)
            if finish_reason is None:
                self.cluster.abort(request_id)  # cancelled, timed out or failed: free its blocks
            self._release()

    async def drain(self) -> bool:
        """Stops admitting and waits for running requests to finish; False on timeout."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), self.deployment.serve.drain_timeout_s)
        except TimeoutError:
            return False
        return True

    def _admit(self) -> None:
        self.in_flight += 1
        self._idle.clear()
        self.metrics.running.set(self.in_flight)

    def _release(self) -> None:
        self.in_flight -= 1
        self.metrics.running.set(self.in_flight)
        if self.in_flight == 0:
            self._idle.set()

    def close(self) -> None:
        self.cluster.step_hooks.remove(self._on_step)

    def _on_step(self, record: StepRecord) -> None:
        self.metrics.observe_step(record, self.deployment.attention.kv_blocks)


def _dir_name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1] or path
