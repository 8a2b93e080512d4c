"""Block-scaled FP8 (E4M3) weights, as Qwen3-FP8 and DeepSeek-V3 checkpoints ship them: each
128×128 block of a weight [.., N, K] stored in float8_e4m3fn with one fp32 scale, the block's
largest magnitude over 448 (E4M3's largest finite value). Dequantised: q · scale.

`model.quantization: fp8` quantizes the attention projections and the routed experts at load
(from a bf16 checkpoint or dummy weights); an FP8 checkpoint is read through its
`weight_scale_inv` tensors (`Checkpoint`). Decode reads every weight once a step and is bound
by those bytes, so the weights are what is quantized: activations stay in the compute dtype and
each weight tile is scaled up in the GEMM's registers (the kernels in `afd.models.kernels`;
on CPU, `dequantize` then the usual matmul — the same arithmetic).

Shape legend: N = output features, K = input features, SN/SK = scale blocks (⌈N/128⌉, ⌈K/128⌉).
"""

from __future__ import annotations

import torch

BLOCK = 128
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
QUANTIZATIONS = ("none", "fp8")


def scale_shape(shape: tuple[int, ...], block: int = BLOCK) -> tuple[int, ...]:
    *lead, N, K = shape
    return (*lead, -(-N // block), -(-K // block))


def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int, int]:
    """x [.., N, K] zero-padded to whole blocks, viewed [.., SN, block, SK, block]."""
    *lead, N, K = x.shape
    SN, SK = -(-N // block), -(-K // block)
    padded = torch.nn.functional.pad(x, (0, SK * block - K, 0, SN * block - N))
    return padded.reshape(*lead, SN, block, SK, block), N, K


def quantize(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(q in float8_e4m3fn, fp32 scales [.., SN, SK]) with w ≈ q · scale per block."""
    blocks, N, K = _blocks(w.float(), block)
    amax = blocks.abs().amax(dim=(-3, -1), keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, 1.0)
    q = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    *lead, SN, _, SK, _ = blocks.shape
    q = q.reshape(*lead, SN * block, SK * block)[..., :N, :K].contiguous()
    return q, scale.reshape(*lead, SN, SK)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, block: int = BLOCK
) -> torch.Tensor:
    """q · scale block by block, in `dtype` (one rounding, from fp32)."""
    *lead, N, K = q.shape
    if tuple(scale.shape) != scale_shape(tuple(q.shape), block):
        raise ValueError(
            f"fp8 scales of shape {list(scale.shape)} do not fit a weight of shape {list(q.shape)} "
            f"in blocks of {block}: expected {list(scale_shape(tuple(q.shape), block))}"
        )
    full = scale.float().repeat_interleave(block, -2).repeat_interleave(block, -1)
    return (q.float() * full[..., :N, :K]).to(dtype)


def quantize_rows(x_TD: torch.Tensor, group: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations for the exchange: each row's groups of `group` features in E4M3 with one
    fp32 scale each, the group's largest magnitude over 448: (q [T, D] float8_e4m3fn, scales
    [T, ⌈D/group⌉]). Half the bytes of bf16 rows on the wire (a quarter of fp32's)."""
    T, D = x_TD.shape
    G = -(-D // group)
    padded = torch.nn.functional.pad(x_TD.float(), (0, G * group - D)).view(T, G, group)
    amax = padded.abs().amax(dim=-1, keepdim=True)
    # a group holding inf or NaN keeps scale 1 (its values clamp): the frame stays valid and
    # the numbers carry the fault, as they would in the model's dtype
    scale = torch.where(torch.isfinite(amax) & (amax > 0), amax / FP8_MAX, 1.0)
    q = (padded / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(T, G * group)[:, :D]
    return q.contiguous(), scale.view(T, G)


def dequantize_rows(
    q_TD: torch.Tensor, scale_TG: torch.Tensor, dtype: torch.dtype, group: int = BLOCK
) -> torch.Tensor:
    """q · scale group by group, in `dtype` (`quantize_rows` undone, up to E4M3's rounding)."""
    T, D = q_TD.shape
    full = scale_TG.float().repeat_interleave(group, -1)[:, :D]
    return (q_TD.float() * full).to(dtype)


def pack_rows(x_TD: torch.Tensor, group: int = BLOCK) -> torch.Tensor:
    """`quantize_rows` as one uint8 tensor [T, D + 4·⌈D/group⌉]: the E4M3 bytes, then the fp32
    scales' bytes. One tensor, so an fp8 frame has as many messages as a frame in the model's
    dtype (each tensor of a large frame is a message of its own)."""
    q, scale = quantize_rows(x_TD, group)
    return torch.cat([q.view(torch.uint8), scale.view(torch.uint8)], dim=1)


def unpack_rows(
    packed: torch.Tensor, D: int, group: int = BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [T, D] float8_e4m3fn, scales [T, ⌈D/group⌉] fp32) of `pack_rows`' tensor; ValueError
    when it is not one for rows of D features."""
    G = -(-D // group)
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != D + 4 * G:
        raise ValueError(
            f"packed fp8 rows must be uint8 [n, {D + 4 * G}], got {packed.dtype} "
            f"{list(packed.shape)}"
        )
    q = packed[:, :D].contiguous().view(FP8)
    return q, packed[:, D:].contiguous().view(torch.float32)
