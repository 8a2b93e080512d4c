"""The Triton kernels against the torch math they replace. Without a GPU they run in Triton's
interpreter on CPU tensors (tests/conftest.py turns it on), in fp32, so each must equal its
reference to fp32 rounding; tests/gpu runs the same kernels compiled."""

from __future__ import annotations

import pytest
import torch
from afd.models import kernels
from afd.models.attention import PagedAttention, PagedMetadata
from afd.models.batch import TokenBatch
from afd.models.config import RopeConfig
from afd.models.layers import Rope, apply_rope, causal_attention, rms_norm

pytestmark = pytest.mark.skipif(not kernels.HAVE_TRITON, reason="Triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _loop_experts(x, gate, up, down, ids, weights):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e >= 0:
                h = torch.nn.functional.silu(gate[e] @ x[t]) * (up[e] @ x[t])
                out[t] += weights[t, k] * (down[e] @ h)
    return out


@pytest.mark.parametrize(
    "tokens,experts,top_k,case",
    [
        (1, 8, 2, "random"),  # few pairs: each its own block, no alignment (`is_direct`)
        (3, 64, 2, "left-out"),  # the same, with slots held elsewhere
        (7, 8, 2, "left-out"),
        (40, 16, 4, "random"),
        (9, 8, 4, "one-expert"),
    ],
)
def test_fused_experts_equal_the_per_expert_loop(tokens, experts, top_k, case) -> None:
    from afd.models.kernels.fused_moe import MoEConfig, fused_experts

    g = torch.Generator().manual_seed(tokens)
    D, FFN = 64, 48
    x = torch.randn(tokens, D, generator=g)
    gate, up = (torch.randn(experts, FFN, D, generator=g) / 8 for _ in range(2))
    down = torch.randn(experts, D, FFN, generator=g) / 8
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    from afd.models.kernels.fused_moe import is_direct

    assert is_direct(tokens * top_k, experts, top_k) == (tokens <= 3)
    if case == "left-out":  # experts held by another node: -1, in one slot and a whole row
        ids[0, 0], ids[2, :] = -1, -1
    if case == "one-expert":  # every token on expert 3 (and its other slots left out)
        ids[:, 0], ids[:, 1:] = 3, -1
    weights = torch.rand(tokens, top_k, generator=g)
    want = _loop_experts(x, gate, up, down, ids, weights)
    args = [t.to(DEVICE) for t in (x, gate, up, down, ids, weights)]
    with kernels.force():
        got = fused_experts(*args, MoEConfig(block_m=16, block_n=32, block_k=32))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    if case == "left-out":
        assert torch.equal(got[2].cpu(), torch.zeros(D))


@pytest.mark.parametrize("tokens", [1, 20])
def test_fused_experts_with_fp8_weights_equal_the_loop_over_dequantized_ones(tokens) -> None:
    """Block-scaled fp8 experts (blocks of 128 over a 160-wide hidden: two blocks, one
    partial), scaled up tile by tile in the kernel, against the same dequantized weights."""
    from afd.models.fp8 import dequantize, quantize
    from afd.models.kernels.fused_moe import MoEConfig, fused_experts

    g = torch.Generator().manual_seed(7)
    E, D, FFN, K = 8, 160, 48, 2
    x = torch.randn(tokens, D, generator=g)
    weights_q = [
        quantize(torch.randn(E, FFN, D, generator=g) / 8),
        quantize(torch.randn(E, FFN, D, generator=g) / 8),
        quantize(torch.randn(E, D, FFN, generator=g) / 8),
    ]
    gate, up, down = (dequantize(q, s, torch.float32) for q, s in weights_q)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens)])
    weights = torch.rand(tokens, K, generator=g)
    want = _loop_experts(x, gate, up, down, ids, weights)
    on = [t.to(DEVICE) for t in (x, *(q for q, _ in weights_q), ids, weights)]
    scales = tuple(s.to(DEVICE) for _, s in weights_q)
    for block_k in (64, 256):  # within one scale block; across two (one partial)
        cfg = MoEConfig(block_m=16, block_n=32, block_k=block_k)
        got = fused_experts(*on, cfg, scales=scales)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="divide 128"):
        fused_experts(*on, MoEConfig(block_n=48), scales=scales)


def test_add_rms_norm_equals_add_then_norm() -> None:
    from afd.models.kernels.small_ops import add_rms_norm

    h, delta, w = torch.randn(5, 48), torch.randn(5, 48), torch.randn(48)
    total, norm = add_rms_norm(h.to(DEVICE), delta.to(DEVICE), w.to(DEVICE), 1e-6)
    torch.testing.assert_close(total.cpu(), h + delta)
    torch.testing.assert_close(norm.cpu(), rms_norm(h + delta, w, 1e-6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("renormalize", [True, False])
def test_route_top_k_equals_softmax_then_topk(renormalize: bool) -> None:
    from afd.models.kernels.small_ops import route_top_k

    logits = torch.randn(6, 12)
    probs = torch.softmax(logits, -1)
    want_w, want_ids = torch.topk(probs, 3, dim=-1)
    if renormalize:
        want_w = want_w / want_w.sum(-1, keepdim=True)
    ids, w = route_top_k(logits.to(DEVICE), 3, renormalize)
    assert torch.equal(ids.cpu(), want_ids)
    torch.testing.assert_close(w.cpu(), want_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tokens", [1, 20])  # each pair its own block; aligned
def test_the_experts_summands_added_by_the_next_norm_equal_their_combined_sum(tokens) -> None:
    """The colocated engine's MoE hands the next add+norm its K weighted outputs: the same
    bits as the combine kernel's sum added by the same kernel."""
    from afd.models import layers
    from afd.models.kernels.fused_moe import MoEConfig, fused_experts
    from afd.models.kernels.small_ops import add_rms_norm

    g = torch.Generator().manual_seed(tokens)
    E, D, FFN, K = 8, 64, 48, 2
    x, h = torch.randn(tokens, D, generator=g), torch.randn(tokens, D, generator=g)
    gate, up = (torch.randn(E, FFN, D, generator=g) / 8 for _ in range(2))
    down = torch.randn(E, D, FFN, generator=g) / 8
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens)])
    weights, norm_w = torch.rand(tokens, K, generator=g), torch.rand(D, generator=g)
    args = [t.to(DEVICE) for t in (x, gate, up, down, ids, weights)]
    cfg = MoEConfig(block_m=16, block_n=32, block_k=32)
    with kernels.force():
        summed = fused_experts(*args, cfg)
        parts = fused_experts(*args, cfg, summands=True)
        assert parts.shape == (tokens, K, D)
        want = add_rms_norm(h.to(DEVICE), summed, norm_w.to(DEVICE), 1e-6)
        got = add_rms_norm(h.to(DEVICE), parts, norm_w.to(DEVICE), 1e-6)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    with kernels.force(False):  # the torch path takes the summands too
        plain = layers.add_rms_norm(h, parts.cpu(), norm_w, 1e-6)
    for a, b in zip(plain, want, strict=True):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="summands"):
        fused_experts(*args, cfg, out_TD=torch.empty(tokens, D), summands=True)


def test_route_top_k_puts_the_lowest_id_first_among_equal_logits() -> None:
    from afd.models.kernels.small_ops import route_top_k

    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0, -1.0], [0.0] * 7])
    ids, w = route_top_k(logits.to(DEVICE), 4, renormalize=False)
    assert ids.cpu().tolist() == [[1, 2, 4, 5], [0, 1, 2, 3]]
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(w.cpu(), probs.gather(1, ids.cpu()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm", [True, False])
def test_qk_norm_rope_store_equals_the_unfused_steps(norm: bool) -> None:
    from afd.models.kernels.small_ops import qk_norm_rope_store

    T, H, G, Dh, slots = 4, 4, 2, 16, 32
    qkv = torch.randn(T, (H + 2 * G) * Dh)
    positions = torch.tensor([0, 5, 17, 300])
    slot = torch.tensor([3, 9, 10, 31])
    qw, kw = torch.randn(Dh), torch.randn(Dh)
    rope = Rope(RopeConfig(theta=10000.0), Dh, 512)
    q, k, v = qkv.view(T, H + 2 * G, Dh).split([H, G, G], dim=1)
    if norm:
        q, k = rms_norm(q, qw, 1e-6), rms_norm(k, kw, 1e-6)
    cos, sin = rope.cos_sin(positions, torch.float32)
    want_q, want_k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k_cache, v_cache = (torch.zeros(2, slots // 2, G, Dh, device=DEVICE) for _ in range(2))
    on = [t.to(DEVICE) for t in (qkv, positions, slot, qw, kw, rope.inv_freq)]
    got_q = qk_norm_rope_store(
        *on[:3], on[3] if norm else None, on[4] if norm else None, 1e-6, on[5], rope.scale,
        k_cache, v_cache,
    )  # fmt: skip
    k_cache, v_cache = k_cache.cpu(), v_cache.cpu()
    torch.testing.assert_close(got_q.cpu(), want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_cache.flatten(0, 1)[slot], want_k, rtol=1e-5, atol=1e-5)
    assert torch.equal(v_cache.flatten(0, 1)[slot], v)
    untouched = torch.ones(slots, dtype=torch.bool)
    untouched[slot] = False
    assert not k_cache.flatten(0, 1)[untouched].any()


def test_paged_decode_attention_equals_attention_over_each_sequence() -> None:
    """Contexts of 1, 70 and 200 keys in shuffled blocks: one split and several."""
    from afd.models.kernels.decode_attention import paged_decode_attention, splits_for

    H, G, Dh, BS, NB = 4, 2, 16, 8, 64
    lengths = [1, 70, 200]
    g = torch.Generator().manual_seed(0)
    k_cache, v_cache = (
        torch.randn(NB, BS, G, Dh, generator=g),
        torch.randn(NB, BS, G, Dh, generator=g),
    )
    free = torch.randperm(NB, generator=g).tolist()
    tables = [[free.pop() for _ in range(-(-n // BS))] for n in lengths]
    M = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (M - len(t)) for t in tables])
    q = torch.randn(len(lengths), H, Dh, generator=g)
    on = [t.to(DEVICE) for t in (q, k_cache, v_cache, table, torch.tensor(lengths) - 1)]
    got = paged_decode_attention(*on).cpu()
    assert splits_for(len(lengths), G, M * BS) > 1
    for b, n in enumerate(lengths):
        slots = [t * BS + i for t in tables[b] for i in range(BS)][:n]
        keys, values = k_cache.flatten(0, 1)[slots], v_cache.flatten(0, 1)[slots]
        want = causal_attention(q[b : b + 1], keys, values, torch.tensor([n - 1]))
        torch.testing.assert_close(got[b], want[0], rtol=1e-5, atol=1e-5)
    one = paged_decode_attention(on[0][:1], *on[1:3], on[3][:1, :1], on[4][:1])
    torch.testing.assert_close(one[0].cpu(), got[0])


def test_split_counts_follow_the_measured_table() -> None:
    """bench/NOTES.md, session 11: batch 1, 4 kv heads on an H100."""
    from afd.models.kernels.decode_attention import splits_for

    assert [splits_for(1, 4, keys) for keys in (64, 1024, 2048, 4096, 8192)] == [1, 16, 16, 32, 64]
    assert splits_for(64, 4, 4096) == 1  # 256 programs fill the GPU already
    assert splits_for(8, 4, 4096) == 8


def test_paged_attention_through_the_kernels_equals_the_torch_backend() -> None:
    """`attend_projected` (kernels) against `attend` (torch) on a mixed batch and a decode one."""
    H, G, Dh, BS = 4, 2, 16, 4
    rope = Rope(RopeConfig(theta=10000.0), Dh, 512)
    for segments in ([(0, 5, 0), (1, 1, 6)], [(0, 1, 9), (1, 1, 3)]):  # (seq, tokens, first)
        tables = [[2, 5, 7], [1, 3]]
        batch = TokenBatch.build([(s, [1] * n, first) for s, n, first in segments])
        batch = batch.to(DEVICE)
        meta = PagedMetadata.build(batch, [tables[s] for s, _, _ in segments], BS, DEVICE)
        qkv = torch.randn(batch.token_ids.shape[0], (H + 2 * G) * Dh).to(DEVICE)
        results = []
        for fused in (False, True):
            k_cache = torch.randn(1, 8, BS, G, Dh, generator=torch.Generator().manual_seed(1))
            v_cache = torch.randn(1, 8, BS, G, Dh, generator=torch.Generator().manual_seed(2))
            attn = PagedAttention(k_cache.to(DEVICE), v_cache.to(DEVICE), meta)
            if fused:
                with kernels.force():
                    results.append(attn.attend_projected(0, qkv, batch.positions, None, 1e-6, rope))
            else:
                q, k, v = qkv.view(-1, H + 2 * G, Dh).split([H, G, G], dim=1)
                cos, sin = rope.cos_sin(batch.positions, torch.float32)
                results.append(attn.attend(0, apply_rope(q, cos, sin), apply_rope(k, cos, sin), v))
        torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("bias", [False, True])
def test_skinny_linear_equals_f_linear(rows: int, bias: bool) -> None:
    from afd.models.kernels.skinny_linear import SkinnyConfig, skinny_linear

    g = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(rows, 96, generator=g), torch.randn(40, 96, generator=g), torch.randn(40)
    got = skinny_linear(
        x.to(DEVICE), w.to(DEVICE), b.to(DEVICE) if bias else None, SkinnyConfig(16, 64, 4, 3)
    )
    want = torch.nn.functional.linear(x, w, b if bias else None)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("block_k", [64, 256])
def test_skinny_linear_with_fp8_weights_equals_f_linear_over_dequantized_ones(block_k) -> None:
    """K = 320: tiles within one 128-wide scale block, or across up to three (the last
    partial); N = 200: two rows of scale blocks, the last partial."""
    from afd.models.fp8 import dequantize, quantize
    from afd.models.kernels.skinny_linear import SkinnyConfig, skinny_linear

    g = torch.Generator().manual_seed(block_k)
    x, w = torch.randn(3, 320, generator=g), torch.randn(200, 320, generator=g) / 8
    q, scale = quantize(w)
    want = torch.nn.functional.linear(x, dequantize(q, scale, torch.float32))
    cfg = SkinnyConfig(32, block_k, 4, 3, split_k=2)
    got = skinny_linear(x.to(DEVICE), q.to(DEVICE), None, cfg, scale.to(DEVICE))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-4)
    parts = skinny_linear(x.to(DEVICE), q.to(DEVICE), None, cfg, scale.to(DEVICE), partials=True)
    torch.testing.assert_close(parts.sum(1).cpu(), want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="divide 128"):
        skinny_linear(x, q, None, SkinnyConfig(48, block_k), scale)


@pytest.mark.parametrize("bias", [False, True])
def test_a_skinny_linear_split_over_k_returns_partial_sums_that_add_up(bias: bool) -> None:
    from afd.models.kernels.skinny_linear import SkinnyConfig, skinny_linear

    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(2, 96, generator=g), torch.randn(40, 96, generator=g), torch.randn(40)
    args = (x.to(DEVICE), w.to(DEVICE), b.to(DEVICE) if bias else None)
    parts = skinny_linear(*args, SkinnyConfig(16, 32, 4, 3, split_k=3), partials=True)
    assert parts.shape == (2, 3, 40) and parts.dtype == torch.float32
    want = torch.nn.functional.linear(x, w, b if bias else None)
    torch.testing.assert_close(parts.sum(1).cpu(), want, rtol=1e-5, atol=1e-4)
    whole = skinny_linear(*args, SkinnyConfig(16, 32, 4, 3, split_k=3))  # no caller to add
    assert whole.shape == (2, 40)
    torch.testing.assert_close(whole.cpu(), want, rtol=1e-5, atol=1e-4)


def test_the_router_and_the_norm_add_partial_sums_first() -> None:
    from afd.models.kernels.small_ops import add_rms_norm, route_top_k

    g = torch.Generator().manual_seed(4)
    parts = torch.randn(5, 4, 12, generator=g).to(DEVICE)  # [T, S, E]
    ids, w = route_top_k(parts, 3, True, torch.float32)
    want_ids, want_w = route_top_k(parts.sum(1), 3, True)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(w, want_w, rtol=1e-5, atol=1e-6)
    h, weight = torch.randn(5, 12, generator=g).to(DEVICE), torch.rand(12).to(DEVICE)
    got = add_rms_norm(h, parts, weight, 1e-6)
    want = add_rms_norm(h, parts.sum(1), weight, 1e-6)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_linear_summands_is_one_summand_where_nothing_splits() -> None:
    from afd.models.layers import linear_summands

    x, w = torch.randn(3, 8), torch.randn(5, 8)
    with kernels.force(False):
        got = linear_summands(x, w)
    assert got.shape == (3, 1, 5)
    torch.testing.assert_close(got[:, 0], torch.nn.functional.linear(x, w))


def test_the_tuned_table_picks_the_smallest_tuned_size_at_or_above(tmp_path, monkeypatch) -> None:
    from afd.models.kernels import tuning

    table = tmp_path / "tuned.json"
    key = tuning.shape_key("linear", torch.bfloat16, "GPU X", N=8, K=4)
    tuning.save({key: {"1": {"block_n": 16}, "16": None}}, table)
    tuning.save({tuning.shape_key("moe", torch.bfloat16, "GPU X", E=2): {"8": {}}}, table)
    monkeypatch.setattr(tuning, "TABLE_FILE", table)
    tuning.load_table.cache_clear()
    try:
        assert key == "linear:N=8,K=4,dtype=bfloat16,gpu=GPU X"
        assert tuning.lookup(key, 1) == (True, {"block_n": 16})
        assert tuning.lookup(key, 2) == (True, None)  # 16 rows: cuBLAS won there
        assert tuning.lookup(key, 64) == (True, None)  # past the largest: the largest
        assert tuning.lookup(key.replace("GPU X", "GPU Y"), 1) == (False, None)
    finally:
        tuning.load_table.cache_clear()


def test_the_skinny_linear_takes_the_rows_it_won_and_leaves_cublas_the_others(
    tmp_path, monkeypatch
) -> None:
    """What the table says, row count by row count (the tuner times with PDL on, so a win
    under PDL is in the table itself)."""
    from afd.models.kernels import skinny_linear, tuning

    table = tmp_path / "tuned.json"
    key = tuning.shape_key("linear", torch.bfloat16, "cpu", N=8, K=4)
    tuning.save({key: {"1": None, "8": {"block_n": 64}, "16": None}}, table)
    monkeypatch.setattr(tuning, "TABLE_FILE", table)
    tuning.load_table.cache_clear()
    skinny_linear._tuned.cache_clear()
    try:
        cpu = torch.device("cpu")
        assert skinny_linear._tuned(1, 8, 4, torch.bfloat16, cpu) is None
        found = skinny_linear._tuned(8, 8, 4, torch.bfloat16, cpu)
        assert found == skinny_linear.SkinnyConfig(block_n=64)
        assert skinny_linear._tuned(9, 8, 4, torch.bfloat16, cpu) is None  # 16 rows: cuBLAS
    finally:
        tuning.load_table.cache_clear()
        skinny_linear._tuned.cache_clear()


@pytest.mark.parametrize("tokens,real", [(1, 1), (13, 9), (40, 40)])
def test_a_nodes_share_is_its_rows_its_slots_local_ids_and_weights(tokens, real) -> None:
    """The one-kernel dispatch of the device lane against the torch ops it replaces: expert 1
    has two holders (rows alternate between them), padding rows go to no node."""
    from afd.models.kernels.node_share import write_node_share

    g = torch.Generator().manual_seed(tokens)
    D, K, E = 600, 3, 6  # D over one 512-wide block, K not a power of two
    node_EH = torch.tensor([[0, -1], [0, 1], [1, -1], [1, -1], [0, -1], [1, -1]])
    local_EH = torch.tensor([[0, -1], [1, 0], [1, -1], [2, -1], [2, -1], [3, -1]])
    count_E = torch.tensor([1, 2, 1, 1, 1, 1])
    x = torch.randn(tokens, D, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens)])
    weights = torch.rand(tokens, K, generator=g)
    rows_T = torch.arange(tokens)
    pick = rows_T[:, None] % count_E[ids]
    for node in (0, 1):
        on = (node_EH[ids, pick] == node) & (rows_T < real)[:, None]
        want_ids = torch.where(on, local_EH[ids, pick], -1).to(torch.int16)
        want_weights = torch.where(on, weights, 0)
        out = [
            torch.full((tokens, D), 7.0, device=DEVICE),
            torch.full((tokens, K), 9, dtype=torch.int16, device=DEVICE),
            torch.full((tokens, K), 7.0, device=DEVICE),
        ]
        tables = tuple(t.to(DEVICE) for t in (node_EH, local_EH, count_E))
        real_1 = torch.tensor([real], device=DEVICE)
        args = [t.to(DEVICE) for t in (x, ids, weights)]
        write_node_share(*args, tables, real_1, node, *out)  # type: ignore[arg-type]
        assert torch.equal(out[0].cpu(), x)
        assert torch.equal(out[1].cpu(), want_ids)
        assert torch.equal(out[2].cpu(), want_weights)


def test_count_slots_counts_each_local_expert_and_the_slots_held_elsewhere() -> None:
    from afd.models.kernels.small_ops import count_slots

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(-1, 6, (37, 3), generator=g)  # -1: held by another node
    counts = torch.full((8,), 2, dtype=torch.int64)  # 7 local experts + elsewhere, not zero
    want = counts.clone()
    want.scatter_add_(
        0, torch.where(ids >= 0, ids, 7).reshape(-1), torch.ones(111, dtype=torch.int64)
    )
    got = counts.to(DEVICE)
    count_slots(ids.to(DEVICE), got)
    assert torch.equal(got.cpu(), want)


def test_fused_experts_write_into_a_given_output() -> None:
    from afd.models.kernels.fused_moe import MoEConfig, fused_experts

    g = torch.Generator().manual_seed(3)
    D, FFN, E = 32, 16, 4
    x = torch.randn(5, D, generator=g)
    gate, up = (torch.randn(E, FFN, D, generator=g) / 8 for _ in range(2))
    down = torch.randn(E, D, FFN, generator=g) / 8
    ids, weights = torch.randint(-1, E, (5, 2), generator=g), torch.rand(5, 2, generator=g)
    args = [t.to(DEVICE) for t in (x, gate, up, down, ids, weights)]
    slot = torch.full((8, D), 7.0, device=DEVICE)  # a slot wider than the rows
    config = MoEConfig(block_m=16, block_n=32, block_k=32)
    got = fused_experts(*args, config, out_TD=slot[:5])
    assert got.data_ptr() == slot.data_ptr()
    torch.testing.assert_close(slot[:5].cpu(), _loop_experts(x, gate, up, down, ids, weights))
    assert torch.equal(slot[5:].cpu(), torch.full((3, D), 7.0))
    with pytest.raises(ValueError, match="contiguous"):
        fused_experts(*args, config, out_TD=slot[:5, :16])
