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

import torch

MAGIC = b"AFDW"
VERSION = 1
MAX_TENSORS = 4
MAX_RANK = 3
KIND_HELLO, KIND_TENSORS = 1, 2
FLAG_INLINE = 1
INLINE_BYTES = 64 << 10

# magic, version, kind, tensor count, flags, sender, step, layer, micro-batch
_FIXED = struct.Struct("<4sHBBBHQHH")
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
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


class WireError(ValueError):
    """A frame that breaks the protocol; fatal for the peer that sent it, never for the node."""


@dataclass(frozen=True, slots=True, order=True)
class RoundKey:
    """Which exchange a frame belongs to: one (step, layer, micro-batch)."""

    step: int
    layer: int
    micro_batch: int


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
    kind: int
    sender: int
    key: RoundKey
    tensors: tuple[TensorMeta, ...]
    inline: bool = False

    @property
    def payload_bytes(self) -> int:
        return sum(m.nbytes for m in self.tensors)

    def pack(self) -> bytes:
        out = bytearray(HEADER_BYTES)
        k = self.key
        _FIXED.pack_into(
            out,
            0,
            MAGIC,
            VERSION,
            self.kind,
            len(self.tensors),
            FLAG_INLINE if self.inline else 0,
            self.sender,
            k.step,
            k.layer,
            k.micro_batch,
        )
        for i, t in enumerate(self.tensors):
            dims = (*t.shape, 0, 0, 0)[:MAX_RANK]
            _TENSOR.pack_into(
                out, _FIXED.size + i * _TENSOR.size, DTYPE_CODES[t.dtype], len(t.shape), *dims
            )
        return bytes(out)


def describe(tensors: list[torch.Tensor]) -> tuple[TensorMeta, ...]:
    if len(tensors) > MAX_TENSORS:
        raise WireError(f"a frame carries at most {MAX_TENSORS} tensors, got {len(tensors)}")
    metas = []
    for t in tensors:
        if t.dtype not in DTYPE_CODES or t.dim() > MAX_RANK:
            raise WireError(f"cannot send a {t.dtype} tensor of rank {t.dim()}")
        metas.append(TensorMeta(t.dtype, tuple(t.shape)))
    return tuple(metas)


def unpack(frame: bytes | bytearray | memoryview, max_frame_bytes: int) -> Header:
    """Parses and checks a header; raises WireError saying exactly what is wrong."""
    if len(frame) < HEADER_BYTES:
        raise WireError(f"header is {len(frame)} bytes, expected {HEADER_BYTES}")
    magic, version, kind, count, flags, sender, step, layer, mb = _FIXED.unpack_from(frame, 0)
    if magic != MAGIC:
        raise WireError(f"bad magic {magic!r}, expected {MAGIC!r}: not an afd peer")
    if version != VERSION:
        raise WireError(f"protocol version {version}, this node speaks {VERSION}")
    if kind not in (KIND_HELLO, KIND_TENSORS):
        raise WireError(f"unknown frame kind {kind}")
    if count > MAX_TENSORS:
        raise WireError(f"frame declares {count} tensors, at most {MAX_TENSORS} allowed")
    metas = []
    for i in range(count):
        code, rank, *dims = _TENSOR.unpack_from(frame, _FIXED.size + i * _TENSOR.size)
        if code not in CODE_DTYPES:
            raise WireError(f"tensor {i}: unknown dtype code {code}")
        if rank > MAX_RANK:
            raise WireError(f"tensor {i}: rank {rank} exceeds {MAX_RANK}")
        metas.append(TensorMeta(CODE_DTYPES[code], tuple(dims[:rank])))
    if flags & ~FLAG_INLINE:
        raise WireError(f"unknown flags {flags:#x}")
    header = Header(
        kind, sender, RoundKey(step, layer, mb), tuple(metas), bool(flags & FLAG_INLINE)
    )
    limit = INLINE_BYTES if header.inline else max_frame_bytes
    if header.payload_bytes > limit:
        raise WireError(
            f"frame payload of {header.payload_bytes} bytes exceeds the limit of {limit}"
        )
    return header
