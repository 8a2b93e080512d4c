"""The small per-token steps of a layer, each one kernel instead of several torch ops:

- `add_rms_norm`: the residual add and the next RMSNorm (h + Δ rounded like the unfused add,
  then normalised from the rounded sum);
- `route_top_k`: the router's softmax, top-k and renormalisation;
- `qk_norm_rope_store`: per-head q/k RMSNorm, RoPE on q and k, and the new K/V written into
  their paged-cache slots;
- `count_slots`: an expert node's tokens per local expert (its load report), on the device.

Each follows the torch math in `afd.models.layers` / `afd.models.attention`, with fp32 inside
and one rounding where torch rounds after several ops (a few bf16 ulps apart at most).

Shape legend: T = tokens, D = hidden, E = experts, K = top-k, H = query heads, G = kv heads,
Dh = head dim.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from afd.models.kernels import launching
from afd.models.kernels.pdl import pdl, pdl_launch, wait_for_prior


@triton.jit
def _add_rms_norm_kernel(
    h_ptr,  # [T, D]
    delta_ptr,  # [T, S, D]: S summands
    weight_ptr,
    sum_ptr,
    norm_ptr,
    D,
    eps,
    S: tl.constexpr,
    BD: tl.constexpr,
    PDL: tl.constexpr,
):
    """With S > 1 the summands add in order in fp32 and round once (what the fused MoE's
    combine did), then h adds: the same bits as the combine kernel followed by this one."""
    wait_for_prior(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BD)
    inside = cols < D
    h = tl.load(h_ptr + row * D + cols, mask=inside, other=0.0).to(tl.float32)
    delta = tl.zeros([BD], dtype=tl.float32)
    for s in tl.static_range(S):
        delta += tl.load(delta_ptr + (row * S + s) * D + cols, mask=inside, other=0.0).to(
            tl.float32
        )
    if S > 1:
        delta = delta.to(sum_ptr.dtype.element_ty).to(tl.float32)
    total = (h + delta).to(sum_ptr.dtype.element_ty)
    tl.store(sum_ptr + row * D + cols, total, mask=inside)
    s = total.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / D + eps)
    w = tl.load(weight_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(norm_ptr + row * D + cols, (s * rstd * w).to(norm_ptr.dtype.element_ty), mask=inside)


def add_rms_norm(
    h_TD: torch.Tensor, delta: torch.Tensor, weight_D: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + Δ, rms_norm(h + Δ) · weight); Δ [T, D], or [T, S, D]: S summands (the fused MoE's
    per-slot outputs), summed here rather than by a kernel of their own."""
    T, D = h_TD.shape
    sum_TD, norm_TD = torch.empty_like(h_TD), torch.empty_like(h_TD)
    if T:
        on = pdl(h_TD)
        with launching():
            _add_rms_norm_kernel[(T,)](
                h_TD.contiguous(),
                delta.contiguous(),
                weight_D,
                sum_TD,
                norm_TD,
                D,
                eps,
                S=delta.shape[1] if delta.dim() == 3 else 1,
                BD=triton.next_power_of_2(D),
                PDL=on,
                num_warps=4,
                **pdl_launch(on),
            )
    return sum_TD, norm_TD


@triton.jit
def _route_kernel(
    logits_ptr,  # [T, S, E]: S partial sums
    ids_ptr,  # [T, K] int64 out
    weights_ptr,  # [T, K] out
    E,
    S: tl.constexpr,
    K: tl.constexpr,
    K_P2: tl.constexpr,
    E_P2: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_prior(PDL)
    row = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, E_P2)
    logits = tl.zeros([E_P2], dtype=tl.float32)
    for s in tl.static_range(S):
        at = logits_ptr + (row * S + s) * E + experts
        logits += tl.load(at, mask=experts < E, other=float("-inf")).to(tl.float32)
    if S > 1:  # rounded as the projection's output would have been
        logits = logits.to(weights_ptr.dtype.element_ty).to(tl.float32)
    top = tl.max(logits, axis=0)
    denominator = tl.sum(tl.exp(logits - top), axis=0)
    slots = tl.arange(0, K_P2)
    picked = tl.zeros([K_P2], dtype=tl.float32)
    chosen = tl.zeros([K_P2], dtype=tl.int64)
    for k in tl.static_range(K):
        best = tl.argmax(logits, axis=0)  # the lowest id among equal logits
        prob = tl.exp(tl.max(logits, axis=0) - top) / denominator
        picked = tl.where(slots == k, prob, picked)
        chosen = tl.where(slots == k, best.to(tl.int64), chosen)
        logits = tl.where(experts == best, float("-inf"), logits)
    if RENORMALIZE:
        picked = picked / tl.sum(picked, axis=0)
    tl.store(ids_ptr + row * K + slots, chosen, mask=slots < K)
    tl.store(weights_ptr + row * K + slots, picked.to(weights_ptr.dtype.element_ty), mask=slots < K)


def route_top_k(
    logits: torch.Tensor, top_k: int, renormalize: bool, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k expert ids (int64, by falling probability) and their softmax weights, in `dtype`
    (default: the logits'); renormalised to sum to one when the model says so. The logits are
    [T, E], or [T, S, E]: S partial sums (a split projection's), added in fp32 and rounded to
    `dtype` first."""
    T, E = logits.shape[0], logits.shape[-1]
    S = logits.shape[1] if logits.dim() == 3 else 1
    ids_TK = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    weights_TK = torch.empty(T, top_k, dtype=dtype or logits.dtype, device=logits.device)
    if T:
        on = pdl(logits)
        with launching():
            _route_kernel[(T,)](
                logits.contiguous(),
                ids_TK,
                weights_TK,
                E,
                S=S,
                K=top_k,
                K_P2=triton.next_power_of_2(top_k),
                E_P2=triton.next_power_of_2(E),
                RENORMALIZE=renormalize,
                PDL=on,
                num_warps=1,
                **pdl_launch(on),
            )
    return ids_TK, weights_TK


@triton.jit
def _qk_norm_rope_store_kernel(
    qkv_ptr,  # [T, (H + 2G)·Dh]
    positions_ptr,  # [T]
    slots_ptr,  # [T] cache slot of each token
    q_norm_ptr,  # [Dh] (unused without NORM)
    k_norm_ptr,
    inv_freq_ptr,  # [Dh / 2]
    q_ptr,  # [T, H, Dh] out
    k_cache_ptr,  # [slots, G, Dh]
    v_cache_ptr,
    rope_scale,
    eps,
    H: tl.constexpr,
    G: tl.constexpr,
    DH: tl.constexpr,
    NORM: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program (t, j) takes head j of token t: a query head, then the key heads, then the
    value heads. One head a program: at one token the heads are the only parallelism, and a
    program's chain of loads, reductions and stores is what a kernel this small costs
    (one program for all heads: 3.4 µs at one token, a program a head: 1.9; bench/NOTES.md)."""
    wait_for_prior(PDL)
    token, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
    d = tl.arange(0, DH)
    half: tl.constexpr = DH // 2
    partner = (d + half) % DH  # rotate_half's source column
    row = qkv_ptr + (token * (H + 2 * G) + head) * DH
    x = tl.load(row + d).to(tl.float32)
    slot = tl.load(slots_ptr + token)
    dtype = q_ptr.dtype.element_ty
    if head >= H + G:  # a value head: straight into the cache
        tl.store(v_cache_ptr + (slot * G + head - H - G) * DH + d, x.to(dtype))
        return
    x_partner = tl.load(row + partner).to(tl.float32)
    if NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / DH + eps)
        if head < H:
            w = tl.load(q_norm_ptr + d).to(tl.float32)
            w_partner = tl.load(q_norm_ptr + partner).to(tl.float32)
        else:
            w = tl.load(k_norm_ptr + d).to(tl.float32)
            w_partner = tl.load(k_norm_ptr + partner).to(tl.float32)
        x = (x * rstd * w).to(dtype).to(tl.float32)
        x_partner = (x_partner * rstd * w_partner).to(dtype).to(tl.float32)
    position = tl.load(positions_ptr + token).to(tl.float32)
    angle = position * tl.load(inv_freq_ptr + d % half)
    cos = (tl.cos(angle) * rope_scale).to(dtype).to(tl.float32)
    sin = (tl.sin(angle) * rope_scale).to(dtype).to(tl.float32)
    out = (x * cos + tl.where(d < half, -x_partner, x_partner) * sin).to(dtype)
    if head < H:
        tl.store(q_ptr + (token * H + head) * DH + d, out)
    else:
        tl.store(k_cache_ptr + (slot * G + head - H) * DH + d, out)


def qk_norm_rope_store(
    qkv_TX: torch.Tensor,
    positions_T: torch.Tensor,
    slots_T: torch.Tensor,
    q_norm_Dh: torch.Tensor | None,
    k_norm_Dh: torch.Tensor | None,
    eps: float,
    inv_freq: torch.Tensor,
    rope_scale: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> torch.Tensor:
    """Rotated (and, with norm weights, per-head normalised) queries [T, H, Dh]; the new keys
    (likewise) and values go straight into `k_cache`/`v_cache` ([NB, BS, G, Dh]) at `slots_T`."""
    G, Dh = k_cache.shape[-2], k_cache.shape[-1]
    T = qkv_TX.shape[0]
    H = qkv_TX.shape[1] // Dh - 2 * G
    q_THDh = torch.empty(T, H, Dh, dtype=qkv_TX.dtype, device=qkv_TX.device)
    if T:
        norm = q_norm_Dh is not None and k_norm_Dh is not None
        on = pdl(qkv_TX)
        with launching():
            _qk_norm_rope_store_kernel[(T, H + 2 * G)](
                qkv_TX.contiguous(),
                positions_T,
                slots_T,
                q_norm_Dh if norm else inv_freq,
                k_norm_Dh if norm else inv_freq,
                inv_freq,
                q_THDh,
                k_cache,
                v_cache,
                rope_scale,
                eps,
                H=H,
                G=G,
                DH=Dh,
                NORM=norm,
                PDL=on,
                num_warps=1,
                **pdl_launch(on),
            )
    return q_THDh


@triton.jit(do_not_specialize=["N", "elsewhere"])
def _count_slots_kernel(ids_ptr, counts_ptr, N, elsewhere, BLOCK: tl.constexpr):
    at = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + at, mask=at < N, other=0)
    column = tl.where(ids >= 0, ids, elsewhere).to(tl.int64)
    tl.atomic_add(counts_ptr + column, tl.full([BLOCK], 1, tl.int64), mask=at < N, sem="relaxed")


def count_slots(ids_TK: torch.Tensor, counts_C: torch.Tensor) -> None:
    """counts_C[e] += the (token, slot) pairs on local expert e; pairs with id -1 (held
    elsewhere) count in the last column. Integer atomics: the same counts in any order. One
    kernel where torch takes four (a cast, a `where`, the ones, the scatter)."""
    N = ids_TK.numel()
    if N == 0:
        return
    block = min(1024, triton.next_power_of_2(N))
    with launching():
        _count_slots_kernel[(triton.cdiv(N, block),)](
            ids_TK.contiguous(), counts_C, N, counts_C.shape[0] - 1, BLOCK=block
        )
