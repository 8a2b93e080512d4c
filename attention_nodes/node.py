"""The attention node: holds everything but the routed experts and the KV cache of its own
requests, and runs its decode steps on a loop of its own (`start_loop`): the orchestrator hands
it requests and takes its tokens, but is never in a step. With expert nodes, every attention
node runs every step, in lockstep through the exchange's control round
(`afd.transport.step_control`).

Colocated (no expert placement: `experts.nodes: 0`), it holds every expert too and the same
pipeline runs with a local dispatcher: the one-GPU deployment, and the baseline that
disaggregation must beat. It then has no transport at all.

A plain class: Ray wraps it as an actor, tests may run it in-process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from afd.attention_nodes.decode_graphs import DecodeGraphs
from afd.attention_nodes.device_dispatch import DeviceDispatcher
from afd.attention_nodes.expert_routing import ExpertRouting
from afd.attention_nodes.paged_kv_cache import PagedKVCache
from afd.attention_nodes.pipeline import PingPongPipeline
from afd.attention_nodes.remote_dispatch import RemoteDispatcher
from afd.attention_nodes.scheduler import Chunk, ScheduledSequence, Scheduler
from afd.models.batch import TokenBatch
from afd.models.checkpoint import open_checkpoint
from afd.models.config import DTYPES, load_config
from afd.models.expert_placement import ExpertPlacement
from afd.models.messages import AttentionStepResult, NewRequest, StepTimings, TokenOutput
from afd.models.model import AttentionSideModel
from afd.models.moe import Dispatcher, ExpertShard, LocalDispatcher
from afd.models.request_state import RequestState, check_prompt
from afd.models.sampling import RowSampling, SampledRows, draw_rows, sample_rows
from afd.models.step_loop import LoopReport, StepLoop
from afd.models.step_trace import StepsToTrace, StepTrace
from afd.models.tokenizer import Tokenizer
from afd.transport.device_lane import DeviceLane
from afd.transport.endpoint import PeerAddress, Transport, TransportSettings
from afd.transport.lanes import SLOT_LANES, LaneHandle, open_lane
from afd.transport.proxy_lane import ProxyLane
from afd.transport.slots import SlotKind, SlotLayout
from afd.transport.step_control import is_call


@dataclass(frozen=True, slots=True)
class AttentionNodeSettings:
    node_id: int
    model_dir: str
    dtype: str = "float32"
    load_format: str = "auto"  # "dummy": random weights from config.json alone
    quantization: str = "none"  # "fp8": projections and experts in block-scaled fp8
    micro_batches: int = 1
    kv_blocks: int = 256
    block_size: int = 16
    max_batch_tokens: int = 512
    max_running: int = 64
    round_timeout_s: float = 30.0
    transport: TransportSettings = field(default_factory=TransportSettings)
    device: str = "cpu"  # "cuda": the GPU Ray gave this actor
    cuda_graphs: bool = True  # colocated on CUDA: decode-only steps replay CUDA graphs
    cuda_graph_context: int = 0  # >0: at start, capture every batch bucket up to this context
    # "device": expert rows and sums through shared slots (peers of one host); "proxy": the
    # same slots, moved between hosts by a proxy thread on each node
    lane: str = "host"
    decode_ahead: bool = True  # colocated or device lane: launch step n+1 before reading n's tokens
    dispatch_fp8: bool = False  # host lane: rows go to expert nodes in E4M3 with their scales


def split_micro_batches(chunks: list[Chunk], m: int) -> list[list[Chunk]]:
    """m contiguous groups of about equal token counts; a sequence's chunk is never split."""
    total = sum(c.num_tokens for c in chunks)
    groups: list[list[Chunk]] = [[] for _ in range(m)]
    done = 0
    for c in chunks:  # each chunk goes to the group its middle token falls in
        j = min(m - 1, (2 * done + c.num_tokens) * m // (2 * total)) if total else 0
        groups[j].append(c)
        done += c.num_tokens
    return groups


class AttentionNode:
    def __init__(self, settings: AttentionNodeSettings, placement: ExpertPlacement | None) -> None:
        self.settings = settings
        self.placement = placement
        self.placement_version = 0  # the rebalance whose placement this node routes by
        self._tracing = StepsToTrace()
        self.config = load_config(settings.model_dir)
        self.checkpoint = open_checkpoint(settings.model_dir, settings.load_format, settings.device)
        self.device = torch.device(settings.device)
        self.model = AttentionSideModel.load(
            self.checkpoint, self.config, DTYPES[settings.dtype], settings.quantization
        ).to(self.device)
        self.tokenizer = Tokenizer(settings.model_dir)
        c = self.config
        self.cache = PagedKVCache(
            c.num_layers,
            settings.kv_blocks,
            settings.block_size,
            c.num_kv_heads,
            c.head_dim,
            DTYPES[settings.dtype],
            self.device,
        )
        self.scheduler = Scheduler(self.cache, settings.max_batch_tokens, settings.max_running)
        self.transport: Transport | None = None
        self.lane: DeviceLane | ProxyLane | None = None  # a slot lane's slots, once connected
        self.pipeline: PingPongPipeline | None = None
        self.routing: ExpertRouting | None = None  # the remote dispatcher's, once connected
        self.graphs: DecodeGraphs | None = None  # colocated on CUDA: decode steps replay graphs
        if placement is None:
            if settings.lane != "host":
                raise ValueError("a colocated node has no exchange: lane must be 'host'")
            shard = ExpertShard.load(
                self.checkpoint,
                c,
                range(c.num_experts),
                DTYPES[settings.dtype],
                settings.quantization,
            ).to(self.device)
            dispatcher = LocalDispatcher(shard)
            self.pipeline = PingPongPipeline(self.model, self.cache, dispatcher)
            self._use_graphs(dispatcher)
        else:
            self.transport = Transport(settings.node_id, settings.transport, settings.device)
        self._next_seq_id = 0
        self._launched: _Launched | None = None  # a decode step launched ahead, tokens unread
        self.steps_ahead = 0  # decode steps launched before the previous one's tokens were read
        self._expert_peers: frozenset[int] = frozenset()
        self._loop: StepLoop[AttentionStepResult] | None = None

    def _use_graphs(self, dispatcher: Dispatcher, micro_batches: int = 1) -> None:
        """Decode-only steps replay CUDA graphs: colocated, or over a slot lane, whose
        exchange's kernels are captured with the rest of the step (the ping-pong pipeline of
        `micro_batches` in one graph). A colocated node that decodes ahead runs the same
        decode step eagerly where there are no graphs (CPU), so that one path serves both."""
        s = self.settings
        graphs = self.device.type == "cuda" and s.cuda_graphs
        if not graphs and not (self._decodes_ahead and self.placement is None):
            return  # (a lane step's waits block on the CPU: it cannot run ahead there)
        self.graphs = DecodeGraphs(
            self.model,
            self.cache.k_LNBBSGDh,
            self.cache.v_LNBBSGDh,
            dispatcher,
            self.cache.scratch_block,
            -(-self.config.max_position_embeddings // s.block_size),
            micro_batches,
            capture=graphs,
        )
        if s.cuda_graph_context and graphs:  # capture now, not in the first requests' steps
            self.graphs.prepare(list(range(1, s.max_running + 1)), s.cuda_graph_context)

    @property
    def _decodes_ahead(self) -> bool:
        """Decode steps are launched before the previous one's tokens are read: colocated, or
        over a slot lane (whose step status is read asynchronously); the host lane moves
        every frame on the host, so there is nothing to run ahead of."""
        s = self.settings
        return s.decode_ahead and (self.placement is None or s.lane in SLOT_LANES)

    def address(self) -> PeerAddress | None:
        """Where expert nodes' frames reach this node (None: colocated, no exchange)."""
        return None if self.transport is None else self.transport.address

    def loaded_tensor_names(self) -> list[str]:
        return list(self.checkpoint.names_read)

    def connect(
        self,
        expert_peers: list[tuple[int, PeerAddress]],
        lane_regions: list[LaneHandle] | None = None,
    ) -> LaneHandle | None:
        """Opens one endpoint to every expert node, in expert-node order (colocated: none). On
        a slot lane (device, proxy), also reaches the expert nodes' dispatch slots
        (`lane_regions`, same order) and returns the handle of this node's combine slots, for
        the expert nodes."""
        if self.transport is None or self.placement is None:
            return None
        for peer, address in expert_peers:
            self.transport.connect(peer, address)
        peers, s = [p for p, _ in expert_peers], self.settings
        self._expert_peers = frozenset(peers)
        dispatcher: DeviceDispatcher | RemoteDispatcher
        if s.lane in SLOT_LANES:
            if lane_regions is None or len(lane_regions) != len(peers):
                raise ValueError(f"the {s.lane} lane needs every expert node's slots")
            if self.lane is not None:
                self.lane.close_after_gpu()
            c = self.config
            layout = SlotLayout(
                SlotKind.COMBINE, s.micro_batches, len(peers), s.max_batch_tokens,
                c.hidden_size, c.top_k, DTYPES[s.dtype],
            )  # fmt: skip
            self.lane = open_lane(
                s.lane, layout, s.node_id, peers, c.num_layers, max(c.moe_layers), self.device,
                s.transport, s.round_timeout_s,
            )  # fmt: skip
            self.lane.connect(lane_regions, s.node_id)
            dispatcher = DeviceDispatcher(
                self.transport, self.lane, peers, self.placement, s.round_timeout_s
            )
            self._use_graphs(dispatcher, s.micro_batches)
        else:
            dispatcher = RemoteDispatcher(
                self.transport, self.placement, peers, s.round_timeout_s, self.device,
                fp8_rows=s.dispatch_fp8,
            )  # fmt: skip
        self.routing = dispatcher.routing
        self.pipeline = PingPongPipeline(self.model, self.cache, dispatcher)
        return None if self.lane is None else self.lane.handle

    def lane_region(self) -> LaneHandle | None:
        """The handle of this node's combine slots (None: the host lane)."""
        return None if self.lane is None else self.lane.handle

    def reconnect(
        self, peer: int, address: PeerAddress, lane_region: LaneHandle | None = None
    ) -> None:
        """Connects to a restarted expert node under its old id (on a slot lane, to its new
        slots too)."""
        assert self.transport is not None, "a colocated node has no expert peers"
        self.transport.forget_peer(peer)
        self.transport.connect(peer, address)
        if self.lane is not None:
            if lane_region is None:
                raise ValueError(
                    f"the {self.settings.lane} lane needs the restarted expert node's slots"
                )
            self.lane.reconnect(lane_region, self.settings.node_id)
            if self.graphs is not None:
                self.graphs.clear()

    def abort(self) -> None:
        """Ends the step in progress with an error (the orchestrator calls it from another
        thread when a peer died). Nothing of that step is applied: sequences only advance
        after the whole pipeline ran, and KV written past them is overwritten next time."""
        if self.transport is not None:
            self.transport.abort()
        if self.lane is not None:
            self.lane.abort()

    def trace_steps(self, count: int, first: int | None = None) -> None:
        """Records the spans of `count` steps into their results: the next ones, or those from
        step `first` on. A traced decode step replays a graph captured for tracing (the same
        kernels, plus one timer kernel at each span's edges); on CPU it runs eagerly."""
        self._tracing.arm(count, first)

    def set_placement(self, version: int, placement: ExpertPlacement) -> None:
        """Routes by rebalance `version`'s placement from the next step on (the orchestrator
        calls it at a step boundary, once every expert node holds its new experts)."""
        if self.placement is None:
            raise RuntimeError("a colocated node holds every expert: it has no placement")
        if version == self.placement_version:
            return
        self.placement = placement
        in_place = self.routing is None or self.routing.switch(placement)
        if self.graphs is not None and not in_place:
            self.graphs.clear()  # they hold the old routing tables
        self.placement_version = version

    def expert_lost(self, peer: int) -> None:
        """An expert node died and its experts have replicas: route around it at once, within
        the step in progress (called from another thread, like `abort`)."""
        if self.transport is not None:
            self.transport.mark_lost(peer)

    def reset(self, next_step: int) -> None:
        self._launched = None  # a step launched ahead of a failed one is abandoned with it
        if self.transport is not None:
            self.transport.reset(next_step)
        if self.lane is not None:
            self.lane.reset(next_step)

    # ---- the node's own loop ---------------------------------------------------------------
    def start_loop(self, first_step: int = 0) -> None:
        """Steps on a thread of its own from `first_step` on (`afd.models.step_loop`): requests
        come in by `submit`, results go out by `poll`. Colocated, it sleeps while it has
        nothing to run; with expert nodes, it also wakes when one calls it to the next step
        (another attention node has work), so that all step in lockstep. Called again after
        a halt or a failed step, it goes on from `first_step`."""
        if self._loop is None:
            self._loop = StepLoop(
                f"afd-attention-{self.settings.node_id}",
                self.step,
                lambda: bool(self.scheduler.running or self.scheduler.waiting or self._launched),
                lambda result: result.tokens == 0,
                None if self.transport is None else self._await_call,
                (lambda: None) if self.transport is None else self.transport.interrupt,
                lambda: self._launched is not None,  # paused, it still reads what it launched
            )
        self._loop.run_from(first_step)

    def _await_call(self, step: int, look_up: Callable[[], bool]) -> bool:
        """Whether an expert node called this node to `step` before `look_up()` held."""
        assert self.transport is not None
        return self.transport.await_frame(is_call(self._expert_peers, step), 1.0, look_up)

    def submit(self, new: list[NewRequest], aborts: list[str]) -> None:
        """Hands requests and aborts to the loop; they join at its next step."""
        self._running_loop().submit(new, aborts)

    def poll(self, timeout_s: float) -> LoopReport[AttentionStepResult]:
        """The loop's step results since the last poll (waiting up to `timeout_s` for one),
        and where it stands: what stopped it, if a step failed."""
        return self._running_loop().poll(timeout_s)

    def pause(self) -> None:
        """Starts no step of its own from now on (still joins the others'): see StepLoop. A
        step launched ahead opens the next step on its own, so none is from now on."""
        self._running_loop().pause()

    def halt(self) -> None:
        """Leaves the wait between steps until `start_loop` (every node paused and parked)."""
        self._running_loop().halt()

    def _running_loop(self) -> StepLoop[AttentionStepResult]:
        if self._loop is None:
            raise RuntimeError(f"attention node {self.settings.node_id}: no loop started")
        return self._loop

    def pid(self) -> int:
        return os.getpid()

    @torch.inference_mode()
    def step(self, step_id: int, new: list[NewRequest], aborts: list[str]) -> AttentionStepResult:
        if self.pipeline is None:
            raise RuntimeError(f"attention node {self.settings.node_id}: step before connect")
        for request_id in aborts:  # freed blocks a launched step still writes: stream order
            self.scheduler.remove(request_id)  # puts that write before any later use of them
        for r in new:
            self._admit(r)
        if self._launched is not None:
            return self._step_launched(step_id, go_on=not new and not aborts)
        chunks = self.scheduler.schedule()
        traced = self._tracing.take(step_id)
        decode_only = chunks and all(c.num_tokens == 1 for c in chunks)
        if self.graphs is not None and decode_only and (not traced or self.graphs.capture):
            return self._graph_step(step_id, chunks, traced)
        trace = StepTrace(self.device) if traced else None
        groups = split_micro_batches(chunks, self.settings.micro_batches)
        batches = [
            TokenBatch.build(
                [(c.seq.seq_id, c.seq.pending[: c.num_tokens], c.seq.num_computed) for c in g]
            )
            for g in groups
        ]
        rows = [_sample_rows(g, b).to(self.device) for g, b in zip(groups, batches, strict=True)]
        batches = [b.to(self.device) for b in batches]
        rows_M = [b.token_ids.shape[0] for b in batches]
        self.pipeline.dispatcher.begin_step(step_id, rows_M, graphed=False)
        logits, timings = self.pipeline.run(step_id, batches, rows, trace)
        self.pipeline.dispatcher.end_step(step_id)
        moved = 0
        if self.transport is not None:
            self.transport.flush(self.settings.round_timeout_s)
            moved = self.transport.stats.bytes_sent + self.transport.stats.bytes_received
        outputs = [
            out for g, lg in zip(groups, logits, strict=True) for out in self._advance(g, lg)
        ]
        return AttentionStepResult(
            outputs,
            timings,
            sum(c.num_tokens for c in chunks),
            len(self.scheduler.running),
            len(self.scheduler.waiting),
            self.cache.allocator.free,
            moved,
            () if trace is None else tuple(trace.spans()),
        )

    def prepare_graphs(self, batch_sizes: list[int], context: int) -> None:
        """Captures the decode graphs these batch sizes need up to `context` tokens a sequence
        (colocated CUDA nodes; elsewhere nothing to do)."""
        if self.graphs is not None:
            self.graphs.prepare(batch_sizes, context)

    def _graph_step(self, step_id: int, chunks: list[Chunk], traced: bool) -> AttentionStepResult:
        """A decode-only step: the whole forward replays a CUDA graph (colocated, or with
        the device lane's exchange inside it). Decoding ahead, the next step is launched
        before this one's tokens are read (`_launch_next`). `traced`: a graph that stamps
        the step's trace (`DecodeGraphs.run`)."""
        assert self.graphs is not None
        start = time.perf_counter()
        if not all(c.samples for c in chunks):  # a 1-token prefill chunk that does not sample
            dispatcher = self._dispatcher()
            self._begin(step_id, len(chunks))
            logits_BV = self.graphs.run(
                [c.seq.pending[0] for c in chunks],
                [c.seq.num_computed for c in chunks],
                [self.cache.tables[c.seq.seq_id] for c in chunks],
                traced,
            )
            trace = self.graphs.last_trace
            dispatcher.end_step(step_id)
            sampled = [i for i, c in enumerate(chunks) if c.samples]
            outputs = self._advance(chunks, logits_BV[sampled])
            return self._result(outputs, len(chunks), start, trace)
        rows = [c.seq.state.sampling() for c in chunks]
        launched = self._launch(
            step_id,
            chunks,
            [c.seq.pending[0] for c in chunks],
            [c.seq.num_computed for c in chunks],
            rows,
            traced,
        )
        return self._finish(launched, step_id + 1, go_on=True, start=start)

    def _step_launched(self, step_id: int, go_on: bool) -> AttentionStepResult:
        """This call's step was launched by the last one: its tokens are read now, after the
        next step is launched in turn (unless new work or aborts came: then the next step is
        scheduled afresh)."""
        launched, self._launched = self._launched, None
        assert launched is not None
        if launched.step_id != step_id:
            raise RuntimeError(
                f"attention node {self.settings.node_id}: step {launched.step_id} was launched "
                f"ahead, but step {step_id} was asked for"
            )
        return self._finish(launched, step_id + 1, go_on, time.perf_counter())

    def _finish(
        self, launched: _Launched, next_step: int, go_on: bool, start: float
    ) -> AttentionStepResult:
        paused = self._loop is not None and self._loop.paused
        if go_on and self._decodes_ahead and not self._tracing.armed and not paused:
            self._launched = self._launch_next(launched, next_step)
            self.steps_ahead += self._launched is not None
        tokens, logprobs = launched.sampled.result()
        self._dispatcher().end_step(launched.step_id)  # raises if its exchange failed
        live = set(self.scheduler.running)  # a sequence finished or aborted since: not it
        outputs = self._record(
            [
                (c, t, lp)
                for c, t, lp in zip(launched.chunks, tokens, logprobs, strict=True)
                if c.seq in live
            ]
        )
        return self._result(outputs, len(launched.chunks), start, launched.trace)

    def _launch_next(self, launched: _Launched, step_id: int) -> _Launched | None:
        """The decode step after `launched`, launched now, its input tokens those `launched`
        samples on the device: every running sequence one more token, except those that
        certainly end with `launched`'s (length). A sequence that ends otherwise (a stop
        token or string) computes one row for nothing. None when the next step is not such a
        step (waiting sequences it could admit, a sequence not in `launched`) or its KV blocks
        are not free."""
        chunks, scheduler = launched.chunks, self.scheduler
        if scheduler.waiting and len(scheduler.running) < scheduler.max_running:
            return None  # the next step admits some (with max_running reached, it cannot)
        running = set(scheduler.running)
        if len(running) != len(chunks) or any(c.seq not in running for c in chunks):
            return None
        keep = [i for i, c in enumerate(chunks) if not _ends_with_next_token(c.seq)]
        if not keep:
            return None
        for i in keep:
            seq = chunks[i].seq
            if not self.cache.reserve(seq.seq_id, seq.num_computed + 2):
                return None  # the scheduler will preempt, with the tokens read
        nxt = [Chunk(chunks[i].seq, 1) for i in keep]
        tokens_B = launched.sampled.tokens_B
        if len(keep) < len(chunks):  # the index goes over without a wait for the stream
            index = torch.tensor(keep)
            if self.device.type == "cuda":
                index = index.pin_memory()
            tokens_B = tokens_B[index.to(self.device, non_blocking=True)]
        rows = [_after(c.seq.state.sampling()) for c in nxt]
        positions = [c.seq.num_computed + 1 for c in nxt]
        return self._launch(step_id, nxt, tokens_B, positions, rows)

    def _launch(
        self,
        step_id: int,
        chunks: list[Chunk],
        token_ids: list[int] | torch.Tensor,
        positions: list[int],
        rows: list[RowSampling],
        traced: bool = False,
    ) -> _Launched:
        """Launches a decode step of one sampling token a chunk (`token_ids` on the host, or
        on the device: sampled by the step before, not read yet) and its sampling."""
        assert self.graphs is not None
        self._begin(step_id, len(chunks))
        logits_BV = self.graphs.run(
            token_ids, positions, [self.cache.tables[c.seq.seq_id] for c in chunks], traced
        )
        self._dispatcher().launched(step_id)
        return _Launched(step_id, chunks, draw_rows(logits_BV, rows), self.graphs.last_trace)

    def _begin(self, step_id: int, batch: int) -> None:
        assert self.graphs is not None
        self._dispatcher().begin_step(
            step_id,
            self.graphs.rows_per_micro_batch(batch),
            graphed=self.graphs.capture,
            real_rows=self.graphs.real_rows_per_micro_batch(batch),
        )

    def _dispatcher(self) -> Dispatcher:
        assert self.pipeline is not None
        return self.pipeline.dispatcher

    def _result(
        self,
        outputs: list[TokenOutput],
        tokens: int,
        start: float,
        trace: StepTrace | None = None,
    ) -> AttentionStepResult:
        total = time.perf_counter() - start
        return AttentionStepResult(
            outputs,
            StepTimings(total, total),
            tokens,
            len(self.scheduler.running),
            len(self.scheduler.waiting),
            self.cache.allocator.free,
            0,
            () if trace is None else tuple(trace.spans()),
        )

    def _admit(self, r: NewRequest) -> None:
        check_prompt(r.prompt_ids, r.params, self.config)
        state = RequestState(r.request_id, r.prompt_ids, r.params, self.tokenizer, self.config)
        self.scheduler.add(ScheduledSequence(self._next_seq_id, state))
        self._next_seq_id += 1

    def _advance(self, group: list[Chunk], logits_BV: torch.Tensor) -> list[TokenOutput]:
        """Samples the next token of every chunk that reached its sequence's end, all rows at
        once on the logits' device (each request's draws depend on its seed alone)."""
        sampling = [c for c in group if c.samples]
        for c in group:
            if not c.samples:
                c.seq.num_computed += c.num_tokens
        if not sampling:
            return []
        tokens, logprobs = sample_rows(logits_BV, [c.seq.state.sampling() for c in sampling])
        return self._record(list(zip(sampling, tokens, logprobs, strict=True)))

    def _record(self, sampled: list[tuple[Chunk, int, float]]) -> list[TokenOutput]:
        """Each sampling chunk's sequence moves past its tokens and takes its sampled one."""
        outputs = []
        for c, token_id, logprob in sampled:
            c.seq.num_computed += c.num_tokens
            token = c.seq.state.record(token_id, logprob)
            outputs.append(token)
            if token.finish_reason is not None:
                self.scheduler.finish(c.seq)
        return outputs

    def shutdown(self) -> None:
        if self._loop is not None:  # a step in progress ends now, not at a dead peer's deadline
            self.abort()
            self._loop.stop()
        if self.transport is not None:
            self.transport.close()
        if self.lane is not None:
            self.lane.close_after_gpu()


@dataclass(frozen=True, slots=True)
class _Launched:
    """A decode step on the device whose tokens the host has not read yet."""

    step_id: int
    chunks: list[Chunk]  # one sampling token each
    sampled: SampledRows
    trace: StepTrace | None = None  # the graph's, stamped by this step (a traced step)


def _ends_with_next_token(seq: ScheduledSequence) -> bool:
    """Whether the token being sampled for `seq` certainly ends it (max_tokens, context)."""
    state = seq.state
    return (
        len(state.output_ids) + 1 >= state.params.max_tokens
        or len(state.all_ids) + 1 >= state.context_limit
    )


def _after(rows: RowSampling) -> RowSampling:
    """The sampling of the token after the one being sampled (its draw counter one on)."""
    return replace(rows, counter=rows.counter + 1)


def _sample_rows(group: list[Chunk], batch: TokenBatch) -> torch.Tensor:
    keep = torch.tensor([i for i, c in enumerate(group) if c.samples], dtype=torch.int64)
    return batch.last_token_indices()[keep]
