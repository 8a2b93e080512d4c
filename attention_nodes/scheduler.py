"""Continuous batching for one attention node: which sequences run which tokens this step.

Sequences join and leave at step boundaries. Each step schedules one decode token for every
running sequence first, then prefill chunks (oldest first) up to the token budget. A sequence
whose KV blocks cannot be found preempts the youngest other sequence, which later recomputes
its prompt and output so far; old requests are never failed for young ones.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from afd.attention_nodes.paged_kv_cache import PagedKVCache
from afd.models.request_state import RequestState


@dataclass(eq=False)
class ScheduledSequence:
    """A request as the scheduler sees it: its KV cache id and how far its cache is filled."""

    seq_id: int  # the KV cache's name for it; new on each admission (a re-prefill gets another)
    state: RequestState  # prompt, output so far, sampler, stop rules
    num_computed: int = 0  # tokens whose K/V are in the cache

    @property
    def request_id(self) -> str:
        return self.state.request_id

    @property
    def pending(self) -> list[int]:
        return self.state.all_ids[self.num_computed :]


@dataclass(frozen=True, slots=True)
class Chunk:
    seq: ScheduledSequence
    num_tokens: int

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's last known token, so the next token is sampled."""
        return self.seq.num_computed + self.num_tokens == len(self.seq.state.all_ids)


@dataclass
class Scheduler:
    cache: PagedKVCache
    max_batch_tokens: int
    max_running: int
    waiting: deque[ScheduledSequence] = field(default_factory=deque)
    running: list[ScheduledSequence] = field(default_factory=list)  # oldest first
    preemptions: int = 0

    def add(self, seq: ScheduledSequence) -> None:
        self.waiting.append(seq)

    def remove(self, request_id: str) -> ScheduledSequence | None:
        for seq in [*self.running, *self.waiting]:
            if seq.request_id == request_id:
                self._drop(seq)
                return seq
        return None

    def finish(self, seq: ScheduledSequence) -> None:
        self._drop(seq)

    def schedule(self) -> list[Chunk]:
        budget, chunks = self.max_batch_tokens, []
        for seq in sorted(self.running, key=lambda s: len(s.pending) > 1):  # decodes first
            if budget == 0 or seq not in self.running:
                continue
            n = min(len(seq.pending), budget)
            if self._reserve_or_preempt(seq, seq.num_computed + n):
                chunks.append(Chunk(seq, n))
                budget -= n
        chunks = [c for c in chunks if c.seq in self.running]  # a later reserve may preempt
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            seq = self.waiting[0]
            n = min(len(seq.pending), budget)
            if not self.cache.reserve(seq.seq_id, seq.num_computed + n):
                break
            self.running.append(self.waiting.popleft())
            chunks.append(Chunk(seq, n))
            budget -= n
        return chunks

    def _reserve_or_preempt(self, seq: ScheduledSequence, total: int) -> bool:
        while not self.cache.reserve(seq.seq_id, total):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: ScheduledSequence) -> None:
        self.running.remove(seq)
        self.cache.free(seq.seq_id)
        seq.num_computed = 0
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _drop(self, seq: ScheduledSequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.cache.free(seq.seq_id)
