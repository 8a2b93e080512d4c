"""Paged decode attention: one new query per sequence over its cached keys, reading only the
blocks its length covers (the torch path gathers every block of the padded table).

Each program takes one (sequence, kv head, split): the r = H/G query heads that share the kv
head attend together (one tile, so each key is read once for all of them) over a contiguous
share of the sequence's keys, with an online softmax. With more than one split (small batches,
long contexts: too few programs to fill the GPU otherwise) each writes its partial max, sum and
output, and `_merge_kernel` combines them; with one split the program writes the output.

Shape legend: B = sequences, H = query heads, G = kv heads, r = H/G, Dh = head dim,
M = blocks per sequence (the table's width), BS = block size, S = splits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from afd.models.kernels import dot_precision, launching
from afd.models.kernels.pdl import pdl, pdl_launch, wait_for_prior

KEYS_PER_TILE = 64  # keys a program loads at once
SM_TARGET = 264  # programs that keep an H100's 132 SMs busy (two each)
LONG_TILES = 32  # from this many tiles of context a split takes at least two


@triton.jit(do_not_specialize=["M", "keys_per_split"])
def _decode_kernel(
    q_ptr,  # [B, H, Dh]
    k_cache_ptr,  # [NB, BS, G, Dh]
    v_cache_ptr,
    table_ptr,  # [B, M]
    positions_ptr,  # [B] position of the new token: it sees keys 0..position
    out_ptr,  # [B, H, Dh] (one split)
    part_acc_ptr,  # [B, H, S, Dh] fp32 (several splits)
    part_max_ptr,  # [B, H, S]
    part_sum_ptr,  # [B, H, S]
    M,
    keys_per_split,
    scale,
    H: tl.constexpr,
    G: tl.constexpr,
    R: tl.constexpr,
    R_P2: tl.constexpr,
    DH: tl.constexpr,
    BS: tl.constexpr,
    TILE: tl.constexpr,
    SPLITS: tl.constexpr,
    PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_prior(PDL)
    seq, kv_head, split = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    r = tl.arange(0, R_P2)
    d = tl.arange(0, DH)
    heads = kv_head * R + r
    q_at = q_ptr + seq * H * DH + heads[:, None] * DH + d[None, :]
    q = tl.load(q_at, mask=(r < R)[:, None], other=0.0)
    length = tl.load(positions_ptr + seq) + 1
    first = split * keys_per_split
    last = tl.minimum(length, first + keys_per_split)
    running_max = tl.full([R_P2], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([R_P2], dtype=tl.float32)
    acc = tl.zeros([R_P2, DH], dtype=tl.float32)
    lane = tl.arange(0, TILE)
    for start in range(first, last, TILE):
        key = start + lane
        live = key < last
        block = tl.load(table_ptr + seq * M + key // BS, mask=live, other=0).to(tl.int64)
        at = ((block * BS + key % BS) * G + kv_head) * DH
        k = tl.load(k_cache_ptr + at[:, None] + d[None, :], mask=live[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [R_P2, TILE]
        scores = tl.where(live[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        p = tl.exp(scores - new_max[:, None])
        alpha = tl.exp(running_max - new_max)
        running_sum = running_sum * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + at[:, None] + d[None, :], mask=live[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        running_max = new_max
    if SPLITS == 1:
        out = acc / running_sum[:, None]
        at_out = out_ptr + seq * H * DH + heads[:, None] * DH + d[None, :]
        tl.store(at_out, out.to(out_ptr.dtype.element_ty), mask=(r < R)[:, None])
    else:
        part = (seq * H + heads) * SPLITS + split
        tl.store(part_acc_ptr + part[:, None] * DH + d[None, :], acc, mask=(r < R)[:, None])
        tl.store(part_max_ptr + part, running_max, mask=r < R)
        tl.store(part_sum_ptr + part, running_sum, mask=r < R)


@triton.jit
def _merge_kernel(
    part_acc_ptr,
    part_max_ptr,
    part_sum_ptr,
    out_ptr,
    SPLITS: tl.constexpr,
    DH: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_prior(PDL)
    row = tl.program_id(0).to(tl.int64)  # seq·H + head
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, DH)
    maxes = tl.load(part_max_ptr + row * SPLITS + s)
    top = tl.max(maxes, axis=0)  # split 0 always holds key 0, so this is finite
    w = tl.exp(maxes - top)  # an empty split has max -inf: weight 0
    total = tl.sum(tl.load(part_sum_ptr + row * SPLITS + s) * w, axis=0)
    acc = tl.load(part_acc_ptr + (row * SPLITS + s[:, None]) * DH + d[None, :])
    out = tl.sum(acc * w[:, None], axis=0) / total
    tl.store(out_ptr + row * DH + d, out.to(out_ptr.dtype.element_ty))


def splits_for(batch: int, kv_heads: int, max_keys: int) -> int:
    """How many programs share one (sequence, kv head): enough to fill the GPU, never a
    split shorter than a tile, and from `LONG_TILES` tiles on never shorter than two; a power
    of two (the merge's tile). Measured on an H100 at batch 1 (bench/NOTES.md, session 11):
    a tile a split won up to 1,024 keys (5.1 µs against 6.1 with two), two tiles a split from
    2,048 keys (6.3 against 6.6 µs; 7.9 against 9.1 at 4,096): the merge of many splits costs
    more than the last tile saves."""
    tiles = -(-max_keys // KEYS_PER_TILE)
    want = max(1, min(SM_TARGET // max(1, batch * kv_heads), tiles))
    if tiles >= LONG_TILES:
        want = min(want, tiles // 2)
    return 1 << (want.bit_length() - 1)


def paged_decode_attention(
    q_BHDh: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table_BM: torch.Tensor,
    positions_B: torch.Tensor,
) -> torch.Tensor:
    """softmax(q·kᵀ/√Dh)·v of each sequence's one new query over keys 0..position (already in
    the cache [NB, BS, G, Dh]); the split count follows the table's width, so it is fixed for
    a CUDA graph's shapes."""
    B, H, Dh = q_BHDh.shape
    BS, G = k_cache.shape[1], k_cache.shape[2]
    M = table_BM.shape[1]
    R = H // G
    out = torch.empty_like(q_BHDh)
    if B == 0:
        return out
    S = splits_for(B, G, M * BS)
    keys_per_split = -(-M * BS // S)
    keys_per_split = -(-keys_per_split // KEYS_PER_TILE) * KEYS_PER_TILE
    part_acc = part_max = part_sum = out  # placeholders, unused with one split
    if S > 1:
        part_acc = torch.empty(B, H, S, Dh, dtype=torch.float32, device=q_BHDh.device)
        part_max = torch.empty(B, H, S, dtype=torch.float32, device=q_BHDh.device)
        part_sum = torch.empty(B, H, S, dtype=torch.float32, device=q_BHDh.device)
    on = pdl(q_BHDh)
    with launching():
        _decode_kernel[(B, G, S)](
            q_BHDh.contiguous(),
            k_cache,
            v_cache,
            table_BM.contiguous(),
            positions_B.contiguous(),
            out,
            part_acc,
            part_max,
            part_sum,
            M,
            keys_per_split,
            Dh**-0.5,
            H=H,
            G=G,
            R=R,
            R_P2=max(16, triton.next_power_of_2(R)),
            DH=Dh,
            BS=BS,
            TILE=KEYS_PER_TILE,
            SPLITS=S,
            PRECISION=dot_precision(q_BHDh.dtype),
            PDL=on,
            num_warps=4,
            **pdl_launch(on),
        )
    if S > 1:
        with launching():
            _merge_kernel[(B * H,)](
                part_acc, part_max, part_sum, out,
                SPLITS=S, DH=Dh, PDL=on, num_warps=4, **pdl_launch(on),
            )  # fmt: skip
    return out
