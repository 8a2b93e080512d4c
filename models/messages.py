"""The records that cross process boundaries: a request handed to an attention node, a token
coming back, and what each node reports about a step.

They live in `models/` because it is the floor every other package imports; nothing here holds
behaviour. All are frozen dataclasses: built once, then only read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from afd.models.sampling import SamplingParams

FinishReason = Literal["length", "stop"]


@dataclass(frozen=True, slots=True)
class TraceSpan:
    """A span of a traced step on one node (`afd.models.step_trace`)."""

    name: str  # what ran: "attention", "combine" (attention nodes), "wait", "experts"
    layer: int
    micro_batch: int
    start_ns: int  # host clock (time.time_ns)
    end_ns: int


@dataclass(frozen=True, slots=True)
class NewRequest:
    """A request the orchestrator hands to one attention node (sent once; later steps refer to
    it by id)."""

    request_id: str  # unique in the cluster; tokens and aborts name it
    prompt_ids: list[int]  # the prompt, tokenized; already checked against the model
    params: SamplingParams  # how to sample and when to stop


@dataclass(frozen=True, slots=True)
class TokenOutput:
    """One sampled token of one request, as every engine (reference or cluster) yields it."""

    request_id: str  # the request it belongs to ("" in the single-request reference engine)
    token_id: int  # the sampled token
    logprob: float  # its log-probability under the unfiltered, temperature-1 distribution
    text_delta: str  # the text it adds (stop strings already cut away)
    finish_reason: FinishReason | None = None  # set on the request's last token only


@dataclass(frozen=True, slots=True)
class StepTimings:
    """Where an attention node's step went (seconds, except `rounds`)."""

    total_s: float = 0.0  # the whole pipeline run
    attention_s: float = 0.0  # everything computed on this node
    expert_wait_s: float = 0.0  # blocked waiting for expert nodes' answers
    rounds: int = 0  # (layer, micro-batch) exchanges with the expert pool
    round_trip_s: float = 0.0  # dispatch sent to combine done, summed over the rounds


@dataclass(frozen=True, slots=True)
class AttentionStepResult:
    """What an attention node reports after a step."""

    outputs: list[TokenOutput]  # one per sequence that sampled this step
    timings: StepTimings
    tokens: int  # tokens computed this step (prefill + decode)
    running: int  # sequences holding KV blocks after the step
    waiting: int  # sequences admitted but not yet scheduled
    free_kv_blocks: int  # KV blocks on the node's free list
    transport_bytes: int  # sent and received since the node started
    trace: tuple[TraceSpan, ...] = ()  # a traced step's spans (`trace_steps`)


@dataclass(frozen=True, slots=True)
class ExpertStepResult:
    """What an expert node reports after a step."""

    tokens_per_expert: dict[int, int]  # global expert id -> tokens routed to it this step
    compute_s: float  # running the experts
    wait_s: float  # blocked waiting for attention nodes' frames
    total_s: float  # the whole step
    transport_bytes: int  # sent and received since the node started
    # tokens per (MoE layer, local expert) this step: rows in the model's MoE-layer order,
    # columns in the node's expert order; failover frames served count too
    layer_tokens: tuple[tuple[int, ...], ...] = ()
    trace: tuple[TraceSpan, ...] = ()  # a traced step's spans (`trace_steps`)
