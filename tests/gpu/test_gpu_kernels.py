"""The kernels compiled on the GPU at the Qwen3-30B-A3B shapes (hidden 2048, 128 experts,
top-8, expert FFN 768, 32/4 heads of 128) and at odd ones, in bf16, against the torch math in
fp32 on the same inputs (run on the GPU host; skipped elsewhere). bf16 operands: the relative
error ‖out − ref‖ / ‖ref‖ must stay under 1e-2."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from afd.models import fp8
from afd.models.layers import causal_attention, rms_norm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
E, D, FFN, K = 128, 2048, 768, 8


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-2) -> None:
    got, want = got.double().cpu(), want.double().cpu()
    assert torch.isfinite(got).all()
    assert (got - want).norm() / want.norm() < tol


def _experts(quantized: bool):
    g = torch.Generator("cuda").manual_seed(0)
    shapes = [(E, FFN, D), (E, FFN, D), (E, D, FFN)]
    ws = [torch.randn(s, generator=g, device="cuda", dtype=torch.bfloat16) / 32 for s in shapes]
    if not quantized:
        return ws, None, [w.float() for w in ws]
    qs = [fp8.quantize(w) for w in ws]
    return (
        [q for q, _ in qs],
        tuple(s for _, s in qs),
        [fp8.dequantize(q, s, torch.float32) for q, s in qs],
    )


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("case", ["one token", "batch 64", "all on one expert", "prefill 300"])
def test_fused_experts_at_the_model_shape(quantized: bool, case: str) -> None:
    from afd.models.kernels.fused_moe import fused_experts

    T = {"one token": 1, "batch 64": 64, "all on one expert": 40, "prefill 300": 300}[case]
    (gate, up, down), scales, (g32, u32, d32) = _experts(quantized)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    ids = torch.rand(T, E, device="cuda").argsort(-1)[:, :K]
    if case == "all on one expert":
        ids[:, 0], ids[:, 1:] = 5, -1
    weights = torch.rand(T, K, device="cuda", dtype=torch.bfloat16)
    got = fused_experts(x, gate, up, down, ids, weights, scales=scales)
    want = torch.zeros(T, D, device="cuda")
    for t in range(T):
        for k in range(K):
            e = int(ids[t, k])
            if e >= 0:
                h = F.silu(g32[e] @ x[t].float()) * (u32[e] @ x[t].float())
                want[t] += weights[t, k].float() * (d32[e] @ h)
    _close(got, want)


@pytest.mark.parametrize("lengths", [[1], [1, 100, 1000, 17]])
def test_paged_decode_attention_at_the_model_shape(lengths: list[int]) -> None:
    from afd.models.kernels.decode_attention import paged_decode_attention

    H, G, Dh, BS, NB = 32, 4, 128, 16, 256
    k_cache = torch.randn(NB, BS, G, Dh, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn(NB, BS, G, Dh, device="cuda", dtype=torch.bfloat16)
    free = torch.randperm(NB).tolist()
    tables = [[free.pop() for _ in range(-(-n // BS))] for n in lengths]
    M = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (M - len(t)) for t in tables], device="cuda")
    q = torch.randn(len(lengths), H, Dh, device="cuda", dtype=torch.bfloat16)
    got = paged_decode_attention(
        q, k_cache, v_cache, table, torch.tensor(lengths, device="cuda") - 1
    )
    for b, n in enumerate(lengths):
        slots = torch.tensor([t * BS + i for t in tables[b] for i in range(BS)][:n], device="cuda")
        keys, values = k_cache.flatten(0, 1)[slots].float(), v_cache.flatten(0, 1)[slots].float()
        want = causal_attention(
            q[b : b + 1].float(), keys, values, torch.tensor([n - 1], device="cuda")
        )
        _close(got[b], want[0])


def test_the_small_ops_at_the_model_shape() -> None:
    from afd.models.kernels.small_ops import add_rms_norm, route_top_k

    h, delta = (torch.randn(64, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w = torch.randn(D, device="cuda", dtype=torch.bfloat16)
    total, normed = add_rms_norm(h, delta, w, 1e-6)
    _close(total, h.float() + delta.float())
    _close(normed, rms_norm((h + delta).float(), w.float(), 1e-6))
    logits = torch.randn(64, E, device="cuda")  # fp32: no ties, so the ids must agree
    ids, weights = route_top_k(logits, K, True)
    want_w, want_ids = torch.topk(torch.softmax(logits, -1), K)
    assert torch.equal(ids, want_ids)
    _close(weights, want_w / want_w.sum(-1, keepdim=True), 1e-5)


@pytest.mark.parametrize("rows", [1, 16, 100])
def test_the_triton_linear_at_the_model_shape(rows: int) -> None:
    from afd.models.kernels.skinny_linear import SkinnyConfig, skinny_linear

    w = torch.randn(5120, D, device="cuda", dtype=torch.bfloat16) / 32
    x = torch.randn(rows, D, device="cuda", dtype=torch.bfloat16)
    q, scale = fp8.quantize(w)
    got = skinny_linear(x, q, None, SkinnyConfig(), scale)
    _close(got, x.float() @ fp8.dequantize(q, scale, torch.float32).T)
    if rows <= 16:
        _close(skinny_linear(x, w, None, SkinnyConfig()), x.float() @ w.float().T)


def test_partial_sums_round_once_in_the_activation_dtype() -> None:
    """A split projection's fp32 partial sums, added by the router's top-k and by the next
    add+norm in order and rounded once to bf16: the same bits as a bf16 projection output of
    that sum going through the same kernels."""
    from afd.models.kernels.small_ops import add_rms_norm, route_top_k

    g = torch.Generator("cuda").manual_seed(3)
    parts = torch.randn(16, 4, E, generator=g, device="cuda")  # [T, S, E] fp32
    summed = (((parts[:, 0] + parts[:, 1]) + parts[:, 2]) + parts[:, 3]).to(torch.bfloat16)
    ids, weights = route_top_k(parts, K, True, torch.bfloat16)
    want_ids, want_weights = route_top_k(summed, K, True)
    assert torch.equal(ids, want_ids) and torch.equal(weights, want_weights)
    parts_D = torch.randn(16, 4, D, generator=g, device="cuda")
    h = torch.randn(16, D, generator=g, device="cuda").to(torch.bfloat16)
    w = torch.rand(D, generator=g, device="cuda").to(torch.bfloat16)
    summed_D = ((parts_D[:, 0] + parts_D[:, 1]) + parts_D[:, 2]) + parts_D[:, 3]
    got = add_rms_norm(h, parts_D, w, 1e-6)
    want = add_rms_norm(h, summed_D.to(torch.bfloat16), w, 1e-6)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
