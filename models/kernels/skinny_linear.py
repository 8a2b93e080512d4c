"""x·Wᵀ (+ b) streaming W once: the attention side's projections at small decode batches,
and every projection whose weight is fp8.

With 1–16 rows a projection is a pass over W; cuBLAS's kernels for that shape reached about a
third of the copy bandwidth on an H100 (bench/NOTES.md). Here each program owns a slice of
W's rows (output columns) and streams it once, all the batch's rows at once in one 16-row
tile. For bf16 weights it is used only where `bench/tune_kernels.py` measured it faster than
cuBLAS for the shape. An fp8 weight (128×128 block scales, `afd.models.fp8`) always goes
through it, at any row count (tiles of up to 64 rows): each weight tile is scaled up to the
activations' dtype in registers, so the bytes read are half of bf16's. A tile's columns divide
128, so they share one row of scale blocks; along K a tile may span several blocks (a scale
per 128 of K), which lets fp8 tiles be as wide as bf16's.

Shape legend: M = rows, N = output features, K = input features.
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

MAX_ROWS = 16


@dataclass(frozen=True, slots=True)
class SkinnyConfig:
    block_n: int = 32
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 4
    split_k: int = 1  # programs along K, for a caller that adds partial sums (`partials`)


@triton.jit(do_not_specialize=["M"])
def _skinny_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K]
    scale_ptr,  # [⌈N/128⌉, ⌈K/128⌉] (with SCALED)
    bias_ptr,  # [N] (unused without HAS_BIAS)
    out_ptr,  # [M, N], or [M, S, N] partial sums
    M,
    N,
    K,
    K_SPLIT,  # K elements each split covers (a multiple of BK)
    HAS_BIAS: tl.constexpr,
    SCALED: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_prior(PDL)
    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    split, splits = tl.program_id(2), tl.num_programs(2)
    inner = tl.arange(0, BK)
    x_at = x_ptr + rows[:, None].to(tl.int64) * K + inner[None, :]
    w_at = w_ptr + cols[None, :].to(tl.int64) * K + inner[:, None]  # [BK, BN]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k in range(split * K_SPLIT, tl.minimum(K, (split + 1) * K_SPLIT), BK):
        in_k = k + inner < K
        a = tl.load(x_at + k, mask=(rows < M)[:, None] & in_k[None, :], other=0.0)
        w = tl.load(w_at + k, mask=in_k[:, None] & (cols < N)[None, :], other=0.0)
        if SCALED:  # the tile's columns share a row of 128×128 scale blocks (BN divides 128)
            s_at = (tl.program_id(0) * BN // 128) * tl.cdiv(K, 128) + (k + inner) // 128
            s = tl.load(scale_ptr + s_at, mask=in_k, other=0.0)
            w = (w.to(tl.float32) * s[:, None]).to(a.dtype)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        acc += tl.where(split == 0, bias, 0.0)[None, :]  # once, in the first split
    out = out_ptr + (rows[:, None].to(tl.int64) * splits + split) * N + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rows < M)[:, None] & (cols < N)[None, :])


def tuned_config(x_MK: torch.Tensor, w_NK: torch.Tensor) -> SkinnyConfig | None:
    """The measured winner for this shape, weight dtype (bf16, or fp8 with block scales),
    batch and GPU; None where cuBLAS won, nothing was measured, or past `MAX_ROWS` rows."""
    M, (N, K) = x_MK.shape[0], w_NK.shape
    if M > MAX_ROWS:
        return None
    return _tuned(M, N, K, w_NK.dtype, x_MK.device)


@cache
def _tuned(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> SkinnyConfig | None:
    """Looked up once per shape: layers call this on every eager step."""
    found, entry = lookup(shape_key("linear", dtype, device_name(device), N=N, K=K), M)
    return SkinnyConfig(**entry) if found and entry else None


def skinny_linear(
    x_MK: torch.Tensor,
    w_NK: torch.Tensor,
    bias_N: torch.Tensor | None,
    config: SkinnyConfig,
    scale: torch.Tensor | None = None,
    partials: bool = False,
) -> torch.Tensor:
    """x·Wᵀ + b in x's dtype; `scale`: W is fp8 with these 128×128 block scales.

    `partials`: the caller adds partial sums anyway (the next add+norm, the router's top-k),
    so with the config's `split_k` = S > 1 the programs also split K, and the result is S fp32
    partial sums [M, S, N] (bias in the first): a projection of few output tiles (the router's
    128 columns are 8 programs) fills the GPU. Without a split: [M, 1, N] in x's dtype."""
    M, K = x_MK.shape
    N = w_NK.shape[0]
    if scale is None and M > MAX_ROWS:
        raise ValueError(f"skinny_linear takes at most {MAX_ROWS} rows of bf16, got {M}")
    block_k = config.block_k
    if scale is not None and 128 % config.block_n:
        raise ValueError(f"fp8 weights need tiles of columns that divide 128, got {config.block_n}")
    S = min(config.split_k, triton.cdiv(K, block_k)) if partials else 1
    k_split = triton.cdiv(triton.cdiv(K, S), block_k) * block_k
    S = triton.cdiv(K, k_split)  # rounding k_split up may leave a last split with nothing
    dtype = torch.float32 if S > 1 else x_MK.dtype
    out = torch.empty(M, S, N, dtype=dtype, device=x_MK.device)
    if M == 0:
        return out if partials else out[:, 0]
    BM = min(64, max(16, triton.next_power_of_2(M)))
    on = pdl(x_MK)
    with launching():
        _skinny_kernel[(triton.cdiv(N, config.block_n), triton.cdiv(M, BM), S)](
            x_MK.contiguous(),
            w_NK,
            scale if scale is not None else w_NK,
            bias_N if bias_N is not None else w_NK,
            out,
            M,
            N,
            K,
            k_split,
            HAS_BIAS=bias_N is not None,
            SCALED=scale is not None,
            BM=BM,
            BN=config.block_n,
            BK=block_k,
            PRECISION=dot_precision(x_MK.dtype),
            num_warps=config.num_warps,
            num_stages=config.num_stages,
            PDL=on,
            **pdl_launch(on),
        )
    return out if partials else out[:, 0]
