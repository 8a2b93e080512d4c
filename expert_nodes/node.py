"""The expert node: holds its slice of the routed experts of every MoE layer and only reacts.

For each (step, layer, micro-batch) it waits for a frame from every attention node (possibly
empty), runs its experts once over all their tokens together (this aggregation is the point
of disaggregation), and sends each attention node back its partial sums. On a slot lane the
rows arrive in its slots and the sums go into the attention nodes' slots (on the device lane
straight there, on the proxy lane through this node's proxy); only the step's control round
(the rows of each micro-batch) comes through the transport.

With expert replicas it also answers failover frames (tokens an attention node sends again
because the expert node it first sent them to died) whenever they come, and ends its step only
once every attention node has sent its end-of-step marker: an attention node may fail over to
this node in its last layer, after this node's own last exchange.

Shape legend: T = tokens from all attention nodes, D = hidden, K = top-k.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from afd.models import kernels
from afd.models.checkpoint import open_checkpoint
from afd.models.config import DTYPES, load_config
from afd.models.fp8 import dequantize_rows, unpack_rows
from afd.models.messages import ExpertStepResult
from afd.models.moe import ExpertShard, StackedExperts, load_layer_experts
from afd.models.step_loop import LoopReport, StepLoop
from afd.models.step_trace import StepsToTrace, StepTrace
from afd.transport.device_lane import DeviceLane
from afd.transport.endpoint import PeerAddress, Transport, TransportError, TransportSettings
from afd.transport.lanes import SLOT_LANES, LaneHandle, open_lane
from afd.transport.proxy_lane import ProxyLane
from afd.transport.slot_lane import HostCopy, StatusSnapshot
from afd.transport.slots import SlotKind, SlotLayout
from afd.transport.step_control import call_step, is_opening, read_control_frame
from afd.transport.wire import FrameKind, RoundKey


@dataclass(frozen=True, slots=True)
class ExpertNodeSettings:
    node_id: int
    model_dir: str
    expert_ids: tuple[int, ...]
    dtype: str = "float32"
    load_format: str = "auto"  # "dummy": random weights from config.json alone
    quantization: str = "none"  # "fp8": experts in block-scaled fp8
    micro_batches: int = 1
    round_timeout_s: float = 30.0
    transport: TransportSettings = field(default_factory=TransportSettings)
    device: str = "cpu"  # "cuda": the GPU Ray gave this actor
    serve_failovers: bool = False  # expert replicas: answer failover frames, await step markers
    # (MoE layer, expert ids) for layers whose placement differs from `expert_ids`
    layer_expert_ids: tuple[tuple[int, tuple[int, ...]], ...] = ()
    # "device": rows and sums through slots in shared memory (one host); "proxy": the same
    # slots, moved between hosts by a proxy thread on each node
    lane: str = "host"
    cuda_graphs: bool = True  # a slot lane on CUDA: decode steps replay a graph of the step
    dispatch_fp8: bool = False  # host lane: rows come in E4M3 with their scales (fp8 dispatch)


@dataclass(frozen=True, slots=True)
class _Opened:
    """A step whose work is done or enqueued, not yet closed (`ExpertNode._close`)."""

    step: int
    start: float
    wait: float  # waiting for the control frames (and, host lane, the exchanges)
    compute: float  # host lane: the experts' time
    counts: torch.Tensor  # tokens per (MoE layer, local expert)
    counts_copy: HostCopy | None  # slot lane: on their way to the host already
    status: StatusSnapshot | None  # slot lane: its status word, on its way to the host
    trace: StepTrace | None


@dataclass(frozen=True, slots=True)
class _LaneGraph:
    """A captured lane step: its graph, the counts it writes, and the trace it stamps (when
    captured for traced steps: the labels are the capture's, the stamps each replay's)."""

    graph: torch.cuda.CUDAGraph
    counts: torch.Tensor
    trace: StepTrace | None


class ExpertNode:
    def __init__(self, settings: ExpertNodeSettings) -> None:
        self.settings = settings
        self.config = load_config(settings.model_dir)
        self.checkpoint = open_checkpoint(settings.model_dir, settings.load_format, settings.device)
        self.shard = ExpertShard.load(
            self.checkpoint,
            self.config,
            settings.expert_ids,
            DTYPES[settings.dtype],
            settings.quantization,
            dict(settings.layer_expert_ids),
        ).to(settings.device)
        self.transport = Transport(settings.node_id, settings.transport, settings.device)
        self.attention_peers: list[int] = []
        self._moe_row = {layer: i for i, layer in enumerate(self.config.moe_layers)}
        self._widest = self._widest_layer()
        self.placement_version = 0  # the rebalance whose placement this node holds
        # a rebalance's experts new to this node, loaded while steps run: (version, layer ->
        # (ids, their stack)); replaced by the next one, dropped at the switch
        self._staged: tuple[int, dict[int, tuple[tuple[int, ...], StackedExperts]]] | None = None
        self._step_counts: torch.Tensor | None = None
        self._tracing = StepsToTrace()
        self._trace: StepTrace | None = None  # the step in progress's, when it is traced
        self._step_lock = threading.Lock()  # a step and a placement switch never overlap
        self.lane: DeviceLane | ProxyLane | None = None  # a slot lane, once `open_lane` made it
        # lane steps as CUDA graphs, by the rows of each (attention node, micro-batch) and
        # whether the graph stamps a trace (then with its StepTrace, read after each replay)
        self._graphs: dict[tuple[tuple[tuple[int, ...], ...], bool], _LaneGraph] | None = None
        self._graph_pool: Any = None  # torch.cuda.graph_pool_handle(), once there are graphs
        self._loop: StepLoop[ExpertStepResult] | None = None
        self._ahead: _Opened | None = None  # the next step, opened before this one closed

    def _widest_layer(self) -> int:
        return max((len(self.shard.ids_at(layer)) for layer in self.config.moe_layers), default=0)

    # ---- live rebalancing ----------------------------------------------------------------
    def held_experts(self) -> dict[int, tuple[int, ...]]:
        """MoE layer -> the experts this node holds there, in local-id order."""
        return {layer: self.shard.ids_at(layer) for layer in self.config.moe_layers}

    def stage_experts(self, version: int, layer_ids: dict[int, tuple[int, ...]]) -> int:
        """Loads the experts of rebalance `version` that this node does not hold yet, while
        steps run on another thread (nothing the step reads changes). Only from a source that
        reads into host memory: made on the GPU (dummy weights there), they would be CUDA work
        beside a graph capture, so they are made at the switch instead. Returns how many."""
        if self.checkpoint.device.type != "cpu":
            return 0
        staged: dict[int, tuple[tuple[int, ...], StackedExperts]] = {}
        for layer, ids in self._checked_layer_ids(layer_ids).items():
            new = tuple(e for e in ids if e not in self.shard.ids_at(layer))
            if new:
                staged[layer] = (new, self._load_experts(layer, new))
        self._staged = (version, staged)
        return sum(len(ids) for ids, _ in staged.values())

    def hold_experts(self, version: int, layer_ids: dict[int, tuple[int, ...]]) -> None:
        """Switches to rebalance `version`'s placement, at a step boundary: each changed
        layer's new stack is gathered from the experts held and those staged (or loaded now),
        then takes the old one's place, one layer at a time, so the memory beyond the steady
        state is one layer's stack. A stack of the old one's shape is copied into it, so the
        CUDA graphs that read it stay valid; otherwise the graphs are dropped before anything
        is freed. Holds the step lock (a step never sees a half-switched layer) and is
        idempotent: a failure part-way is mended by calling again, and a restarted node is given
        the cluster's placement this way."""
        with self._step_lock:
            if version == self.placement_version:
                return
            self._hold(version, self._checked_layer_ids(layer_ids))
            self._staged = None
            self._widest = self._widest_layer()
            self.placement_version = version

    def _hold(self, version: int, layer_ids: dict[int, tuple[int, ...]]) -> None:
        staged: dict[int, tuple[tuple[int, ...], StackedExperts]] = {}
        if self._staged is not None and self._staged[0] == version:
            staged = self._staged[1]
        device = torch.device(self.settings.device)
        for layer, ids in layer_ids.items():
            held = self.shard.ids_at(layer)
            if ids == held:
                continue
            current = self.shard.layers[layer]
            rows = {e: (current, held.index(e)) for e in ids if e in held}
            parts = [staged[layer]] if layer in staged else []
            have = {e for part_ids, _ in parts for e in part_ids}
            missing = tuple(e for e in ids if e not in rows and e not in have)
            if missing:  # not staged: a restarted node, or weights made on the device
                parts.append((missing, self._load_experts(layer, missing)))
            for part_ids, part in parts:
                part = part.to(device)
                rows.update({e: (part, i) for i, e in enumerate(part_ids) if e in ids})
            new = StackedExperts.gather([rows[e] for e in ids])
            del rows, parts
            if new.same_shape(current):  # in place: the graphs' addresses stay right
                current.copy_(new)
                self.shard.layer_ids[layer] = ids
            else:
                if self._graphs is not None:
                    self._graphs.clear()  # they read the old stacks, about to be freed
                self.shard.place_layer(layer, ids, new)

    def _checked_layer_ids(
        self, layer_ids: dict[int, tuple[int, ...]]
    ) -> dict[int, tuple[int, ...]]:
        unknown = sorted(set(layer_ids) - set(self.config.moe_layers))
        if unknown:
            raise ValueError(f"expert node {self.settings.node_id}: {unknown} are not MoE layers")
        out = {}
        for layer, ids in layer_ids.items():
            ids = tuple(int(e) for e in ids)
            if not ids or len(set(ids)) != len(ids):
                raise ValueError(f"layer {layer}: expert ids {list(ids)} are empty or repeat")
            bad = [e for e in ids if not 0 <= e < self.config.num_experts]
            if bad:
                raise ValueError(f"layer {layer}: experts {bad} do not exist")
            out[layer] = ids
        return out

    def _load_experts(self, layer: int, ids: tuple[int, ...]) -> StackedExperts:
        s = self.settings
        return load_layer_experts(
            self.checkpoint, self.config, layer, ids, DTYPES[s.dtype], s.quantization
        )

    def address(self) -> PeerAddress:
        return self.transport.address

    def loaded_tensor_names(self) -> list[str]:
        return list(self.checkpoint.names_read)

    def open_lane(self, attention_peers: list[int], capacity: int) -> LaneHandle:
        """Makes this node's dispatch slots (a slot lane): one per (micro-batch, attention
        node), `capacity` rows each. Attention nodes reach them through the handle."""
        s = self.settings
        if s.lane not in SLOT_LANES:
            raise RuntimeError(f"expert node {s.node_id} runs the host lane")
        if self.lane is not None:
            self.lane.close_after_gpu()
        c = self.config
        layout = SlotLayout(
            SlotKind.DISPATCH, s.micro_batches, len(attention_peers), capacity, c.hidden_size,
            c.top_k, DTYPES[s.dtype],
        )  # fmt: skip
        self.lane = open_lane(
            s.lane, layout, s.node_id, attention_peers, c.num_layers, max(c.moe_layers),
            torch.device(s.device), s.transport, s.round_timeout_s,
        )  # fmt: skip
        if self.lane.own.device.type == "cuda" and self.settings.cuda_graphs:
            self._graphs, self._graph_pool = {}, torch.cuda.graph_pool_handle()
        return self.lane.handle

    def wait_for_attention_nodes(self, peers: list[int], timeout_s: float) -> None:
        self.transport.wait_for_peers(peers, timeout_s)
        self.attention_peers = list(peers)

    def forget_attention_nodes(self, peers: list[int]) -> None:
        """Drops what this node holds of these attention nodes (a rewiring that failed half-way
        and is tried again): they connect again, under the same ids."""
        for peer in peers:
            self.transport.forget_peer(peer)
            if isinstance(self.lane, ProxyLane):
                self.lane.forget(peer)

    def connect_lane(self, attention_regions: list[LaneHandle]) -> None:
        """Reaches every attention node's combine slots (a slot lane), in attention-peer order."""
        if self.lane is None:
            raise RuntimeError(
                f"expert node {self.settings.node_id}: connect_lane before open_lane"
            )
        self.lane.connect(attention_regions, self.settings.node_id)
        if self._graphs is not None:
            self._graphs.clear()

    def accept_attention_node(self, peer: int, timeout_s: float) -> None:
        """Takes back a restarted attention node under its old id, once
        `forget_attention_nodes` dropped its old connections (its proxy's slots
        `reconnect_lane` then waits for)."""
        self.transport.wait_for_peers([peer], timeout_s)

    def lane_region(self) -> LaneHandle | None:
        """The handle of this node's dispatch slots (None: the host lane)."""
        return None if self.lane is None else self.lane.handle

    def reconnect_lane(self, attention_region: LaneHandle) -> None:
        """Reaches a restarted attention node's new combine slots (a slot lane)."""
        if self.lane is None:
            raise RuntimeError(f"expert node {self.settings.node_id} runs the host lane")
        self.lane.reconnect(attention_region, self.settings.node_id)
        if self._graphs is not None:
            self._graphs.clear()  # they write into the old slots

    def abort(self) -> None:
        """Ends the step in progress with an error; called from another thread."""
        self.transport.abort()
        if self.lane is not None:
            self.lane.abort()

    def reset(self, next_step: int) -> None:
        self._ahead = None  # a step opened ahead of a failed one is abandoned with it
        self.transport.reset(next_step)
        if self.lane is not None:
            self.lane.reset(next_step)

    def pid(self) -> int:
        return os.getpid()

    def trace_steps(self, count: int, first: int | None = None) -> None:
        """Records the spans ("wait", "experts" per layer and micro-batch) of `count` steps
        into their results: the next ones, or those from step `first` on. A traced step that
        would replay a graph replays one captured for tracing (the same kernels, plus a timer
        kernel at each span's edges)."""
        self._tracing.arm(count, first)

    # ---- the node's own loop -----------------------------------------------------------------
    def start_loop(self, first_step: int = 0) -> None:
        """Steps on a thread of its own from `first_step` on (`afd.models.step_loop`): each
        time an attention node opens the next step, this node runs it; results go out by
        `poll`. Called again after a halt or a failed step, it goes on from `first_step`."""
        if self._loop is None:
            self._loop = StepLoop(
                f"afd-expert-{self.settings.node_id}",
                lambda step, new, aborts: self.run_step(step),
                lambda: self._ahead is not None,  # else none of its own: attention nodes open
                lambda result: False,
                self._await_opening,
                self.transport.interrupt,
            )
        self._loop.run_from(first_step)

    def _await_opening(self, step: int, look_up: Callable[[], bool]) -> bool:
        """Whether an attention node opened `step` before `look_up()` held."""
        peers = frozenset(self.attention_peers)
        return self.transport.await_frame(is_opening(peers, step), 1.0, look_up)

    def poll(self, timeout_s: float) -> LoopReport[ExpertStepResult]:
        """The loop's step results since the last poll, and where it stands."""
        return self._running_loop().poll(timeout_s)

    def halt(self) -> None:
        """Leaves the wait between steps until `start_loop` (every attention node paused and
        parked at the step this node waits for: none will open it)."""
        self._running_loop().halt()

    def _running_loop(self) -> StepLoop[ExpertStepResult]:
        if self._loop is None:
            raise RuntimeError(f"expert node {self.settings.node_id}: no loop started")
        return self._loop

    @torch.inference_mode()
    def run_step(self, step_id: int) -> ExpertStepResult:
        with self._step_lock:
            return self._run_step(step_id)

    def _run_step(self, step_id: int) -> ExpertStepResult:
        """Opens the step (or takes the one opened ahead), opens the next one if every
        attention node has already opened it (they decode ahead: `_opened_by_all`), then
        closes this one: on a slot lane the GPU goes from one step's graph to the next
        without waiting for this node's host in between."""
        opened, self._ahead = self._ahead, None
        if opened is not None and opened.step != step_id:
            raise RuntimeError(
                f"expert node {self.settings.node_id}: step {opened.step} was opened ahead, "
                f"but step {step_id} was asked for"
            )
        if opened is None:
            opened = self._open(step_id)
        if self._runs_ahead and self._opened_by_all(step_id + 1):
            self._ahead = self._open(step_id + 1)
        return self._close(opened)

    @property
    def _runs_ahead(self) -> bool:
        return self.lane is not None and self._graphs is not None and not self._tracing.armed

    def _opened_by_all(self, step_id: int) -> bool:
        key = RoundKey.control(step_id)
        return all(self.transport.has_frame(p, key) for p in self.attention_peers)

    def _open(self, step_id: int) -> _Opened:
        """Calls the attention nodes to the step, takes their control frames and runs the
        step: on the host lane all of it; on a slot lane its kernels are enqueued (a
        replayed graph for decode steps), with the status word and the counts on their way
        to the host."""
        start = time.perf_counter()
        # tokens per (MoE layer, local expert) — as wide as the layer holding the most — plus a
        # column for slots held elsewhere; counted on the device, read once at the end
        counts = torch.zeros(
            len(self.config.moe_layers),
            self._widest + 1,
            dtype=torch.int64,
            device=self.settings.device,
        )
        self._step_counts = counts  # failover frames answered while gathering count too
        trace = self._trace = (
            StepTrace(self.settings.device) if self._tracing.take(step_id) else None
        )
        call_step(self.transport, self.attention_peers, step_id)  # idle attention nodes join
        t0 = time.perf_counter()
        controls = [
            self._control_frame(p, self.transport.recv(p, RoundKey.control(step_id), self.settings.round_timeout_s))
            for p in self.attention_peers
        ]  # fmt: skip
        wait = time.perf_counter() - t0
        compute, status = 0.0, None
        if self.lane is not None:
            self._lane_step(step_id, controls, counts)
            status = self.lane.status_snapshot()
        else:
            compute, exchange_wait = self._host_step(step_id, counts)
            wait += exchange_wait
        counts_copy = HostCopy(counts) if self.lane is not None else None  # lane: no failovers
        trace = self._trace  # a replayed graph's own, when it stamps the trace
        return _Opened(step_id, start, wait, compute, counts, counts_copy, status, trace)

    def _close(self, opened: _Opened) -> ExpertStepResult:
        """Waits for the step's end (replicas: every attention node's end-of-step marker),
        checks its status and reads its counts."""
        wait = opened.wait
        if self.settings.serve_failovers:
            t0 = time.perf_counter()
            self._gather(RoundKey.end_of_step(opened.step))
            wait += time.perf_counter() - t0
        self.transport.flush(self.settings.round_timeout_s)
        if opened.status is not None:
            opened.status.check(f"expert node {self.settings.node_id}, step {opened.step}")
        # the host lane's late failovers (gathered just above) count into the same tensor
        counted = opened.counts if opened.counts_copy is None else opened.counts_copy.result()
        rows = counted.tolist()
        layer_tokens = [
            row[: len(self.shard.ids_at(layer))]
            for layer, row in zip(self.config.moe_layers, rows, strict=True)
        ]
        totals = dict.fromkeys(self.shard.expert_ids, 0)
        for layer, row in zip(self.config.moe_layers, layer_tokens, strict=True):
            for e, n in zip(self.shard.ids_at(layer), row, strict=True):
                totals[e] = totals.get(e, 0) + n
        stats = self.transport.stats
        trace = opened.trace
        return ExpertStepResult(
            totals,
            opened.compute,
            wait,
            time.perf_counter() - opened.start,
            stats.bytes_sent + stats.bytes_received,
            tuple(tuple(row) for row in layer_tokens),
            () if trace is None else tuple(trace.spans()),
        )

    def _host_step(self, step_id: int, counts: torch.Tensor) -> tuple[float, float]:
        """A step on the host lane: every round's frames gathered, answered; returns the time
        computing and the time waiting."""
        compute = wait = 0.0
        for layer in self.config.moe_layers:
            for mb in range(self.settings.micro_batches):
                key = RoundKey.exchange(step_id, layer, mb)
                self._mark("wait", layer, mb, begin=True)
                t0 = time.perf_counter()
                frames = self._gather(key)
                t1 = time.perf_counter()
                self._mark("wait", layer, mb, begin=False)
                self._mark("experts", layer, mb, begin=True)
                compute += self._answer(key, self.attention_peers, frames, counts)
                self._mark("experts", layer, mb, begin=False)
                wait += t1 - t0
        return compute, wait

    def _lane_step(
        self,
        step_id: int,
        controls: list[tuple[tuple[int, ...], bool]],
        counts: torch.Tensor,
    ) -> None:
        """A step on a slot lane, with the rows of every micro-batch from each attention
        node's control frame: every layer's wait, experts and write-backs on the GPU, a replayed
        CUDA graph when the attention nodes replay theirs (decode steps), else enqueued one by
        one. Its status is checked when the step closes."""
        assert self.lane is not None
        rows_PM = tuple(rows for rows, _ in controls)
        self.lane.begin_step(step_id, [list(rows_M) for rows_M in rows_PM])
        if self._graphs is not None and all(graphed for _, graphed in controls):
            traced = self._trace is not None  # a traced step replays a graph that stamps it
            g = self._graphs.get((rows_PM, traced)) or self._capture(rows_PM, counts, traced)
            g.graph.replay()
            self._trace = None if g.trace is None else g.trace.taken()
            counts.copy_(g.counts)
        else:
            self._lane_layers(rows_PM, counts)

    def _lane_layers(
        self, rows_PM: tuple[tuple[int, ...], ...], counts: torch.Tensor, write_back: bool = True
    ) -> None:
        """Every MoE layer and micro-batch: wait for the attention nodes' rows, run the experts
        over them at once, write each node its sums and release its word. `write_back` False
        (a capture's warm-up): the sums go to scratch memory, for an attention node may not
        have read the sums of the step before yet (it runs ahead, and so may this node)."""
        assert self.lane is not None
        lane, timeout = self.lane, self.settings.round_timeout_s
        for layer in self.config.moe_layers:
            for mb in range(self.settings.micro_batches):
                rows_P = [rows_M[mb] for rows_M in rows_PM]
                self._mark("wait", layer, mb, begin=True)
                lane.wait(layer, mb, timeout, rows_P)
                self._mark("wait", layer, mb, begin=False)
                self._mark("experts", layer, mb, begin=True)
                x_TD, ids_TK, weights_TK = lane.own.micro_batch_rows(mb, rows_P)
                ids_TK = ids_TK.long()
                self._count(layer, ids_TK, counts)
                # (`write_back` False: into scratch memory, on the GPU where the sums are)
                if len(lane.peers) == 1:  # one attention node: the sums go straight into its slot
                    slots, me = lane.peers[0]
                    sink = slots.rows_MPCD[mb, me, : rows_P[0]]
                    out_TD = sink if write_back else torch.empty_like(x_TD)
                    self.shard.forward(layer, x_TD, ids_TK, weights_TK, out_TD=out_TD)
                else:
                    y_TD = self.shard.forward(layer, x_TD, ids_TK, weights_TK)
                    for (slots, me), y_nD in zip(
                        lane.peers, torch.split(y_TD, rows_P), strict=True
                    ):
                        sink = slots.rows_MPCD[mb, me, : y_nD.shape[0]]
                        sink = sink if write_back else torch.empty_like(y_nD)
                        sink.copy_(y_nD, non_blocking=True)  # (proxy lane: into pinned memory)
                for p in range(len(lane.peers)):
                    lane.release(p, layer, mb)
                self._mark("experts", layer, mb, begin=False)

    def _mark(self, name: str, layer: int, micro_batch: int, begin: bool) -> None:
        if self._trace is not None:
            (self._trace.begin if begin else self._trace.end)(name, layer, micro_batch)

    def _capture(
        self, rows_PM: tuple[tuple[int, ...], ...], like: torch.Tensor, traced: bool
    ) -> _LaneGraph:
        """The graph of a lane step for these rows. Its warm-up runs execute with the abort
        word set: their waits end at once, they release nothing and write no peer's slot.
        `traced`: the graph also stamps a StepTrace of its own (the warm-ups stamp a throwaway
        one, so that they run the captured path)."""
        assert self.lane is not None and self._graphs is not None
        counts = torch.zeros_like(like)
        trace = StepTrace(like.device) if traced else None

        def body(write_back: bool) -> None:
            counts.zero_()
            self._lane_layers(rows_PM, counts, write_back)

        device = counts.device
        self.lane.quiet()
        self._trace = StepTrace(device) if traced else None  # the captured path, thrown away
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            body(False)
            body(False)
        self._trace = trace
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread-local: another thread may enqueue CUDA work meanwhile (an abort's copy on a
        # stream of its own), which a global capture would refuse, failing the capture
        with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
            body(True)
        torch.cuda.synchronize(device)
        self.lane.reset()
        g = self._graphs[rows_PM, traced] = _LaneGraph(graph, counts, trace)
        return g

    def _control_frame(self, peer: int, frame: list[torch.Tensor]) -> tuple[tuple[int, ...], bool]:
        """A control frame: the rows of each micro-batch this step (within the slots, on the
        slot lane), and whether the attention node replays a graph (then so may we)."""
        capacity = None if self.lane is None else self.lane.own.layout.capacity
        what = f"expert node {self.settings.node_id}, peer {peer}"
        return read_control_frame(frame, self.settings.micro_batches, capacity, what)

    def _count(self, layer: int, ids_TK: torch.Tensor, counts: torch.Tensor) -> None:
        """Adds the layer's tokens per local expert (no host sync: bincount would size its
        output); slots held elsewhere count in the last column."""
        counts_C = counts[self._moe_row[layer]]
        if kernels.usable(ids_TK):
            from afd.models.kernels.small_ops import count_slots

            count_slots(ids_TK, counts_C)
            return
        elsewhere = counts.shape[1] - 1
        slots = torch.where(ids_TK >= 0, ids_TK, elsewhere).reshape(-1)
        counts_C.scatter_add_(0, slots, torch.ones_like(slots))

    def _gather(self, key: RoundKey) -> list[list[torch.Tensor]]:
        """One frame from every attention node under `key`, answering failovers meanwhile."""
        timeout = self.settings.round_timeout_s
        if not self.settings.serve_failovers:
            return [
                self._frame(p, key, self.transport.recv(p, key, timeout))
                for p in self.attention_peers
            ]
        frames: dict[int, list[torch.Tensor]] = {}
        waiting = set(self.attention_peers)
        while waiting:
            peer, got, frame = self.transport.recv_any(
                lambda p, k: (
                    (k == key and p in waiting)
                    or (k.step == key.step and k.kind == FrameKind.FAILOVER)
                ),
                timeout,
            )
            if got == key:
                frames[peer] = self._frame(peer, key, frame)
                waiting.discard(peer)
            else:
                self._answer(got, [peer], [self._frame(peer, got, frame)], self._step_counts)
        return [frames[p] for p in self.attention_peers]

    def _answer(
        self,
        key: RoundKey,
        peers: list[int],
        frames: list[list[torch.Tensor]],
        counts: torch.Tensor | None,
    ) -> float:
        """Runs the experts over the frames' tokens at once and sends each peer its partial
        sums; returns the compute time."""
        start = time.perf_counter()
        x_TD = torch.cat([f[0] for f in frames])
        ids_TK = torch.cat([f[1] for f in frames]).long()
        weights_TK = torch.cat([f[2] for f in frames]).to(x_TD.dtype)
        if counts is not None:
            self._count(key.layer, ids_TK, counts)
        y_TD = self.shard.forward(key.layer, x_TD, ids_TK, weights_TK)
        for peer, y_nD in zip(
            peers, torch.split(y_TD, [f[0].shape[0] for f in frames]), strict=True
        ):
            self.transport.send(peer, key, [y_nD])
        return time.perf_counter() - start

    def _frame(self, peer: int, key: RoundKey, frame: list[torch.Tensor]) -> list[torch.Tensor]:
        if key.kind == FrameKind.END_OF_STEP:
            return frame
        return self._checked(peer, frame, len(self.shard.ids_at(key.layer)))

    def _checked(self, peer: int, frame: list[torch.Tensor], local: int) -> list[torch.Tensor]:
        """A dispatch frame is x [n, D], local ids [n, K] within the layer's `local` experts
        here, weights [n, K]. With fp8 dispatch x comes packed (`pack_rows`: E4M3 rows and
        their scales, which must be finite and positive) and leaves here in the model's dtype.
        The values are checked with one read on the host (on a GPU each read waits)."""
        c = self.config
        ok, valid = len(frame) == 3, None
        if ok and self.settings.dispatch_fp8:
            try:
                q, scale = unpack_rows(frame[0], c.hidden_size)
            except ValueError:
                ok = False
            else:
                valid = (torch.isfinite(scale) & (scale > 0)).all()
                frame = [dequantize_rows(q, scale, DTYPES[self.settings.dtype]), *frame[1:]]
        if ok:
            x, ids, w = frame
            n = x.shape[0]
            ok = (
                x.shape == (n, c.hidden_size)
                and ids.shape == w.shape == (n, c.top_k)
                and not ids.is_floating_point()
            )
            if ok:
                ids_ok = ((ids >= -1) & (ids < local)).all()
                ok = bool(ids_ok if valid is None else ids_ok & valid)
        if not ok:
            shapes = [list(t.shape) for t in frame]
            raise TransportError(
                f"expert node {self.settings.node_id}: malformed dispatch frame from peer {peer}: {shapes}"
            )
        return frame

    def shutdown(self) -> None:
        if self._loop is not None:  # a step in progress ends now, not at a dead peer's deadline
            self.abort()
            self._loop.stop()
        self.transport.close()
        if self.lane is not None:
            self.lane.close_after_gpu()
