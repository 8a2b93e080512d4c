from __future__ import annotations

import struct

import pytest
import torch
from afd.transport.wire import (
    FIXED_BYTES,
    HEADER_BYTES,
    INLINE_BYTES,
    MAGIC,
    FrameKind,
    Header,
    RoundKey,
    WireError,
    describe,
    unpack,
)


def _header(**changes) -> bytes:
    tensors = describe([torch.zeros(3, 8), torch.zeros(3, 2, dtype=torch.int16)])
    return Header(7, RoundKey.exchange(5, 2, 1), tensors).pack()


def test_header_round_trips() -> None:
    header = unpack(_header(), 1 << 20)
    assert (header.sender, header.key) == (7, RoundKey.exchange(5, 2, 1))
    assert [(m.dtype, m.shape) for m in header.tensors] == [
        (torch.float32, (3, 8)),
        (torch.int16, (3, 2)),
    ]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b"XXXX" + b[4:], "bad magic"),
        (lambda b: b[:4] + struct.pack("<H", 9) + b[6:], "protocol version 9"),
        (lambda b: b[:6] + bytes([42]) + b[7:], "unknown frame kind 42"),
        (lambda b: b[:7] + bytes([9]) + b[8:], "declares 9 tensors"),
        (lambda b: b[:FIXED_BYTES] + bytes([99]) + b[FIXED_BYTES + 1 :], "unknown dtype code 99"),
        (lambda b: b[: FIXED_BYTES + 1] + bytes([7]) + b[FIXED_BYTES + 2 :], "rank 7 exceeds"),
        (lambda b: b[:8] + bytes([0x80]) + b[9:], "unknown flags 0x80"),
        (lambda b: b[:-30], "expected"),
    ],
)
def test_bad_headers_are_rejected_with_the_reason(mutate, message: str) -> None:
    with pytest.raises(WireError, match=message):
        unpack(mutate(_header()), 1 << 20)


def test_oversize_payload_is_rejected_before_allocation() -> None:
    huge = Header(1, RoundKey.exchange(0, 0, 0), describe([torch.empty(0)])).pack()
    # declare a [2^31, 2^31, 2] float tensor: 32 EiB, far over any limit
    forged = bytearray(huge)
    struct.pack_into("<BB3I", forged, FIXED_BYTES, 1, 3, 2**31, 2**31, 2)
    with pytest.raises(WireError, match="exceeds the limit"):
        unpack(bytes(forged), 256 << 20)
    assert len(huge) == HEADER_BYTES and huge[:4] == MAGIC


def test_inline_frames_are_capped_at_the_inline_limit() -> None:
    big = describe([torch.empty(INLINE_BYTES // 4 + 1)])
    with pytest.raises(WireError, match=f"exceeds the limit of {INLINE_BYTES}"):
        unpack(Header(1, RoundKey.exchange(0, 0, 0), big, inline=True).pack(), 1 << 30)
    assert not unpack(Header(1, RoundKey.exchange(0, 0, 0), big).pack(), 1 << 30).inline


@pytest.mark.parametrize(
    "key",
    [
        RoundKey.exchange(9, 3, 1),
        RoundKey.exchange(9, 3, 1).failover(2),
        RoundKey.end_of_step(9),
        RoundKey.control(9),
    ],
)
def test_each_frame_kind_round_trips_with_its_meaning(key: RoundKey) -> None:
    got = unpack(Header(4, key, ()).pack(), 1 << 20).key
    assert got == key and got.kind == key.kind


def test_failover_keys_differ_from_the_exchange_and_from_each_other() -> None:
    first = RoundKey.exchange(1, 2, 0)
    assert len({first, first.failover(1), first.failover(2), RoundKey.end_of_step(1)}) == 4
    assert first.failover(1).kind == FrameKind.FAILOVER and first.failover(1).attempt == 1


def test_an_attempt_outside_a_failover_frame_is_rejected() -> None:
    forged = bytearray(_header())
    struct.pack_into("<H", forged, FIXED_BYTES - 2, 3)  # the attempt field of an exchange
    with pytest.raises(WireError, match="attempt 3"):
        unpack(bytes(forged), 1 << 20)
