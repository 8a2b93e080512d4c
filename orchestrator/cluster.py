"""Places both pools on Ray, wires the transport, routes requests and streams their tokens.

Every node steps on a loop of its own (`afd.models.step_loop`); the orchestrator is in no step.
New requests go to the least-loaded attention node; the tokens its steps sampled come back in
batches, whenever the orchestrator polls, and are pushed to each request's stream. Colocated
nodes step alone, one driver thread each. With expert nodes, the nodes keep in lockstep through
the exchange's control round (`afd.transport.step_control`) and one engine thread feeds and
polls them all; it stops the cluster at a common step only when something must happen between
two steps (an expert node rejoining, a placement switch, a trace to arm), and recovers the
cluster when a step failed: every node stops, dead ones are restarted and rewired, all go on
from one step, and a dead attention node's requests re-prefill elsewhere.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Protocol, TypeVar, overload

import ray
from afd.attention_nodes.node import AttentionNode
from afd.expert_nodes.node import ExpertNode
from afd.models.config import load_config
from afd.models.messages import (
    AttentionStepResult,
    ExpertStepResult,
    NewRequest,
    TokenOutput,
    TraceSpan,
)
from afd.models.request_state import check_prompt
from afd.models.sampling import SamplingParams
from afd.models.step_loop import LoopState
from afd.models.step_trace import chrome_trace
from afd.orchestrator.config import Deployment
from afd.orchestrator.expert_load import ExpertLoadWindow, LayerLoad
from afd.orchestrator.local_ray import connect_ray
from afd.orchestrator.node_settings import (
    EXPERT_PEER_BASE,
    attention_node_settings,
    expert_node_settings,
    expert_placement,
)
from afd.orchestrator.pool_placement import (
    PoolDemand,
    check_fits,
    in_group,
    remove_placement_group,
    reserve,
)
from afd.orchestrator.rebalancer import RebalancePlan, Rebalancer
from afd.transport.endpoint import PeerAddress
from afd.transport.lanes import SLOT_LANES
from ray._private.state import state as ray_state

log = logging.getLogger(__name__)


class RequestFailed(RuntimeError):
    """The cluster could not finish a request; the message says why."""


@dataclass(frozen=True, slots=True)
class StepRecord:
    step: int
    wall_s: float  # the whole step as the orchestrator saw it, Ray calls included
    attention: list[AttentionStepResult | None]  # None: a colocated node that did not step
    experts: list[ExpertStepResult]
    load_imbalance: tuple[float, ...] = ()  # per MoE layer, over the load window (expert nodes)
    rebalances: int = 0  # live rebalances carried out so far


POLL_S = 0.05  # how long a poll of a busy attention node waits for its next step's results
# with no request left, polls until the loops park wait this little: the thread that polls is
# the one that hands over the next request, which must not sit behind a long poll
SETTLE_POLL_S = 0.005


class _NodesFailed(Exception):
    """Nodes failed (an error, a dead actor, no answer), by (kind, index)."""

    def __init__(self, errors: dict) -> None:
        super().__init__(_describe(errors))
        self.errors = errors


def _describe(errors: dict) -> str:
    return ", ".join(f"{k}-{i}: {type(e).__name__}: {e}" for (k, i), e in sorted(errors.items()))


@dataclass
class _StepResults:
    """One step's results as they come in, by node index."""

    attention: dict[int, AttentionStepResult] = field(default_factory=dict)
    experts: dict[int, ExpertStepResult] = field(default_factory=dict)


class _TraceCollector:
    """The spans of a `Cluster.trace` as the nodes' results bring them, until every node has
    reported `steps` traced steps."""

    def __init__(self, steps: int, names: list[str]) -> None:
        self.steps = steps
        self.armed = False  # the nodes were told
        self.nodes: dict[str, list[tuple[int, list[TraceSpan]]]] = {n: [] for n in names}
        self.done = threading.Event()

    def expect(self, names: list[str]) -> None:
        """Only these nodes will trace (the others are down)."""
        self.nodes = {n: self.nodes.get(n, []) for n in names}

    def add(self, node: str, step: int, spans: Sequence[TraceSpan]) -> None:
        if spans and node in self.nodes and len(self.nodes[node]) < self.steps:
            self.nodes[node].append((step, list(spans)))
        if all(len(v) >= self.steps for v in self.nodes.values()):
            self.done.set()


class TokenSink(Protocol):
    """Where the engine thread puts a request's tokens (and a final exception on failure)."""

    def put(self, item: TokenOutput | Exception) -> None: ...


@dataclass(frozen=True, slots=True)
class NodeState:
    name: str
    pool: str  # "attention" or "expert"
    healthy: bool
    running: int = 0
    waiting: int = 0
    free_kv_blocks: int = 0
    total_kv_blocks: int = 0
    expert_ids: tuple[int, ...] = ()
    tokens: int = 0  # computed (attention) or routed to the node (expert), all time
    # expert nodes: per MoE layer over the load window, (layer, expert ids, their tokens)
    layer_tokens: list[tuple[int, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ClusterState:
    nodes: list[NodeState]
    queued: int  # submitted, not yet handed to a node
    steps: int
    expert_tokens: dict[int, int]  # global expert id -> tokens routed to it, all time
    failed_steps: int = 0  # rounds abandoned because a node died or stalled
    expert_failovers: int = 0  # expert node deaths absorbed by replicas, without a failed round
    layer_loads: list[LayerLoad] = field(default_factory=list)  # over the load window
    load_window_steps: int = 0
    expert_rebalances: int = 0  # live rebalances carried out (the placement moved)


Sink = TypeVar("Sink", bound=TokenSink)


class RequestStream:
    """The tokens of one request, in order, as the engine produces them."""

    def __init__(self, request_id: str, timeout_s: float) -> None:
        self.request_id = request_id
        self._queue: queue.Queue[TokenOutput | Exception] = queue.Queue()
        self._timeout_s = timeout_s

    def put(self, item: TokenOutput | Exception) -> None:
        self._queue.put(item)

    def __iter__(self) -> Iterator[TokenOutput]:
        while True:
            try:
                item = self._queue.get(timeout=self._timeout_s)
            except queue.Empty:
                raise RequestFailed(
                    f"request {self.request_id}: no token within {self._timeout_s}s"
                ) from None
            if isinstance(item, Exception):
                raise item
            yield item
            if item.finish_reason is not None:
                return


def _await_restarts(nodes: dict, deadline: float) -> dict:
    """Each node's process id, once every node answers (a restarting actor refuses calls until
    its __init__, weight loading included, has run again)."""
    pids = {}
    for key, node in nodes.items():
        while True:
            try:
                pids[key] = ray.get(
                    node.pid.remote(), timeout=max(0.1, deadline - time.monotonic())
                )
                break
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    return pids


class Cluster:
    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self.config = load_config(deployment.model.path)
        d = deployment
        self.placement = expert_placement(d, self.config)  # None: colocated, no expert nodes
        connect_ray(d.ray.address, d.ray.startup_timeout_s)
        expert_nodes = 0 if self.placement is None else self.placement.num_nodes
        log.info(
            "placing %d expert node(s) and %d attention node(s); each loads its own weights",
            expert_nodes,
            d.attention.nodes,
        )
        self._demands: dict[
            str, PoolDemand
        ] = {}  # experts first: they are placed (and reported) before attention
        if expert_nodes:
            self._demands["experts"] = PoolDemand.of("experts", d.experts, expert_nodes)
        self._demands["attention"] = PoolDemand.of("attention", d.attention, d.attention.nodes)
        check_fits(list(self._demands.values()), ray.nodes())
        self._groups = {
            pool: reserve(demand, d.ray.startup_timeout_s) for pool, demand in self._demands.items()
        }
        self.experts = [self._start_expert(j) for j in range(expert_nodes)]
        self.attention = [self._start_attention(i) for i in range(d.attention.nodes)]
        self._wire()
        self._pids = _await_restarts(self._nodes(), time.monotonic() + d.ray.startup_timeout_s)
        log.info("all nodes loaded and wired")
        self._streams: dict[str, TokenSink] = {}
        # prompt, sampling and tokens streamed so far: what a moved request re-prefills from
        self._requests: dict[str, tuple[list[int], SamplingParams, list[int]]] = {}
        self._node_of: dict[str, int] = {}
        self._load = [0] * len(self.attention)
        self._incoming: list[list[NewRequest]] = [[] for _ in self.attention]
        self._aborts: list[list[str]] = [[] for _ in self.attention]
        self._wake = threading.Condition()
        self._ids = itertools.count()
        self._stopping = False
        self.step_id = 0
        self.history: list[StepRecord] = []
        self.keep_history = False
        self.step_hooks: list[Callable[[StepRecord], None]] = []  # metrics, on the engine thread
        self._healthy = True
        self._last_attention: list[AttentionStepResult | None] = [None] * len(self.attention)
        self._attention_tokens = [0] * len(self.attention)
        self._expert_tokens: dict[int, int] = dict.fromkeys(range(self.config.num_experts), 0)
        self._expert_node_tokens = [0] * (self.placement.num_nodes if self.placement else 0)
        self.load_window = self._new_load_window()
        self.failed_steps = 0
        self.expert_failovers = 0
        self.expert_rebalances = 0
        self._tracer: _TraceCollector | None = None  # a `trace` in progress
        self._rebalancer = Rebalancer(d.experts.rebalance, d.experts.redundant_slots)
        self._confirmed_version = 0  # the placement version every node has confirmed
        self._staging: tuple[RebalancePlan, list[ray.ObjectRef]] | None = None
        self._down: set[int] = set()  # expert nodes dead, their experts served by replicas
        self._revivals: dict[int, ray.ObjectRef] = {}  # expert node -> pending pid call (back yet?)
        self._gone: set[int] = set()  # down expert nodes Ray will not restart
        self._dead: set[int] = set()  # colocated nodes that failed and did not come back
        if self.placement is None:  # colocated: each node steps on its own; one driver a node
            ray.get(
                [a.start_loop.remote() for a in self.attention], timeout=d.ray.startup_timeout_s
            )
            self._drivers = [
                threading.Thread(target=self._drive, args=(i,), name=f"afd-drive-{i}", daemon=True)
                for i in range(len(self.attention))
            ]
        else:  # disaggregated: the nodes step in lockstep on their own; one thread feeds them
            self._next_step = 1  # where every node's loop starts, or goes on after a stop
            self._pending: dict[int, _StepResults] = {}  # results of steps not yet complete
            self._unsettled = False  # loops may still be stepping: poll them until parked
            self._run_cluster_from(self._next_step)
            self._drivers = [threading.Thread(target=self._run, name="afd-engine", daemon=True)]
        for thread in self._drivers:
            thread.start()

    # ---- placement and wiring ---------------------------------------------------------
    def _new_load_window(self) -> ExpertLoadWindow:
        """An empty window over the placement as it is now (its count columns follow it)."""
        layers = self.config.moe_layers
        return ExpertLoadWindow(
            layers,
            self.config.num_experts,
            [self.placement.at(layer) for layer in layers] if self.placement else [()],
            self.deployment.experts.load_window,
        )

    def _start_expert(self, j: int):
        assert self.placement is not None  # expert nodes exist only with a placement
        settings = expert_node_settings(
            self.deployment, j, self.placement, self.placement.replicas > 1
        )
        return self._actor(ExpertNode, "experts", j).remote(settings)

    def _start_attention(self, i: int):
        settings = attention_node_settings(self.deployment, i)
        return self._actor(AttentionNode, "attention", i).remote(settings, self.placement)

    def _actor(self, cls: type, pool: str, index: int):
        """The node class as a Ray actor in its pool's placement group, bundle `index`."""
        bundle = self._demands[pool].bundle
        return ray.remote(cls).options(
            num_cpus=bundle.get("CPU", 0),
            num_gpus=bundle.get("GPU", 0),
            resources={k: v for k, v in bundle.items() if k not in ("CPU", "GPU")},
            scheduling_strategy=in_group(self._groups[pool], index),
            max_restarts=self.deployment.ray.max_restarts,  # a restart re-runs __init__
            max_concurrency=4,  # abort() reaches a node blocked in its step; submit() a polled one
        )

    def _expert_peers(self, addresses: list | None = None) -> list[tuple[int, PeerAddress]]:
        if addresses is None:
            timeout = self.deployment.transport.recovery_timeout_s
            addresses = ray.get([e.address.remote() for e in self.experts], timeout=timeout)
        return [(EXPERT_PEER_BASE + j, address) for j, address in enumerate(addresses)]

    def _wire(self) -> None:
        timeout = self.deployment.ray.startup_timeout_s
        expert_addresses = ray.get([e.address.remote() for e in self.experts], timeout=timeout)
        peers = self._expert_peers(expert_addresses)
        ray.get([a.address.remote() for a in self.attention], timeout=timeout)
        attention_ids = list(range(len(self.attention)))
        regions = None
        if self._slot_lane:  # the expert nodes' dispatch slots, sized for every attention node
            capacity = self.deployment.attention.max_batch_tokens
            calls = [e.open_lane.remote(attention_ids, capacity) for e in self.experts]
            regions = ray.get(calls, timeout=timeout)
        waits = [e.wait_for_attention_nodes.remote(attention_ids, timeout) for e in self.experts]
        own = ray.get([a.connect.remote(peers, regions) for a in self.attention], timeout=timeout)
        ray.get(waits, timeout=timeout)
        if self._slot_lane:  # and the attention nodes' combine slots
            ray.get([e.connect_lane.remote(own) for e in self.experts], timeout=timeout)

    @property
    def _slot_lane(self) -> bool:
        """Rows and sums go through slots (device or proxy lane): every node has a handle."""
        return self.deployment.transport.lane in SLOT_LANES and bool(self.experts)

    # ---- requests ---------------------------------------------------------------------
    @overload
    def submit(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> RequestStream: ...

    @overload
    def submit(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None, sink: Sink
    ) -> Sink: ...

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        sink: TokenSink | None = None,
    ) -> TokenSink:
        """Queues a request; its tokens go to `sink` (by default a blocking RequestStream)."""
        check_prompt(prompt_ids, params, self.config)
        a = self.deployment.attention
        kv_tokens = a.kv_blocks * a.block_size
        if len(prompt_ids) + params.max_tokens > kv_tokens:  # it could never run to its end
            raise RequestFailed(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceed an "
                f"attention node's KV cache of {kv_tokens} tokens (attention.kv_blocks x block_size)"
            )
        request_id = request_id or f"req-{next(self._ids)}"
        stream = sink or RequestStream(request_id, self.deployment.transport.round_timeout_s * 4)
        with self._wake:
            if self._stopping:
                raise RequestFailed("the cluster is shutting down")
            if request_id in self._streams:
                raise ValueError(f"request id {request_id} is already running")
            node = self._least_loaded()
            self._load[node] += 1
            self._streams[request_id], self._node_of[request_id] = stream, node
            self._requests[request_id] = (list(prompt_ids), params, [])
            self._incoming[node].append(NewRequest(request_id, list(prompt_ids), params))
            self._wake.notify_all()
        return stream

    def abort(self, request_id: str) -> None:
        with self._wake:
            if request_id in self._node_of:
                node = self._node_of[request_id]
                queued = [r for r in self._incoming[node] if r.request_id != request_id]
                if len(queued) < len(self._incoming[node]):
                    self._incoming[node] = queued  # never handed over: nothing to abort there
                else:
                    self._aborts[node].append(request_id)
                self._forget(request_id)
                self._wake.notify_all()

    def generate(self, requests: list[tuple[list[int], SamplingParams]]) -> list[list[TokenOutput]]:
        """Submits all at once and collects every stream: a convenience for the CLI and tests."""
        streams = [self.submit(ids, params) for ids, params in requests]
        return [list(s) for s in streams]

    # ---- disaggregated: the engine thread ---------------------------------------------------
    def _run(self) -> None:
        """Hands requests and aborts to the attention nodes and takes every node's results,
        while there is work; the nodes step on their own meanwhile."""
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._stopping or self._work_left(), timeout=1.0)
                if self._stopping and not any(self._load):
                    return
                if not self._work_left():
                    continue
            try:
                try:
                    if self._boundary_due():
                        self._boundary()
                    with self._wake:
                        new, self._incoming = self._incoming, [[] for _ in self.attention]
                        aborts, self._aborts = self._aborts, [[] for _ in self.attention]
                    self._hand_over(new, aborts)
                    self._take_results(POLL_S if any(self._load) else SETTLE_POLL_S)
                    if self.placement is not None:
                        self._rebalance_look()
                    self._healthy = True
                except _NodesFailed as failure:
                    self._recover_loops(failure.errors)
            except Exception as err:
                self._healthy = False
                log.error("step %d failed: %s", self.step_id, err)
                self._fail_all(RequestFailed(f"step {self.step_id} failed: {err}"))

    def _work_left(self) -> bool:
        """Requests or aborts to hand over, or node loops that may still be stepping (their
        last results, an aborted request's freed blocks, are taken before the engine rests)."""
        return any(self._load) or any(self._aborts) or self._unsettled

    def _hand_over(self, new: list[list[NewRequest]], aborts: list[list[str]]) -> None:
        calls = {
            ("attention", i): a.submit.remote(new[i], aborts[i])
            for i, a in enumerate(self.attention)
            if new[i] or aborts[i]
        }
        _, errors = self._answers(calls, self.deployment.transport.recovery_timeout_s)
        if errors:
            raise _NodesFailed(errors)

    def _take_results(self, wait_s: float) -> dict[tuple[str, int], LoopState]:
        """`_poll_nodes`, raising any failure."""
        states, errors = self._poll_nodes(wait_s)
        if errors:
            raise _NodesFailed(errors)
        return states

    def _poll_nodes(self, wait_s: float) -> tuple[dict[tuple[str, int], LoopState], dict]:
        """Every live node's results since the last poll (attention nodes: waiting up to
        `wait_s` for one), absorbed; returns where each node's loop stands, and the failures:
        nodes that did not answer, loops a failed step ended. A dead expert node whose experts
        have replicas is routed around instead."""
        polls = {("attention", i): a.poll.remote(wait_s) for i, a in enumerate(self.attention)}
        polls.update(
            {("expert", j): e.poll.remote(0.0) for j, e in enumerate(self.experts) if j not in self._down}
        )  # fmt: skip
        reports, errors = self._answers(polls, self.deployment.transport.round_timeout_s)
        for key, err in list(errors.items()):
            kind, j = key
            dead = isinstance(err, ray.exceptions.RayActorError)
            if kind == "expert" and dead and self._can_fail_over(j):
                self._fail_over(j, err)
                del errors[key]
        states = {}
        self._unsettled = bool(errors) or not all(r.state.parked for r in reports.values())
        for key in sorted(reports):
            report = reports[key]
            self._unsettled |= bool(report.results)
            for step, result in report.results:
                self._absorb_step(key, step, result)
            states[key] = report.state
            if report.state.error is not None and not report.state.running:
                errors[key] = RuntimeError(report.state.error)
        self._complete_steps()
        return states, errors

    def _answers(self, calls: dict, timeout_s: float) -> tuple[dict, dict]:
        """Each call's answer or error, by key, waiting at most `timeout_s` in all."""
        deadline = time.monotonic() + timeout_s
        results: dict = {}
        errors: dict = {}
        for key, ref in calls.items():
            try:
                results[key] = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except ray.exceptions.GetTimeoutError:
                errors[key] = TimeoutError(f"{key[0]}-{key[1]} did not answer within {timeout_s}s")
            except Exception as err:
                errors[key] = err
        return results, errors

    def _absorb_step(self, key: tuple[str, int], step: int, result: Any) -> None:
        kind, i = key
        pending = self._pending.setdefault(step, _StepResults())
        if kind == "attention":
            for out in result.outputs:
                self._publish(out)
            self._last_attention[i] = result
            self._attention_tokens[i] += result.tokens
            pending.attention[i] = result
        else:
            self._expert_node_tokens[i] += sum(result.tokens_per_expert.values())
            if result.layer_tokens:
                self.load_window.add(i, result.layer_tokens)
            for expert, tokens in result.tokens_per_expert.items():
                self._expert_tokens[expert] += tokens
            pending.experts[i] = result
        tracer = self._tracer
        if tracer is not None:
            tracer.add(f"{kind}-{i}", step, result.trace)

    def _complete_steps(self) -> None:
        """Hands on, in order, the steps every attention node and every live expert node has
        reported (a step a node never reports, for it died, is dropped once later ones are)."""
        done = [
            s
            for s, r in self._pending.items()
            if len(r.attention) == len(self.attention)
            and all(j in r.experts for j in range(len(self.experts)) if j not in self._down)
        ]
        for step in sorted(done):
            r = self._pending.pop(step)
            attention: list[AttentionStepResult | None] = [
                r.attention[i] for i in range(len(self.attention))
            ]
            experts = [r.experts[j] for j in sorted(r.experts)]
            imbalance = tuple(float(x) for x in self.load_window.imbalance())
            wall = max(a.timings.total_s for a in r.attention.values())
            self.step_id = max(self.step_id, step)
            self._observe(
                StepRecord(step, wall, attention, experts, imbalance, self.expert_rebalances)
            )
        for step in [s for s in self._pending if s < self.step_id - 16]:
            del self._pending[step]

    # ---- disaggregated: boundaries -------------------------------------------------------------
    def _boundary_due(self) -> bool:
        """Whether something must happen between two steps, with every node stopped."""
        if self.placement is None:
            return False
        tracer = self._tracer
        return (
            self._revival_ready()
            or not self._placement_confirmed
            or self._staged_ready()
            or (tracer is not None and not tracer.armed)
        )

    def _boundary(self) -> None:
        """Stops every node at one step, does what is due (`_at_boundary`), lets them go on.
        A halt that fails is a failure like a step's: recovery restarts every loop."""
        self._halt_cluster()
        try:
            self._at_boundary()
        finally:
            self._run_cluster_from(self._next_step)

    def _halt_cluster(self) -> None:
        """Every attention node stops starting steps of its own; once every node is parked at
        the same step, none can start another, and each is halted there (`StepLoop`)."""
        timeout = self.deployment.transport.recovery_timeout_s
        _, errors = self._answers({("attention", i): a.pause.remote() for i, a in enumerate(self.attention)}, timeout)  # fmt: skip
        if errors:
            raise _NodesFailed(errors)
        deadline = time.monotonic() + self.deployment.transport.round_timeout_s * (
            self.config.num_layers + 1
        )
        halted = False
        while True:
            states = self._take_results(POLL_S)
            steps = {s.next_step for s in states.values()}
            if halted and all(s.halted for s in states.values()):
                break
            if not halted and len(steps) == 1 and all(s.parked for s in states.values()):
                self._next_step = steps.pop()
                calls = {key: self._node(key).halt.remote() for key in states}
                _, errors = self._answers(calls, timeout)
                if errors:
                    raise _NodesFailed(errors)
                halted = True
            if time.monotonic() > deadline:
                late = {k: TimeoutError("did not stop at a step boundary") for k, st in states.items() if not st.parked}  # fmt: skip
                raise _NodesFailed(late or {k: TimeoutError("nodes stopped at different steps") for k in states})  # fmt: skip

    def _run_cluster_from(self, step: int) -> None:
        """Every live node's loop goes on from `step` (expert nodes first: they wait for it)."""
        timeout = self.deployment.transport.recovery_timeout_s
        calls = {("expert", j): e.start_loop.remote(step) for j, e in enumerate(self.experts) if j not in self._down}  # fmt: skip
        _, errors = self._answers(calls, timeout)
        if not errors:
            calls = {("attention", i): a.start_loop.remote(step) for i, a in enumerate(self.attention)}  # fmt: skip
            _, errors = self._answers(calls, timeout)
        if errors:
            raise _NodesFailed(errors)

    def _node(self, key: tuple[str, int]) -> Any:  # a Ray actor handle
        kind, i = key
        return self.attention[i] if kind == "attention" else self.experts[i]

    def _at_boundary(self) -> None:
        """Between two lockstep steps, every node halted: expert nodes that came back are
        rewired, a placement not yet on every node is pushed again (no step runs on mixed
        placements), a staged rebalance is switched to, and a requested trace is armed."""
        if self._down:
            self._revive_experts()
        if self.placement is not None:
            if not self._placement_confirmed:
                self._confirm_placement()
            if self._staged_ready():
                self._switch_staged()
        tracer = self._tracer
        if tracer is not None and not tracer.armed:
            self._arm_trace(tracer)

    # ---- disaggregated: recovery -----------------------------------------------------------------
    def _recover_loops(self, errors: dict) -> None:
        """A step failed somewhere: every node's step in progress is aborted, and once no loop
        runs any more (their results taken), the cluster is recovered (`_recover`) and every
        node goes on from one step past any step a node reached. A node that fails as the
        loops start again (a second kill) starts the recovery over, until the recovery
        timeout: its requests must move too, not fail with the rest."""
        deadline = time.monotonic() + self.deployment.transport.recovery_timeout_s
        while True:
            self._stop_and_recover(errors)
            try:
                self._run_cluster_from(self._next_step)
                return
            except _NodesFailed as again:
                if time.monotonic() > deadline:
                    raise
                errors = again.errors

    def _stop_and_recover(self, errors: dict) -> None:
        """Aborts every loop, takes what they still report, and recovers the cluster."""
        log.warning("stopping every node: %s", _describe(errors))
        aborts = {
            key: self._node(key).abort.remote()
            for key in self._nodes()
            if not (key[0] == "expert" and key[1] in self._down)
        }  # waited for: an abort that ran late would end the loops started after recovery
        self._answers(aborts, self.deployment.transport.recovery_timeout_s)
        deadline = time.monotonic() + self.deployment.transport.round_timeout_s
        # past every step any node may have opened: frames of those are dropped on arrival
        reached = max([self._next_step, self.step_id + 1, *(s + 1 for s in self._pending)])
        while time.monotonic() < deadline:
            states, more = self._poll_nodes(POLL_S)
            errors = {**more, **errors}
            reached = max([reached, *(s.next_step for s in states.values())])
            if all(not s.running or s.halted for s in states.values()):
                break
        self._pending.clear()
        self._recover(reached + 1, errors)

    # ---- colocated nodes: each steps on its own ---------------------------------------------
    def _drive(self, i: int) -> None:
        """Feeds colocated node i its requests and aborts and hands on its results. The node
        steps on its own thread; this thread only waits for its results, never for a step."""
        node = self.attention[i]
        timeout = self.deployment.transport.round_timeout_s
        unsettled = False  # the loop may still be stepping: polled until it is parked
        while True:
            with self._wake:
                self._wake.wait_for(partial(self._driver_called, i, unsettled), timeout=1.0)
                if self._stopping and self._load[i] == 0:
                    return
                new, self._incoming[i] = self._incoming[i], []
                aborts, self._aborts[i] = self._aborts[i], []
                busy = self._load[i] > 0 or unsettled
            try:
                if new or aborts:
                    ray.get(node.submit.remote(new, aborts), timeout=timeout)
                    busy = True
                if busy:
                    wait = 2 * POLL_S if self._load[i] else SETTLE_POLL_S
                    report = ray.get(node.poll.remote(wait), timeout=timeout)
                    unsettled = bool(report.results) or not report.state.parked
                    for _, result in report.results:
                        self._absorb(i, result)
                    if report.state.error is not None:
                        raise RuntimeError(f"the node's step loop stopped: {report.state.error}")
                    self._healthy = True
            except Exception as err:
                self._recover_colocated(i, err)

    def _driver_called(self, i: int, unsettled: bool) -> bool:
        """Whether colocated node i's driver has something to do."""
        return bool(
            self._stopping or self._incoming[i] or self._aborts[i] or self._load[i] or unsettled
        )

    def _absorb(self, i: int, result: AttentionStepResult) -> None:
        for out in result.outputs:
            self._publish(out)
        attention: list[AttentionStepResult | None] = [None] * len(self.attention)
        attention[i] = result
        with self._wake:
            self.step_id += 1
            record = StepRecord(self.step_id, result.timings.total_s, attention, [])
            self._last_attention[i] = result
            self._attention_tokens[i] += result.tokens
        tracer = self._tracer
        if tracer is not None:
            tracer.add(f"attention-{i}", record.step, result.trace)
        self._observe(record)

    def _recover_colocated(self, i: int, err: Exception) -> None:
        """A colocated node failed: the others go on. A dead one is awaited (Ray restarts it and
        it reloads its weights), started again, and its requests re-prefill wherever the load
        is least; a node that fails otherwise, or does not come back, fails its requests."""
        self.failed_steps += 1
        log.warning("attention-%d failed: %s", i, err)
        key, limit = ("attention", i), self.deployment.transport.recovery_timeout_s
        try:  # a restarted node (whatever error showed it) has lost its loop and its requests
            pids = _await_restarts({key: self.attention[i]}, time.monotonic() + limit)
            if pids[key] != self._pids.get(key):
                ray.get(self.attention[i].start_loop.remote(), timeout=limit)
                self._pids[key] = pids[key]
                self._resubmit_from(i)
                return
        except Exception as again:
            err = again
        self._healthy = False
        with self._wake:
            self._dead.add(i)  # out of rotation: new requests go to the other nodes
        self._fail_node(i, RequestFailed(f"attention-{i} failed and could not recover: {err}"))

    def _fail_node(self, i: int, error: Exception) -> None:
        with self._wake:
            failed = [r for r, n in self._node_of.items() if n == i]
            streams = [self._streams[r] for r in failed]
            for request_id in failed:
                self._forget(request_id)
            self._aborts[i] += failed  # free their blocks, should the node still be stepping
            self._incoming[i] = []
        for stream in streams:
            stream.put(error)

    def _observe(self, record: StepRecord) -> None:
        """Keeps the step (when asked) and hands it to the hooks (metrics)."""
        if self.keep_history:
            self.history.append(record)
        for hook in list(self.step_hooks):
            try:
                hook(record)
            except Exception as err:
                log.warning("step hook failed: %s", err)

    def _can_fail_over(self, j: int) -> bool:
        p = self.placement
        return p is not None and p.replicas > 1 and p.covers(self._down | {j})

    def _fail_over(self, j: int, err: Exception) -> None:
        """Expert node j died and every expert it held has a live replica: the attention nodes
        route around it within the round in progress; it rejoins once Ray has restarted it."""
        log.warning("expert-%d died (%s); its experts' replicas take over", j, type(err).__name__)
        self._down.add(j)
        self._revivals.pop(j, None)
        self.expert_failovers += 1
        for a in self.attention:
            a.expert_lost.remote(EXPERT_PEER_BASE + j)

    # ---- live rebalancing -------------------------------------------------------------------
    def _rebalance_look(self) -> None:
        """Every `every_steps` steps, looks at the load window and has the expert nodes stage
        a plan while the next steps run (the switch waits for a boundary: `_switch_staged`)."""
        assert self.placement is not None
        if self._staging is not None or self._down:
            return
        loads = self.load_window.layers()
        plan = self._rebalancer.look(self.step_id, self.placement, loads)
        if plan is None:
            return
        log.info(
            "rebalance %d: layers %s over %.2f (worst %.2f, expected %.2f after), %d expert "
            "copies to load",
            plan.version,
            list(plan.layers),
            self.deployment.experts.rebalance.threshold,
            plan.measured,
            plan.expected,
            plan.moves,
        )
        self._staging = (
            plan,
            [
                e.stage_experts.remote(plan.version, plan.node_layers(j))
                for j, e in enumerate(self.experts)
            ],
        )

    def _staged_ready(self) -> bool:
        """Whether every expert node has loaded (or failed to load) the staged plan's experts,
        with none down."""
        if self._staging is None or self._down:
            return False
        refs = self._staging[1]
        return not ray.wait(refs, num_returns=len(refs), timeout=0)[1]

    def _switch_staged(self) -> None:
        """At a boundary: switches to the staged plan, unless a node failed to load it (then
        the next look plans again)."""
        assert self._staging is not None
        staged, refs = self._staging
        self._staging = None
        try:
            ray.get(refs)
        except Exception as err:
            log.warning("rebalance %d abandoned: staging failed (%s)", staged.version, err)
            return
        self._switch(staged)

    def _switch(self, plan: RebalancePlan) -> None:
        """The plan's placement is the cluster's from here; no step runs until every node has
        confirmed it (`_confirm_placement`, again at each boundary until it has)."""
        self.placement = plan.placement
        self._rebalancer.switched(plan, self.step_id)
        self.load_window = self._new_load_window()
        self._confirm_placement()

    @property
    def _placement_confirmed(self) -> bool:
        return self._confirmed_version == self.placement_version

    def _confirm_placement(self) -> None:
        """Every live node to the cluster's placement. A node failing meanwhile is recovered
        like a failed step (recovery pushes the placement too); when even that fails, the
        error ends this boundary and the next one tries again."""
        errors = self._push_placement(self.deployment.transport.recovery_timeout_s)
        for key, err in list(errors.items()):  # with replicas a dead expert node is routed
            kind, j = key  # around, and given the placement when it is back (`_rewire_expert`)
            dead = isinstance(err, ray.exceptions.RayActorError)
            if kind == "expert" and dead and self._can_fail_over(j):
                self._fail_over(j, err)
                del errors[key]
        if errors:
            self._recover(self._next_step - 1, errors)
        self._confirmed_version = self.placement_version
        self.expert_rebalances += 1
        log.info("rebalance %d: every node switched", self.placement_version)

    @property
    def placement_version(self) -> int:
        """The placement every node holds or routes by: 0 as deployed, then each rebalance's."""
        return self._rebalancer.version

    def _node_layer_ids(self, j: int) -> dict[int, tuple[int, ...]]:
        assert self.placement is not None
        return {layer: self.placement.at(layer)[j] for layer in self.config.moe_layers}

    def _push_placement(self, timeout: float) -> dict:
        """Brings every live node to the cluster's placement (a node already there does
        nothing); the failures, by node."""
        if self.placement_version == 0:
            return {}
        v = self.placement_version
        calls = {
            ("expert", j): e.hold_experts.remote(v, self._node_layer_ids(j))
            for j, e in enumerate(self.experts)
            if j not in self._down
        }
        calls.update(
            {
                ("attention", i): a.set_placement.remote(v, self.placement)
                for i, a in enumerate(self.attention)
            }
        )
        deadline = time.monotonic() + timeout
        errors = {}
        for key, ref in calls.items():
            try:
                ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
            except Exception as err:
                errors[key] = err
        return errors

    def _revival_ready(self) -> bool:
        """Whether a down expert node is back (asked without waiting; the asking is started
        here and answered at a later look)."""
        ready = False
        for j in sorted(self._down - self._gone):
            ref = self._revivals.get(j)
            if ref is None:
                self._revivals[j] = self.experts[j].pid.remote()
            elif ray.wait([ref], timeout=0)[0]:
                try:
                    ray.get(ref)
                    ready = True
                except Exception:  # not back yet (restarting): ask again at a later look
                    del self._revivals[j]
        return ready

    def _revive_experts(self) -> None:
        """At a boundary: rewires the down expert nodes that Ray has brought back."""
        timeout = self.deployment.transport.recovery_timeout_s
        for j in sorted(self._down - self._gone):
            ref = self._revivals.get(j)
            if ref is None or not ray.wait([ref], timeout=0)[0]:
                continue
            del self._revivals[j]
            try:
                pid = ray.get(ref)
                self._rewire_expert(j, timeout)
            except Exception as err:
                for a in self.attention:  # a half-done rewiring connected some of them again
                    a.expert_lost.remote(EXPERT_PEER_BASE + j)
                if self._out_of_restarts():
                    log.error("expert-%d will not come back (replicas serve on): %s", j, err)
                    self._gone.add(j)
                continue
            self._pids["expert", j] = pid
            self._down.discard(j)
            log.info("expert-%d is back and rewired", j)

    def _recover(self, step: int, errors: dict) -> None:
        """Restarts dead nodes (Ray re-runs their __init__, so they reload their weights),
        rewires them, clears the abandoned rounds everywhere (every node goes on from step
        `step` + 1) and moves the requests of a dead attention node to live ones, to continue
        from their prompt plus the tokens streamed. Every loop must have stopped."""
        self.failed_steps += 1
        dead = {key for key, err in errors.items() if isinstance(err, ray.exceptions.RayActorError)}
        log.warning(
            "step %d failed on %s; dead: %s",
            step,
            ", ".join(f"{k}-{i}: {type(e).__name__}" for (k, i), e in sorted(errors.items())),
            sorted(dead) or "none",
        )
        limit = self.deployment.transport.recovery_timeout_s
        deadline = time.monotonic() + limit
        moved_from: set[int] = set()
        while True:  # another node may die while this one is brought back: start over
            try:
                pids = _await_restarts(self._nodes(), deadline)
                restarted = sorted(k for k, pid in pids.items() if pid != self._pids.get(k))
                left = max(1.0, deadline - time.monotonic())
                ray.get([n.reset.remote(step + 1) for n in self._nodes().values()], timeout=left)
                self._next_step = step + 1
                for kind, j in restarted:
                    if kind == "expert":
                        self._rewire_expert(j, left)
                for kind, i in restarted:
                    if kind == "attention":
                        self._rewire_attention(i, left)
                        moved_from.add(i)
                self._pids = pids
                self._down.clear()  # every node answered: down expert nodes are back, rewired
                self._revivals.clear()
                unplaced = self._push_placement(left)  # a node a rebalance's switch missed
                if unplaced:
                    raise next(iter(unplaced.values()))
                break
            except Exception as err:
                # a node out of restarts will not come back; anything else may pass
                if time.monotonic() > deadline or self._out_of_restarts():
                    self._healthy = False
                    raise RequestFailed(
                        f"the cluster could not recover from the failure of step {step} "
                        f"within {limit}s: {err}"
                    ) from err
                log.warning("recovery from step %d interrupted (%s); again", step, err)
                time.sleep(0.2)
        for i in sorted(moved_from):
            self._resubmit_from(i)

    def _out_of_restarts(self) -> bool:
        """Whether Ray has given up on a node. A call to a node that died fails with
        ActorDiedError whether or not Ray restarts it, so the GCS actor table is asked."""
        for node in self._nodes().values():
            try:
                entry = ray_state.actor_table(node._actor_id.hex())
            except Exception:
                continue
            if entry and entry.get("State") == "DEAD":
                return True
        return False

    def _nodes(self) -> dict[tuple[str, int], Any]:  # Ray actor handles
        nodes: dict[tuple[str, int], object] = {
            ("attention", i): a for i, a in enumerate(self.attention)
        }
        nodes.update({("expert", j): e for j, e in enumerate(self.experts)})
        return nodes

    def _rewire_expert(self, j: int, timeout: float) -> None:
        """Connects a restarted expert node (new address, new slots) to every attention node."""
        attention_ids = list(range(len(self.attention)))
        address = ray.get(self.experts[j].address.remote(), timeout=timeout)
        # an earlier attempt may have connected some attention nodes before it failed; a stale
        # entry would end the wait below at once, with nobody left to serve (or accept: the id
        # is taken) the hellos they send again
        ray.get(self.experts[j].forget_attention_nodes.remote(attention_ids), timeout=timeout)
        region = None
        if self._slot_lane:
            capacity = self.deployment.attention.max_batch_tokens
            region = ray.get(
                self.experts[j].open_lane.remote(attention_ids, capacity), timeout=timeout
            )
        wait = self.experts[j].wait_for_attention_nodes.remote(attention_ids, timeout)
        ray.get(
            [a.reconnect.remote(EXPERT_PEER_BASE + j, address, region) for a in self.attention],
            timeout=timeout,
        )
        ray.get(wait, timeout=timeout)
        if self._slot_lane:
            own = ray.get([a.lane_region.remote() for a in self.attention], timeout=timeout)
            ray.get(self.experts[j].connect_lane.remote(own), timeout=timeout)
        if self.placement_version:  # it restarted with the placement it was first given
            ray.get(
                self.experts[j].hold_experts.remote(
                    self.placement_version, self._node_layer_ids(j)
                ),
                timeout=timeout,
            )

    def _rewire_attention(self, i: int, timeout: float) -> None:
        """Connects a restarted attention node (new slots too) to every expert node."""
        # its old connections dropped first, for certain: a forget that ran after the new
        # node connected would drop the new connection instead
        ray.get([e.forget_attention_nodes.remote([i]) for e in self.experts], timeout=timeout)
        waits = [e.accept_attention_node.remote(i, timeout) for e in self.experts]
        regions = None
        if self._slot_lane:
            regions = ray.get([e.lane_region.remote() for e in self.experts], timeout=timeout)
        own = ray.get(
            self.attention[i].connect.remote(self._expert_peers(), regions), timeout=timeout
        )
        ray.get(waits, timeout=timeout)
        if own is not None:
            ray.get([e.reconnect_lane.remote(own) for e in self.experts], timeout=timeout)
        # its placement: `_recover`, the only caller, pushes the cluster's to every node next

    def _least_loaded(self) -> int:
        live = [i for i in range(len(self._load)) if i not in self._dead]
        if not live:
            raise RequestFailed("no attention node is left: every one failed and did not recover")
        return min(live, key=self._load.__getitem__)

    def _resubmit_from(self, node: int) -> None:
        with self._wake:
            moved = [r for r, n in self._node_of.items() if n == node]
            self._incoming[node] = []
            for request_id in moved:
                prompt, params, generated = self._requests[request_id]
                self._load[node] -= 1
                target = self._least_loaded()
                self._load[target] += 1
                self._node_of[request_id] = target
                left = replace(params, max_tokens=params.max_tokens - len(generated))
                self._incoming[target].append(NewRequest(request_id, prompt + generated, left))
        log.warning("moved %d request(s) of attention node %d", len(moved), node)

    def _publish(self, out: TokenOutput) -> None:
        with self._wake:
            stream = self._streams.get(out.request_id)
            if stream is None:
                return  # aborted while its step ran
            self._requests[out.request_id][2].append(out.token_id)
            if out.finish_reason is not None:
                self._forget(out.request_id)
        stream.put(out)

    def _forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._requests.pop(request_id, None)
        self._load[self._node_of.pop(request_id)] -= 1

    def _fail_all(self, error: Exception) -> None:
        with self._wake:
            streams = list(self._streams.values())
            for request_id in list(self._streams):
                self._aborts[self._node_of[request_id]].append(request_id)  # free their blocks
                self._forget(request_id)
            self._incoming = [[] for _ in self.attention]
        for stream in streams:
            stream.put(error)

    # ---- tracing ------------------------------------------------------------------------------
    def _arm_trace(self, tracer: _TraceCollector) -> None:
        """At a step boundary: every live node traces the same next steps (a node that is down
        is left out of the trace)."""
        live = {
            f"{kind}-{i}": node
            for (kind, i), node in self._nodes().items()
            if not (kind == "expert" and i in self._down)
        }
        tracer.expect(list(live))
        try:
            ray.get(
                [n.trace_steps.remote(tracer.steps) for n in live.values()],
                timeout=self.deployment.transport.recovery_timeout_s,
            )
        except Exception as err:  # the trace ends with what it has; serving goes on
            log.warning("could not arm the trace: %s", err)
            tracer.done.set()
            return
        tracer.armed = True

    def trace(self, steps: int, timeout_s: float | None = None) -> dict:
        """A Chrome/Perfetto trace (`chrome://tracing`, ui.perfetto.dev) of the next `steps`
        steps every node runs: per node, per layer and micro-batch, its spans from GPU
        timestamps (`afd.models.step_trace`). Steps run when there is traffic: this waits until
        every node has run them or `timeout_s` passed (an idle colocated node never steps), and
        returns what was taken (TimeoutError if nothing). Traced steps run without CUDA graphs."""
        if steps < 1:
            raise ValueError(f"steps to trace must be >= 1, got {steps}")
        names = [f"attention-{i}" for i in range(len(self.attention))]
        names += [f"expert-{j}" for j in range(len(self.experts))]
        tracer = _TraceCollector(steps, names)
        with self._wake:
            if self._tracer is not None:
                raise RuntimeError("a trace is already being taken")
            self._tracer = tracer
            self._wake.notify_all()
        try:
            if self.placement is None:  # colocated: each node's own loop takes it up
                ray.get([a.trace_steps.remote(steps) for a in self.attention])
                tracer.armed = True
            tracer.done.wait(timeout_s)
            if not any(tracer.nodes.values()):
                raise TimeoutError(f"no traced step ran within {timeout_s}s (no traffic?)")
        finally:
            with self._wake:
                self._tracer = None
            if tracer.armed:  # steps not taken yet run untraced again; waited for, so that a
                # later trace's arming cannot be overtaken by this disarming
                try:
                    ray.get([n.trace_steps.remote(0) for n in self._nodes().values()], timeout=10)
                except Exception as err:
                    log.warning("could not disarm every node's trace: %s", err)
        return chrome_trace(tracer.nodes)

    # ---- introspection and shutdown ---------------------------------------------------------
    def status(self) -> ClusterState:
        """The nodes as of the last step, and what is queued before the next one."""
        total = self.deployment.attention.kv_blocks
        nodes = []
        for i, last in enumerate(self._last_attention):
            nodes.append(
                NodeState(
                    f"attention-{i}",
                    "attention",
                    self._healthy,
                    last.running if last else 0,
                    last.waiting if last else 0,
                    last.free_kv_blocks if last else total,
                    total,
                    tokens=self._attention_tokens[i],
                )
            )
        for j in range(self.placement.num_nodes if self.placement else 0):
            experts = self.placement.node_experts(j) if self.placement else ()
            nodes.append(
                NodeState(
                    f"expert-{j}",
                    "expert",
                    self._healthy and j not in self._down,
                    expert_ids=tuple(experts),
                    tokens=self._expert_node_tokens[j],
                    layer_tokens=self.load_window.node_layers(j),
                )
            )
        with self._wake:
            queued = sum(len(q) for q in self._incoming)
        return ClusterState(
            nodes,
            queued,
            self.step_id,
            dict(self._expert_tokens),
            self.failed_steps,
            self.expert_failovers,
            self.load_window.layers() if self.placement else [],
            self.load_window.steps,
            self.expert_rebalances,
        )

    def loaded_tensor_names(self) -> dict[str, list[str]]:
        names = ray.get(
            [a.loaded_tensor_names.remote() for a in self.attention]
            + [e.loaded_tensor_names.remote() for e in self.experts]
        )
        labels = [f"attention-{i}" for i in range(len(self.attention))] + [
            f"expert-{j}" for j in range(len(self.experts))
        ]
        return dict(zip(labels, names, strict=True))

    def shutdown(self, timeout_s: float = 30.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        for thread in self._drivers:
            thread.join(timeout_s)
        try:
            ray.get([n.shutdown.remote() for n in self.attention + self.experts], timeout=timeout_s)
        except Exception as err:
            log.warning("nodes did not shut down cleanly: %s", err)
        for node in self.attention + self.experts:
            ray.kill(node)
        for group in self._groups.values():
            remove_placement_group(group)
