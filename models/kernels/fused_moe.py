"""The routed experts of one layer in five kernels, without a host synchronisation:

1. `_count_kernel` and `_place_kernel` (one program per expert each): a counting sort of the
   T·K (token, slot) pairs by local expert, each expert's run padded to the GEMM block BM, so
   that every block of BM rows belongs to one expert; within a run, pairs keep their order.
   Pairs with expert id -1 (held elsewhere) are left out.
2. `_gate_up_kernel`: per (block, column tile), x[token] @ gate[e]ᵀ and x[token] @ up[e]ᵀ in
   one pass over x, SiLU(gate)·up in the epilogue, stored per pair.
3. `_down_kernel`: the down projection, the pair's routing weight applied in the epilogue,
   stored per pair ([T, K, D]).
4. `_combine_kernel`: each token's sum over its K slots in slot order, left-out slots skipped.
   No atomics, so a graph replay and an eager step give identical bits.

With very few pairs (`is_direct`) the alignment is skipped and each pair is a block of its own.
Grids are sized for the worst case (every expert's run padded), so shapes depend on T only
and CUDA graphs can capture the whole thing; blocks past the padded total exit at once.

Shape legend: T = tokens, K = top-k, N = T·K pairs, D = hidden, E = local experts,
I = expert FFN width, BM/BN/BK = GEMM tiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import triton
import triton.language as tl
from afd.models.kernels import dot_precision, launching
from afd.models.kernels.pdl import pdl, pdl_launch, wait_for_prior
from afd.models.kernels.tuning import device_name, lookup, shape_key


@dataclass(frozen=True, slots=True)
class MoEConfig:
    """One tile configuration of the two GEMMs (the alignment pads to `block_m`)."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3


@cache
def pick_config(
    pairs: int, experts: int, ffn: int, hidden: int, device: torch.device, weight_dtype: torch.dtype
) -> MoEConfig:
    """The tiles `bench/tune_kernels.py` measured best for this shape, weight dtype and GPU at
    the smallest tuned pair count ≥ `pairs`; defaults where nothing was measured. Looked up
    once per shape: every MoE layer of every eager step asks."""
    key = shape_key("moe", weight_dtype, device_name(device), E=experts, I=ffn, D=hidden)
    found, entry = lookup(key, pairs)
    return MoEConfig(**entry) if found else MoEConfig()


def is_direct(pairs: int, experts: int, top_k: int) -> bool:
    """Few pairs (a decode step of one or two sequences): each pair is its own GEMM block and
    no alignment runs. Two kernels fewer; the price, an expert read once per pair that chose
    it, is small while pairs rarely share an expert."""
    return pairs <= max(top_k, experts // 8)


def max_blocks(pairs: int, experts: int, block_m: int) -> int:
    """Blocks of `block_m` rows the padded sort can fill: each expert that holds any pair
    wastes less than one block, and at most min(E, N) experts hold one."""
    return -(-pairs // block_m) + min(experts, pairs)


@triton.jit(do_not_specialize=["N"])
def _count_kernel(ids_ptr, counts_ptr, N, CHUNK: tl.constexpr, PDL: tl.constexpr):
    """Program e counts the pairs routed to local expert e."""
    wait_for_prior(PDL)
    expert = tl.program_id(0)
    lane = tl.arange(0, CHUNK)
    hits = tl.zeros([CHUNK], dtype=tl.int32)
    for start in range(0, N, CHUNK):
        ids = tl.load(ids_ptr + start + lane, mask=start + lane < N, other=-1)
        hits += (ids == expert).to(tl.int32)
    tl.store(counts_ptr + expert, tl.sum(hits, axis=0))


@triton.jit(do_not_specialize=["N"])
def _place_kernel(
    ids_ptr,  # [N] local expert id per pair, -1: not here
    counts_ptr,  # [E] pairs per expert
    sorted_ptr,  # [max_blocks·BM] out: pair index per padded row, N for padding
    block_expert_ptr,  # [max_blocks] out: the expert of each block
    total_ptr,  # [1] out: rows in use (a multiple of BM)
    N,
    E: tl.constexpr,
    E_P2: tl.constexpr,
    BM: tl.constexpr,
    CHUNK: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program e writes expert e's run: its pairs in pair order, then padding to BM, and the
    expert id of the run's blocks. Rows and blocks past the total are never read."""
    wait_for_prior(PDL)
    expert = tl.program_id(0)
    experts = tl.arange(0, E_P2)
    counts = tl.load(counts_ptr + experts, mask=experts < E, other=0)
    padded = (counts + BM - 1) // BM * BM
    first = tl.sum(tl.where(experts < expert, padded, 0), axis=0)
    mine = tl.sum(tl.where(experts == expert, counts, 0), axis=0)
    mine_padded = (mine + BM - 1) // BM * BM
    if expert == 0:
        tl.store(total_ptr, tl.sum(padded, axis=0))
    lane = tl.arange(0, CHUNK)
    taken = 0
    for start in range(0, N, CHUNK):
        pair = start + lane
        hit = (tl.load(ids_ptr + pair, mask=pair < N, other=-1) == expert).to(tl.int32)
        rank = taken + tl.cumsum(hit, axis=0) - hit
        tl.store(sorted_ptr + first + rank, pair, mask=hit > 0)
        taken += tl.sum(hit, axis=0)
    for row in range(mine, mine_padded, CHUNK):
        tl.store(sorted_ptr + first + row + lane, N, mask=row + lane < mine_padded)
    for block in range(first // BM, (first + mine_padded) // BM, CHUNK):
        at = block + lane
        tl.store(block_expert_ptr + at, expert, mask=at < (first + mine_padded) // BM)


@triton.jit(do_not_specialize=["N"])
def _gate_up_kernel(
    x_ptr,  # [T, D]
    gate_ptr,  # [E, FFN, D]
    up_ptr,  # [E, FFN, D]
    gate_scale_ptr,  # [E, ⌈FFN/128⌉, ⌈D/128⌉] fp8 block scales (with SCALED)
    up_scale_ptr,
    h_ptr,  # [N, FFN] out
    ids_ptr,  # [N] local expert of each pair (read in DIRECT mode)
    sorted_ptr,
    block_expert_ptr,
    total_ptr,
    N,
    D,
    FFN,
    TOP_K: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PRECISION: tl.constexpr,
    DIRECT: tl.constexpr,
    SCALED: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_prior(PDL)
    block, tile = tl.program_id(0), tl.program_id(1)
    if DIRECT:  # block b is pair b alone (row 0 of the tile)
        expert = tl.load(ids_ptr + block).to(tl.int64)
        if expert < 0:
            return
        pair = tl.where(tl.arange(0, BM) == 0, block, N)
    else:
        if block * BM >= tl.load(total_ptr):
            return
        expert = tl.load(block_expert_ptr + block).to(tl.int64)
        pair = tl.load(sorted_ptr + block * BM + tl.arange(0, BM))
    live = pair < N
    token = (pair // TOP_K).to(tl.int64)
    cols = tile * BN + tl.arange(0, BN)
    inner = tl.arange(0, BK)
    x_at = x_ptr + token[:, None] * D + inner[None, :]
    w_at = expert * FFN * D + cols[None, :].to(tl.int64) * D + inner[:, None]  # [BK, BN]
    acc_gate = tl.zeros([BM, BN], dtype=tl.float32)
    acc_up = tl.zeros([BM, BN], dtype=tl.float32)
    for k in range(0, D, BK):
        in_k = k + inner < D
        a = tl.load(x_at + k, mask=live[:, None] & in_k[None, :], other=0.0)
        w_mask = in_k[:, None] & (cols < FFN)[None, :]
        g = tl.load(gate_ptr + w_at + k, mask=w_mask, other=0.0)
        u = tl.load(up_ptr + w_at + k, mask=w_mask, other=0.0)
        if SCALED:  # fp8 tiles up to the activations' dtype, a scale per 128 of K (BN | 128)
            s_at = (expert * tl.cdiv(FFN, 128) + tile * BN // 128) * tl.cdiv(D, 128) + (
                k + inner
            ) // 128
            gs = tl.load(gate_scale_ptr + s_at, mask=in_k, other=0.0)
            us = tl.load(up_scale_ptr + s_at, mask=in_k, other=0.0)
            g = (g.to(tl.float32) * gs[:, None]).to(a.dtype)
            u = (u.to(tl.float32) * us[:, None]).to(a.dtype)
        acc_gate = tl.dot(a, g, acc_gate, input_precision=PRECISION)
        acc_up = tl.dot(a, u, acc_up, input_precision=PRECISION)
    h = acc_gate * tl.sigmoid(acc_gate) * acc_up
    out = h_ptr + pair[:, None].to(tl.int64) * FFN + cols[None, :]
    tl.store(out, h.to(h_ptr.dtype.element_ty), mask=live[:, None] & (cols < FFN)[None, :])


@triton.jit(do_not_specialize=["N"])
def _down_kernel(
    h_ptr,  # [N, FFN]
    down_ptr,  # [E, D, FFN]
    down_scale_ptr,  # [E, ⌈D/128⌉, ⌈FFN/128⌉] (with SCALED)
    weight_ptr,  # [N] routing weight per pair
    y_ptr,  # [N, D] out
    ids_ptr,
    sorted_ptr,
    block_expert_ptr,
    total_ptr,
    N,
    D,
    FFN,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PRECISION: tl.constexpr,
    DIRECT: tl.constexpr,
    SCALED: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_prior(PDL)
    block, tile = tl.program_id(0), tl.program_id(1)
    if DIRECT:
        expert = tl.load(ids_ptr + block).to(tl.int64)
        if expert < 0:
            return
        pair = tl.where(tl.arange(0, BM) == 0, block, N)
    else:
        if block * BM >= tl.load(total_ptr):
            return
        expert = tl.load(block_expert_ptr + block).to(tl.int64)
        pair = tl.load(sorted_ptr + block * BM + tl.arange(0, BM))
    live = pair < N
    cols = tile * BN + tl.arange(0, BN)
    inner = tl.arange(0, BK)
    h_at = h_ptr + pair[:, None].to(tl.int64) * FFN + inner[None, :]
    w_at = down_ptr + expert * D * FFN + cols[None, :].to(tl.int64) * FFN + inner[:, None]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k in range(0, FFN, BK):
        in_k = k + inner < FFN
        a = tl.load(h_at + k, mask=live[:, None] & in_k[None, :], other=0.0)
        w = tl.load(w_at + k, mask=in_k[:, None] & (cols < D)[None, :], other=0.0)
        if SCALED:
            s_at = (expert * tl.cdiv(D, 128) + tile * BN // 128) * tl.cdiv(FFN, 128) + (
                k + inner
            ) // 128
            ws = tl.load(down_scale_ptr + s_at, mask=in_k, other=0.0)
            w = (w.to(tl.float32) * ws[:, None]).to(a.dtype)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    weight = tl.load(weight_ptr + pair, mask=live, other=0.0).to(tl.float32)
    y = acc * weight[:, None]
    out = y_ptr + pair[:, None].to(tl.int64) * D + cols[None, :]
    tl.store(out, y.to(y_ptr.dtype.element_ty), mask=live[:, None] & (cols < D)[None, :])


@triton.jit
def _combine_kernel(
    y_ptr,  # [T, K, D]
    ids_ptr,  # [T, K]
    out_ptr,  # [T, D]
    D,
    TOP_K: tl.constexpr,
    BD: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_prior(PDL)
    token, tile = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = tile * BD + tl.arange(0, BD)
    acc = tl.zeros([BD], dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        width = tl.where(tl.load(ids_ptr + token * TOP_K + k) >= 0, D, 0)  # 0: slot left out
        y = tl.load(y_ptr + (token * TOP_K + k) * D + cols, mask=cols < width, other=0.0)
        acc += y.to(tl.float32)
    tl.store(out_ptr + token * D + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < D)


def fused_experts(
    x_TD: torch.Tensor,
    gate_EID: torch.Tensor,
    up_EID: torch.Tensor,
    down_EDI: torch.Tensor,
    ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    config: MoEConfig | None = None,
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    out_TD: torch.Tensor | None = None,
    summands: bool = False,
) -> torch.Tensor:
    """Σ_k weights_TK[t,k] · expert_{ids_TK[t,k]}(x_TD[t]) over this shard's experts (local
    ids; -1 skips the slot), as [T, D] in x's dtype, or into `out_TD` (contiguous, on the
    device: an attention node's combine slot, so that no copy follows). With `scales` (gate,
    up, down) the weights are fp8 in 128×128 blocks (`afd.models.fp8`), scaled up tile by
    tile.

    `summands`: each slot's weighted expert output, [T, K, D], not summed: the caller's next
    residual add sums them (`add_rms_norm` with a 3-D Δ), one kernel fewer a layer. Every id
    must be a local expert (a slot left out would stay unwritten): a shard holding them all."""
    T, D = x_TD.shape
    K = ids_TK.shape[1]
    E, FFN, _ = gate_EID.shape
    N = T * K
    if summands and out_TD is not None:
        raise ValueError("summands are returned, not written into a given output")
    if out_TD is not None and (out_TD.shape != (T, D) or not out_TD.is_contiguous()):
        raise ValueError(f"the output must be a contiguous [{T}, {D}], got {tuple(out_TD.shape)}")
    if N == 0:
        return x_TD.new_zeros(T, K, D) if summands else _zeros_into(out_TD, x_TD)
    cfg = config or pick_config(N, E, FFN, D, x_TD.device, gate_EID.dtype)
    if scales is not None and 128 % cfg.block_n:  # before any launch
        raise ValueError(f"fp8 experts need tiles of columns that divide 128, got {cfg.block_n}")
    on = pdl(x_TD)
    BM = cfg.block_m
    ids_N = ids_TK.reshape(-1).contiguous()  # int32 or int64: the kernels load either
    direct = is_direct(N, E, K)
    blocks = N if direct else max_blocks(N, E, BM)
    sorted_R = block_expert = total = ids_N  # unused in direct mode
    if not direct:
        sorted_R = torch.empty(blocks * BM, dtype=torch.int32, device=x_TD.device)
        block_expert = torch.empty(blocks, dtype=torch.int32, device=x_TD.device)
        counts_E = torch.empty(E, dtype=torch.int32, device=x_TD.device)
        total = torch.empty(1, dtype=torch.int32, device=x_TD.device)
        chunk = min(1024, max(16, triton.next_power_of_2(N)))
        with launching():
            _count_kernel[(E,)](
                ids_N, counts_E, N, CHUNK=chunk, PDL=on, num_warps=4, **pdl_launch(on)
            )
        with launching():
            _place_kernel[(E,)](
                ids_N, counts_E, sorted_R, block_expert, total, N,
                E=E, E_P2=triton.next_power_of_2(E), BM=BM, CHUNK=chunk, PDL=on, num_warps=4,
                **pdl_launch(on),
            )  # fmt: skip
    x = x_TD.contiguous()
    h_NI = torch.empty(N, FFN, dtype=x_TD.dtype, device=x_TD.device)
    tiles = dict(BM=BM, BN=cfg.block_n, BK=cfg.block_k, PRECISION=dot_precision(x_TD.dtype))
    launch = dict(
        DIRECT=direct, SCALED=scales is not None, PDL=on, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **pdl_launch(on),
    )  # fmt: skip
    gate_scale, up_scale, down_scale = scales if scales is not None else (ids_N, ids_N, ids_N)
    with launching():
        _gate_up_kernel[(blocks, triton.cdiv(FFN, cfg.block_n))](
            x, gate_EID, up_EID, gate_scale, up_scale, h_NI, ids_N, sorted_R, block_expert,
            total, N, D, FFN,
            TOP_K=K, **tiles, **launch,
        )  # fmt: skip
    y_ND = torch.empty(N, D, dtype=x_TD.dtype, device=x_TD.device)
    weights_N = weights_TK.reshape(-1).contiguous()
    with launching():
        _down_kernel[(blocks, triton.cdiv(D, cfg.block_n))](
            h_NI, down_EDI, down_scale, weights_N, y_ND, ids_N, sorted_R, block_expert, total,
            N, D, FFN,
            **tiles, **launch,
        )  # fmt: skip
    if summands:
        return y_ND.view(T, K, D)
    if out_TD is None:
        out_TD = torch.empty_like(x_TD)
    BD = min(1024, triton.next_power_of_2(D))
    with launching():
        _combine_kernel[(T, triton.cdiv(D, BD))](
            y_ND, ids_N, out_TD, D, TOP_K=K, BD=BD, PDL=on, num_warps=4, **pdl_launch(on)
        )
    return out_TD


def _zeros_into(out_TD: torch.Tensor | None, like_TD: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like_TD) if out_TD is None else out_TD.zero_()
