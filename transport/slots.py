"""The exchange's slot layout: fixed buffers, allocated once, that peers write into.

A node owns one *region* for what it receives. An expert node's region holds a dispatch slot
per (micro-batch, attention peer): token rows, their local expert ids and weights. An attention
node's region holds a combine slot per (micro-batch, expert peer): the partial sums, in the
attention node's own row order. Every slot has a monotonic sequence word; the writer fills the
slot, then stores the round's sequence number into the word, and the reader waits until the
word reaches it. Rows of one micro-batch sit contiguously across peers, so an expert node runs
its experts over a view, with no gather.

The region also holds this node's abort word (set from the host to end every wait at once) and
its status word (the first wait that ended without its data says why; zero means all is well).

Writers never overrun readers: an attention node writes layer l+1's dispatch only after it
read layer l's combine, which the expert node wrote only after it read layer l's dispatch.

Shape legend: M = micro-batches, P = peers writing into the region, C = rows per slot
(capacity), D = hidden, K = top-k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

import torch

ALIGN = 256  # bytes: every array starts on a boundary any dtype (and a GPU load) is happy with
WORD_DTYPE = torch.int64
LOCAL_ID_DTYPE = torch.int16


class SlotKind(IntEnum):
    DISPATCH = 1  # rows, local ids, weights: received by an expert node
    COMBINE = 2  # partial sums: received by an attention node


class WaitStatus(IntEnum):
    """What the status word says after a wait that did not see its data."""

    OK = 0
    ABORTED = 1  # this node's abort word was set
    DEADLINE = 2  # the peer did not write in time


def sequence(step: int, layer: int, num_layers: int) -> int:
    """The sequence number of (step, layer): monotonic over a node's life, never 0 (a fresh
    word reads 0: nothing written yet)."""
    return step * num_layers + layer + 1


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True, slots=True)
class SlotLayout:
    """Where each array of a region lies, in bytes from its start."""

    kind: SlotKind
    micro_batches: int
    peers: int
    capacity: int
    hidden: int
    top_k: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        for name in ("micro_batches", "peers", "capacity", "hidden", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"slot layout: {name} must be >= 1, got {getattr(self, name)}")

    @property
    def _rows_shape(self) -> tuple[int, int, int, int]:
        return (self.micro_batches, self.peers, self.capacity, self.hidden)

    @property
    def _pairs_shape(self) -> tuple[int, int, int, int]:
        return (self.micro_batches, self.peers, self.capacity, self.top_k)

    def _arrays(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        arrays = [
            ("words", WORD_DTYPE, (self.micro_batches, self.peers)),
            ("control", WORD_DTYPE, (2,)),  # abort, status
            ("rows", self.dtype, self._rows_shape),
        ]
        if self.kind == SlotKind.DISPATCH:
            arrays += [
                ("local_ids", LOCAL_ID_DTYPE, self._pairs_shape),
                ("weights", self.dtype, self._pairs_shape),
            ]
        return arrays

    def offsets(self) -> dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]]:
        """name -> (byte offset, bytes, dtype, shape) of every array."""
        out, at = {}, 0
        for name, dtype, shape in self._arrays():
            n = dtype.itemsize * math.prod(shape)
            out[name] = (at, n, dtype, shape)
            at += _aligned(n)
        return out

    @property
    def nbytes(self) -> int:
        at, n, _, _ = list(self.offsets().values())[-1]
        return at + _aligned(n)


class SlotRegion:
    """Typed views of one region's bytes (the owner's memory, or a peer's mapping of it)."""

    def __init__(
        self, layout: SlotLayout, memory_N: torch.Tensor, words_MP: torch.Tensor | None = None
    ) -> None:
        """`words_MP`: the sequence words somewhere else than in `memory_N` (the proxy lane
        keeps them in pinned host memory, where both its proxy thread and the GPU see them)."""
        if memory_N.dtype != torch.uint8 or memory_N.numel() < layout.nbytes:
            raise ValueError(
                f"slot region needs {layout.nbytes} bytes of uint8, got {memory_N.numel()} of {memory_N.dtype}"
            )
        self.layout, self.memory_N = layout, memory_N
        views = {}
        for name, (at, n, dtype, shape) in layout.offsets().items():
            views[name] = memory_N[at : at + n].view(dtype).view(shape)
        if words_MP is not None and words_MP.shape != views["words"].shape:
            raise ValueError(
                f"slot words: shape {tuple(words_MP.shape)}, layout wants {tuple(views['words'].shape)}"
            )
        self.words_MP: torch.Tensor = views["words"] if words_MP is None else words_MP
        self.control_2: torch.Tensor = views["control"]  # abort word, status word
        self.rows_MPCD: torch.Tensor = views["rows"]
        self.local_ids_MPCK: torch.Tensor | None = views.get("local_ids")
        self.weights_MPCK: torch.Tensor | None = views.get("weights")

    @property
    def device(self) -> torch.device:
        return self.memory_N.device

    def micro_batch_rows(self, mb: int, counts_P: list[int]) -> tuple[torch.Tensor, ...]:
        """(rows [T, D], local ids [T, K], weights [T, K]) of micro-batch `mb`: the first
        counts_P[p] rows of each peer's slot, as views when one peer wrote (no copy)."""
        if self.local_ids_MPCK is None or self.weights_MPCK is None:
            raise ValueError("combine slots carry no local ids or weights")
        arrays = (self.rows_MPCD[mb], self.local_ids_MPCK[mb], self.weights_MPCK[mb])
        if len(counts_P) == 1:
            return tuple(a[0, : counts_P[0]] for a in arrays)
        return tuple(torch.cat([a[p, :n] for p, n in enumerate(counts_P)]) for a in arrays)
