"""The fixed, versioned frame header of afd's M2N/N2M traffic, and its checks.

A frame is one UCX message holding the header (HEADER_BYTES) and, when the INLINE flag is set,
the payload of all its tensors right after it (at most INLINE_BYTES: the small decode messages,
where one message instead of several is what matters). Without the flag, one UCX message per
non-empty tensor follows, sent from the tensor's own memory (zero-copy). Nothing in a header is trusted: magic, version, kind, tensor count, dtype codes,
ranks and sizes are all checked before a single payload byte is allocated.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache
from typing import Any, NamedTuple

import torch

MAGIC = b"AFDW"
VERSION = 2  # 2: the frame kind says what a frame is for; the key carries a failover attempt
MAX_TENSORS = 4
MAX_RANK = 3
FLAG_INLINE = 1
INLINE_BYTES = 64 << 10


class FrameKind(IntEnum):
    """What a frame is for. The receiver's mailbox keys on it, so frames of different kinds
    never answer for each other."""

    HELLO = 1  # the first frame of a connection: the sender's id (and, behind it, its tag)
    EXCHANGE = 2  # dispatch rows to an expert node, or its partial sums back
    FAILOVER = 3  # an exchange resent to replicas because its first expert node died
    END_OF_STEP = 4  # an attention node is through with a step (expert replicas wait on it)
    CONTROL = 5  # a step's opening (attention -> expert) and call (expert -> attention)


# magic, version, kind, tensor count, flags, sender, step, layer, micro-batch, attempt
_FIXED = struct.Struct("<4sHBBBHQHHH")
FIXED_BYTES = _FIXED.size
# per tensor: dtype code, rank, three dims
_TENSOR = struct.Struct("<BB3I")
HEADER_BYTES = _FIXED.size + MAX_TENSORS * _TENSOR.size

DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.bfloat16: 2,
    torch.float16: 3,
    torch.int64: 4,
    torch.int32: 5,
    torch.int16: 6,
    torch.uint8: 7,
    torch.float8_e4m3fn: 8,  # rows dispatched in fp8 (`transport.dispatch_dtype: fp8`)
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


class WireError(ValueError):
    """A frame that breaks the protocol; fatal for the peer that sent it, never for the node."""


class RoundKey(NamedTuple):
    """Which exchange a frame belongs to. A tuple, so that the mailbox hashes and compares it
    in C while a receive spins. Make keys with the named constructors below, never by hand."""

    kind: FrameKind
    step: int
    layer: int
    micro_batch: int
    attempt: int  # FAILOVER: 1 for the first resend of an exchange, 2 for the next, ...

    @classmethod
    def exchange(cls, step: int, layer: int, micro_batch: int) -> RoundKey:
        """One (step, layer, micro-batch) of M2N dispatch and its N2M combine."""
        return cls(FrameKind.EXCHANGE, step, layer, micro_batch, 0)

    def failover(self, attempt: int) -> RoundKey:
        """This exchange resent to replicas, for the `attempt`-th time (from 1)."""
        return self._replace(kind=FrameKind.FAILOVER, attempt=attempt)

    @classmethod
    def end_of_step(cls, step: int) -> RoundKey:
        """The marker by which an attention node ends a step."""
        return cls(FrameKind.END_OF_STEP, step, 0, 0, 0)

    @classmethod
    def control(cls, step: int) -> RoundKey:
        """The control round of `step` (`afd.transport.step_control`)."""
        return cls(FrameKind.CONTROL, step, 0, 0, 0)

    @classmethod
    def hello(cls) -> RoundKey:
        return cls(FrameKind.HELLO, 0, 0, 0, 0)


_KINDS = frozenset(int(k) for k in FrameKind)


@dataclass(frozen=True, slots=True)
class TensorMeta:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True, slots=True)
class Header:
    sender: int
    key: RoundKey
    tensors: tuple[TensorMeta, ...]
    inline: bool = False

    @property
    def kind(self) -> FrameKind:
        return self.key.kind

    @property
    def payload_bytes(self) -> int:
        return sum(m.nbytes for m in self.tensors)

    def pack(self) -> bytes:
        out = bytearray(HEADER_BYTES)
        self.pack_into(out)
        return bytes(out)

    def pack_into(self, out: Any) -> None:
        frame = layout(tuple((m.dtype, m.shape) for m in self.tensors))
        pack_header(out, self.sender, self.key, frame, self.inline)


@lru_cache(maxsize=1024)
def _pack_tensors(tensors: tuple[TensorMeta, ...]) -> bytes:
    """The tensor descriptors of a header, zero-padded; decode repeats the same few shapes."""
    out = bytearray(HEADER_BYTES - _FIXED.size)
    for i, t in enumerate(tensors):
        dims = (*t.shape, 0, 0, 0)[:MAX_RANK]
        _TENSOR.pack_into(out, i * _TENSOR.size, DTYPE_CODES[t.dtype], len(t.shape), *dims)
    return bytes(out)


def describe(tensors: list[torch.Tensor]) -> tuple[TensorMeta, ...]:
    return layout(tuple((t.dtype, t.shape) for t in tensors)).metas


@dataclass(frozen=True, slots=True)
class Layout:
    """A frame's tensors as the wire sees them, computed once per combination of dtypes and
    shapes (decode sends the same few again and again)."""

    metas: tuple[TensorMeta, ...]
    descriptors: bytes  # the header's packed tensor descriptors
    sizes: tuple[int, ...]  # bytes of each tensor
    payload: int


@lru_cache(maxsize=1024)
def layout(signature: tuple[tuple[torch.dtype, tuple[int, ...]], ...]) -> Layout:
    """The checked layout of tensors of these (dtype, shape)s; raises WireError (uncached)."""
    if len(signature) > MAX_TENSORS:
        raise WireError(f"a frame carries at most {MAX_TENSORS} tensors, got {len(signature)}")
    metas = []
    for dtype, shape in signature:
        if dtype not in DTYPE_CODES or len(shape) > MAX_RANK:
            raise WireError(f"cannot send a {dtype} tensor of rank {len(shape)}")
        metas.append(TensorMeta(dtype, tuple(shape)))
    sizes = tuple(m.nbytes for m in metas)
    return Layout(tuple(metas), _pack_tensors(tuple(metas)), sizes, sum(sizes))


def pack_header(out: Any, sender: int, key: RoundKey, frame: Layout, inline: bool) -> None:
    """Writes a header at the start of `out` (a frame's buffer) without building a Header."""
    _FIXED.pack_into(
        out,
        0,
        MAGIC,
        VERSION,
        key.kind,
        len(frame.metas),
        FLAG_INLINE if inline else 0,
        sender,
        key.step,
        key.layer,
        key.micro_batch,
        key.attempt,
    )
    memoryview(out)[_FIXED.size : HEADER_BYTES] = frame.descriptors


def unpack(frame: Any, max_frame_bytes: int) -> Header:
    """Parses and checks the header at the start of `frame` (any buffer: bytes, a numpy array);
    raises WireError saying exactly what is wrong."""
    if len(frame) < HEADER_BYTES:
        raise WireError(f"header is {len(frame)} bytes, expected {HEADER_BYTES}")
    magic, version, kind, count, flags, sender, step, layer, mb, attempt = _FIXED.unpack_from(
        frame, 0
    )
    if magic != MAGIC:
        raise WireError(f"bad magic {magic!r}, expected {MAGIC!r}: not an afd peer")
    if version != VERSION:
        raise WireError(f"protocol version {version}, this node speaks {VERSION}")
    if kind not in _KINDS:
        raise WireError(f"unknown frame kind {kind}")
    if count > MAX_TENSORS:
        raise WireError(f"frame declares {count} tensors, at most {MAX_TENSORS} allowed")
    if flags & ~FLAG_INLINE:
        raise WireError(f"unknown flags {flags:#x}")
    metas, payload_bytes = _unpack_tensors(
        bytes(frame[_FIXED.size : _FIXED.size + count * _TENSOR.size])
    )
    inline = bool(flags & FLAG_INLINE)
    limit = INLINE_BYTES if inline else max_frame_bytes
    if payload_bytes > limit:
        raise WireError(f"frame payload of {payload_bytes} bytes exceeds the limit of {limit}")
    if (kind == FrameKind.FAILOVER) != (attempt > 0):
        raise WireError(f"frame of kind {kind} with failover attempt {attempt}")
    return Header(sender, RoundKey(FrameKind(kind), step, layer, mb, attempt), metas, inline)


@lru_cache(maxsize=1024)
def _unpack_tensors(descriptors: bytes) -> tuple[tuple[TensorMeta, ...], int]:
    """Checked tensor descriptors and their payload size. Cached by their bytes: a bad one
    raises (and is not cached), a good one parses once per shape."""
    metas = []
    for i in range(len(descriptors) // _TENSOR.size):
        code, rank, *dims = _TENSOR.unpack_from(descriptors, i * _TENSOR.size)
        if code not in CODE_DTYPES:
            raise WireError(f"tensor {i}: unknown dtype code {code}")
        if rank > MAX_RANK:
            raise WireError(f"tensor {i}: rank {rank} exceeds {MAX_RANK}")
        metas.append(TensorMeta(CODE_DTYPES[code], tuple(dims[:rank])))
    return tuple(metas), sum(m.nbytes for m in metas)
