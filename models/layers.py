"""Single-device layer math shared by the reference model, attention nodes and expert nodes.

Shape legend: T = tokens in the batch, S = keys of one sequence, D = hidden size,
H = query heads, G = key/value heads, Dh = head dim, E = experts, K = top-k, I = expert FFN width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from afd.models import fp8, kernels
from afd.models.config import ModelConfig, RopeConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """torch's fused rms_norm: one kernel, statistics in fp32 whatever the activation dtype.
    In fp32 it is the HF models' arithmetic; in bf16 the weight multiplies before the one
    rounding, where HF rounds, then multiplies."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def linear(
    x_TK: torch.Tensor,
    weight_NK: torch.Tensor,
    bias_N: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x·Wᵀ + b: cuBLAS, or at a few rows the skinny Triton kernel where it was measured
    faster for this shape on this GPU (`afd.models.kernels.skinny_linear`); not where it won
    split over K, which only a caller adding partial sums can take (`linear_summands`).
    `scale`: W is fp8 with these block scales (`afd.models.fp8`): the Triton kernel on GPU,
    W dequantized on CPU."""
    if kernels.usable(x_TK) and (scale is not None or x_TK.shape[0] <= 16):
        from afd.models.kernels.skinny_linear import SkinnyConfig, skinny_linear, tuned_config

        tuned = tuned_config(x_TK, weight_NK)
        if scale is not None:  # fp8: always the Triton kernel, tuned tiles where measured
            return skinny_linear(x_TK, weight_NK, bias_N, tuned or SkinnyConfig(), scale)
        if tuned is not None and tuned.split_k == 1:  # a split's tiles were timed split
            return skinny_linear(x_TK, weight_NK, bias_N, tuned)
    if scale is not None:
        weight_NK = fp8.dequantize(weight_NK, scale, x_TK.dtype)
    return F.linear(x_TK, weight_NK, bias_N)


def linear_summands(
    x_TK: torch.Tensor,
    weight_NK: torch.Tensor,
    bias_N: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x·Wᵀ + b as S partial sums [T, S, N], for a caller that adds summands anyway (the next
    add+norm, the router's top-k). At a few rows on the kernels' devices the skinny kernel
    splits K where the tuned table says so (S > 1, fp32: a projection of few output tiles fills
    the GPU); everywhere else S = 1 in x's dtype."""
    if kernels.usable(x_TK) and x_TK.shape[0] <= 16:
        from afd.models.kernels.skinny_linear import skinny_linear, tuned_config

        tuned = tuned_config(x_TK, weight_NK)
        if tuned is not None and tuned.split_k > 1:
            return skinny_linear(x_TK, weight_NK, bias_N, tuned, scale, partials=True)
    return linear(x_TK, weight_NK, bias_N, scale)[:, None, :]


def add_rms_norm(
    h_TD: torch.Tensor, delta: torch.Tensor, weight_D: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + Δ, rms_norm(h + Δ)): the residual add and the norm after it, one kernel on GPU.
    Δ [T, D], or [T, S, D]: S summands, added in fp32 and rounded once before h adds."""
    if kernels.usable(h_TD):
        from afd.models.kernels.small_ops import add_rms_norm as fused

        return fused(h_TD, delta, weight_D, eps)
    if delta.dim() == 3:
        delta = delta.float().sum(1).to(h_TD.dtype)
    total_TD = h_TD + delta
    return total_TD, rms_norm(total_TD, weight_D, eps)


class Rope:
    """Rotary embedding tables for one model; cos/sin are computed per position on demand."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int) -> None:
        self.inv_freq, self.scale = _inv_freq(rope, head_dim, max_positions)
        # every layer of a forward asks for the same positions: (positions, dtype, capturing)
        self._last: tuple[torch.Tensor, torch.dtype, bool, tuple[torch.Tensor, torch.Tensor]]
        self._last = (torch.empty(0), torch.float32, False, (torch.empty(0), torch.empty(0)))

    def cos_sin(
        self, positions_T: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [T, Dh] of the positions, computed once per positions tensor rather than
        once per layer. The tensor is held, so its identity cannot pass to another; a result
        computed outside a CUDA graph capture is never reused inside one (the graph must
        compute it itself, to follow the positions copied in before each replay)."""
        capturing = positions_T.is_cuda and torch.cuda.is_current_stream_capturing()
        held, held_dtype, held_capturing, result = self._last
        if held is positions_T and held_dtype == dtype and held_capturing == capturing:
            return result
        result = self._cos_sin(positions_T, dtype)
        self._last = (positions_T, dtype, capturing, result)
        return result

    def inv_freq_on(self, device: torch.device) -> torch.Tensor:
        """The inverse frequencies on `device`, moved once (no copy per layer, nor in a graph)."""
        if self.inv_freq.device != device:
            self.inv_freq = self.inv_freq.to(device)
        return self.inv_freq

    def _cos_sin(
        self, positions_T: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        freqs_TF = positions_T.float()[:, None] * self.inv_freq_on(positions_T.device)[None, :]
        emb_TDh = torch.cat((freqs_TF, freqs_TF), dim=-1)
        return (emb_TDh.cos() * self.scale).to(dtype), (emb_TDh.sin() * self.scale).to(dtype)


def _inv_freq(rope: RopeConfig, dim: int, max_positions: int) -> tuple[torch.Tensor, float]:
    base = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    inv_freq = 1.0 / base
    if rope.rope_type == "default":
        return inv_freq, 1.0
    if rope.rope_type == "linear":
        return inv_freq / rope.factor, 1.0
    return _yarn(rope, dim, max_positions, inv_freq)


def _yarn(
    rope: RopeConfig, dim: int, max_positions: int, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, keep high ones, blend linearly in between."""
    original = rope.original_max_position or max_positions
    factor = rope.factor

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high: float = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    blended = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    scale = rope.attention_factor
    if scale is None:
        scale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return blended, float(scale)


def apply_rope(x_THDh: torch.Tensor, cos_TDh: torch.Tensor, sin_TDh: torch.Tensor) -> torch.Tensor:
    half = x_THDh.shape[-1] // 2
    rotated = torch.cat((-x_THDh[..., half:], x_THDh[..., :half]), dim=-1)
    return x_THDh * cos_TDh[:, None, :] + rotated * sin_TDh[:, None, :]


def causal_attention(
    q_THDh: torch.Tensor, k_SGDh: torch.Tensor, v_SGDh: torch.Tensor, q_positions_T: torch.Tensor
) -> torch.Tensor:
    """Attention of one sequence's new queries over all its keys (key j sits at position j)."""
    groups = q_THDh.shape[1] // k_SGDh.shape[1]
    k_HSDh = k_SGDh.repeat_interleave(groups, dim=1).transpose(0, 1)
    v_HSDh = v_SGDh.repeat_interleave(groups, dim=1).transpose(0, 1)
    q_HTDh = q_THDh.transpose(0, 1)
    scores_HTS = torch.matmul(q_HTDh, k_HSDh.transpose(1, 2)) * (q_THDh.shape[-1] ** -0.5)
    key_pos_S = torch.arange(k_SGDh.shape[0], device=q_THDh.device)
    masked_TS = key_pos_S[None, :] > q_positions_T[:, None]
    scores_HTS = scores_HTS.masked_fill(masked_TS[None], float("-inf"))
    probs_HTS = torch.softmax(scores_HTS, dim=-1, dtype=torch.float32).to(q_THDh.dtype)
    return torch.matmul(probs_HTS, v_HSDh).transpose(0, 1)  # [T, H, Dh]


def swiglu(
    x_TD: torch.Tensor, gate_ID: torch.Tensor, up_ID: torch.Tensor, down_DI: torch.Tensor
) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x_TD, gate_ID)) * F.linear(x_TD, up_ID), down_DI)


def route(
    x_TD: torch.Tensor, gate_ED: torch.Tensor, config: ModelConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k expert ids and their weights per token; weights in fp32 math, activation dtype out."""
    if kernels.usable(x_TD):  # softmax, top-k and renormalisation in one kernel
        from afd.models.kernels.small_ops import route_top_k

        logits_TSE = linear_summands(x_TD, gate_ED)
        return route_top_k(logits_TSE, config.top_k, config.renormalize_topk, x_TD.dtype)
    logits_TE = linear(x_TD, gate_ED)
    probs_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    weights_TK, ids_TK = torch.topk(probs_TE, config.top_k, dim=-1)
    if config.renormalize_topk:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return ids_TK, weights_TK.to(x_TD.dtype)
