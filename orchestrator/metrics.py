"""Prometheus metrics under the names users know from other engines, prefixed `afd:`.

Request-level series (TTFT, TPOT, end-to-end latency, token counters) are fed by the serving
layer; cluster-level ones (KV usage, tokens per expert, busy fraction, transport) by the
engine's step records. One registry per server, so tests can run several in one process.
"""

from __future__ import annotations

from collections.abc import Sequence

from afd.orchestrator.cluster import StepRecord
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_RTT_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 0.01, 0.05, 0.25, 1)


class Metrics:
    def __init__(self, model_name: str, moe_layers: Sequence[int] = ()) -> None:
        self.registry = CollectorRegistry()
        self._moe_layers = tuple(moe_layers)  # the layer label of the imbalance gauge
        r, label = self.registry, {"model_name": model_name}
        self._label = label
        self.running = Gauge(
            "afd:num_requests_running", "Requests admitted and unfinished.", list(label), registry=r
        ).labels(**label)
        self._waiting: dict[int, int] = {}  # attention node -> its latest waiting count
        self.waiting = Gauge(
            "afd:num_requests_waiting",
            "Requests queued on attention nodes, not yet in a batch.",
            list(label),
            registry=r,
        ).labels(**label)
        self.ttft = Histogram(
            "afd:time_to_first_token_seconds",
            "Time from admission to the first token.",
            list(label),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        ).labels(**label)
        self.tpot = Histogram(
            "afd:time_per_output_token_seconds",
            "Time between consecutive tokens of a request.",
            list(label),
            buckets=_TOKEN_BUCKETS,
            registry=r,
        ).labels(**label)
        self.e2e = Histogram(
            "afd:e2e_request_latency_seconds",
            "Time from admission to the last token.",
            list(label),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        ).labels(**label)
        self.prompt_tokens = Counter(
            "afd:prompt_tokens", "Prompt tokens of finished requests.", list(label), registry=r
        ).labels(**label)
        self.generation_tokens = Counter(
            "afd:generation_tokens", "Tokens generated.", list(label), registry=r
        ).labels(**label)
        self.success = Counter(
            "afd:request_success",
            "Requests finished, by reason.",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self.failure = Counter(
            "afd:request_failure",
            "Requests that ended with an error, by status.",
            ["model_name", "status"],
            registry=r,
        )
        self.kv_usage = Gauge(
            "afd:kv_cache_usage_perc",
            "Fraction of KV blocks in use, per attention node.",
            ["model_name", "node"],
            registry=r,
        )
        self.expert_tokens = Counter(
            "afd:expert_tokens",
            "Tokens routed to each expert (all MoE layers).",
            ["model_name", "expert"],
            registry=r,
        )
        self.expert_node_tokens = Counter(
            "afd:expert_node_tokens",
            "Tokens routed to each expert node (all MoE layers).",
            ["model_name", "node"],
            registry=r,
        )
        self.imbalance = Gauge(
            "afd:expert_node_load_imbalance",
            "Per MoE layer, max/mean of the expert nodes' tokens over the load window.",
            ["model_name", "layer"],
            registry=r,
        )
        self.busy = Gauge(
            "afd:node_busy_fraction",
            "Share of the last step each node spent computing.",
            ["model_name", "node"],
            registry=r,
        )
        self.transport_bytes = Counter(
            "afd:transport_bytes",
            "Bytes moved by each node's transport, both ways.",
            ["model_name", "node"],
            registry=r,
        )
        self.round_trip = Histogram(
            "afd:transport_round_trip_seconds",
            "Dispatch-to-combine time of one (layer, micro-batch) round, mean per step.",
            list(label),
            buckets=_RTT_BUCKETS,
            registry=r,
        ).labels(**label)
        self.rebalances = Counter(
            "afd:expert_rebalances",
            "Live rebalances carried out: the expert placement moved.",
            list(label),
            registry=r,
        ).labels(**label)
        self._rebalances_seen = 0
        self.steps = Counter(
            "afd:engine_steps", "Engine steps run.", list(label), registry=r
        ).labels(**label)
        self._transport_seen: dict[str, int] = {}

    def finished(self, reason: str) -> None:
        self.success.labels(finished_reason=reason, **self._label).inc()

    def failed(self, status: str) -> None:
        self.failure.labels(status=status, **self._label).inc()

    def observe_step(self, record: StepRecord, total_kv_blocks: int) -> None:
        """Folds one engine step into the cluster-level series."""
        self.steps.inc()
        for i, a in enumerate(record.attention):  # a colocated node's record holds it alone
            if a is not None:
                self._waiting[i] = a.waiting
        self.waiting.set(sum(self._waiting.values()))
        for i, a in enumerate(record.attention):
            if a is None:
                continue
            node = f"attention-{i}"
            self.kv_usage.labels(node=node, **self._label).set(
                1 - a.free_kv_blocks / total_kv_blocks
            )
            if a.timings.total_s > 0:
                self.busy.labels(node=node, **self._label).set(
                    a.timings.attention_s / a.timings.total_s
                )
            if a.timings.rounds:
                self.round_trip.observe(a.timings.round_trip_s / a.timings.rounds)
            self._transport(node, a.transport_bytes)
        if record.rebalances > self._rebalances_seen:
            self.rebalances.inc(record.rebalances - self._rebalances_seen)
            self._rebalances_seen = record.rebalances
        for i, value in enumerate(record.load_imbalance):
            self.imbalance.labels(layer=str(self._moe_layers[i]), **self._label).set(value)
        for j, e in enumerate(record.experts):
            node = f"expert-{j}"
            for expert, tokens in e.tokens_per_expert.items():
                if tokens:
                    self.expert_tokens.labels(expert=str(expert), **self._label).inc(tokens)
            self.expert_node_tokens.labels(node=node, **self._label).inc(
                sum(e.tokens_per_expert.values())
            )
            if e.total_s > 0:
                self.busy.labels(node=node, **self._label).set(e.compute_s / e.total_s)
            self._transport(node, e.transport_bytes)

    def _transport(self, node: str, total_bytes: int) -> None:
        seen = self._transport_seen.get(node, 0)
        if total_bytes > seen:  # a restarted node starts again from zero
            self.transport_bytes.labels(node=node, **self._label).inc(total_bytes - seen)
        self._transport_seen[node] = total_bytes

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
