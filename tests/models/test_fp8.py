"""Block-scaled fp8: quantize/dequantize, reading an FP8 checkpoint (written here, as Qwen3-FP8
and DeepSeek-V3 ship theirs: float8_e4m3fn weights beside `weight_scale_inv` blocks), and
engines quantized at load against the reference on the same quantized weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from afd.attention_nodes.node import AttentionNode, AttentionNodeSettings
from afd.models import fp8, kernels
from afd.models.checkpoint import Checkpoint, CheckpointError
from afd.models.config import load_config
from afd.models.messages import NewRequest
from afd.models.reference import ReferenceEngine
from afd.models.sampling import SamplingParams
from afd.models.weights import tensor_specs
from safetensors.torch import load_file, save_file


@pytest.mark.parametrize("shape", [(256, 384), (200, 70), (3, 130, 260)])
def test_quantize_then_dequantize_is_within_e4m3_precision(shape: tuple[int, ...]) -> None:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05
    w[..., 0, 0] = 3.0  # one block with a large value: its own scale, the others unaffected
    q, scale = fp8.quantize(w)
    assert q.dtype == fp8.FP8 and q.shape == w.shape
    assert scale.shape == fp8.scale_shape(tuple(w.shape))
    back = fp8.dequantize(q, scale, torch.float32)
    per_element = scale.repeat_interleave(128, -2).repeat_interleave(128, -1)[
        ..., : w.shape[-2], : w.shape[-1]
    ]
    # 3 mantissa bits: relative error at most 2^-4; below the normal range, a 2^-9 step
    bound = torch.maximum(w.abs() * 2**-4, per_element * 2**-9)
    assert ((back - w).abs() <= bound).all()
    assert scale[..., 0, 0].max() == pytest.approx(3.0 / 448)  # the block holding 3.0


@pytest.mark.parametrize("rows", [0, 1, 5])
def test_rows_for_fp8_dispatch_round_trip_within_e4m3_precision(rows: int) -> None:
    """Activations quantized per row and group of 128 features (the exchange's fp8 dispatch):
    a large value costs only its own group precision; a zero row stays zero."""
    x = torch.randn(rows, 300, generator=torch.Generator().manual_seed(1))
    if rows:
        x[0, 5] = 40.0
        x[-1] = 0.0 if rows > 1 else x[-1]
    q, scale = fp8.quantize_rows(x)
    assert q.dtype == fp8.FP8 and q.shape == x.shape and scale.shape == (rows, 3)
    back = fp8.dequantize_rows(q, scale, torch.float32)
    per_element = scale.repeat_interleave(128, -1)[:, :300]
    bound = torch.maximum(x.abs() * 2**-4, per_element * 2**-9)
    assert ((back - x).abs() <= bound).all()
    if rows > 1:
        assert scale[0, 0] == pytest.approx(40.0 / 448) and scale[0, 1] < 5.0 / 448
        assert (back[-1] == 0).all()


def test_packed_rows_are_the_quantized_rows_and_their_scales_in_one_tensor() -> None:
    x = torch.randn(3, 300, generator=torch.Generator().manual_seed(2))
    packed = fp8.pack_rows(x)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 300 + 4 * 3)
    q, scale = fp8.unpack_rows(packed, 300)
    want_q, want_scale = fp8.quantize_rows(x)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(scale, want_scale)
    with pytest.raises(ValueError, match=r"uint8 \[n, 312\]"):
        fp8.unpack_rows(packed[:, :-1], 300)


def test_a_row_holding_inf_or_nan_still_gets_finite_positive_scales() -> None:
    """The frame stays valid for the expert node's checks; the bad numbers travel on."""
    x = torch.ones(2, 256)
    x[0, 3], x[1, 200] = float("inf"), float("nan")
    q, scale = fp8.quantize_rows(x)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert scale[0, 1] == pytest.approx(1 / 448)  # the other group of the row: its own scale


def test_scales_of_the_wrong_shape_are_named() -> None:
    q, scale = fp8.quantize(torch.randn(256, 256))
    with pytest.raises(ValueError, match=r"fp8 scales of shape \[2, 1\] do not fit"):
        fp8.dequantize(q, scale[:, :1], torch.float32)


FP8_BLOCK = 32  # several blocks per tiny matrix


def _to_fp8_checkpoint(src: Path, dst: Path) -> dict[str, torch.Tensor]:
    """A copy of the tiny model with its attention projections and experts in fp8 (what HF
    FP8 checkpoints quantize); returns the dequantized weights the copy stands for."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    out, meant = {}, {}
    for name, w in tensors.items():
        if name.endswith(("_proj.weight", ".w1.weight", ".w2.weight", ".w3.weight")):
            q, scale = fp8.quantize(w, FP8_BLOCK)
            out[name], out[f"{name}_scale_inv"] = q, scale
            meant[name] = fp8.dequantize(q, scale, torch.float32, FP8_BLOCK)
        else:
            out[name] = meant[name] = w
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
    }
    (dst / "config.json").write_text(json.dumps(config))
    return meant


def test_an_fp8_checkpoint_reads_as_its_dequantized_weights(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    for arch in ("qwen3_moe", "mixtral"):
        meant = _to_fp8_checkpoint(tiny_models[arch], tmp_path / arch)
        config = load_config(tmp_path / arch)
        checkpoint = Checkpoint(tmp_path / arch)
        checkpoint.check_names(config)  # the scale tensors are expected, not strangers
        got = checkpoint.load(tensor_specs(config), torch.float32)
        assert got.keys() == {n for n in meant if not n.endswith("_scale_inv")}
        for name, tensor in got.items():
            assert torch.equal(tensor, meant[name]), name


def test_an_fp8_checkpoint_generates_what_its_dequantized_weights_do(
    tiny_model: Path, tmp_path: Path
) -> None:
    meant = _to_fp8_checkpoint(tiny_model, tmp_path / "fp8")
    plain = tmp_path / "dequantized"
    shutil.copytree(tiny_model, plain)
    save_file(meant, str(plain / "model.safetensors"), metadata={"format": "pt"})
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    want = ReferenceEngine(plain).generate([5, 6, 7], params)
    got = ReferenceEngine(tmp_path / "fp8").generate([5, 6, 7], params)
    assert got.token_ids == want.token_ids and got.logprobs == want.logprobs


def test_an_fp8_tensor_without_scales_is_named(tiny_model: Path, tmp_path: Path) -> None:
    _to_fp8_checkpoint(tiny_model, tmp_path / "m")
    tensors = load_file(str(tmp_path / "m" / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    del tensors[f"{name}_scale_inv"]
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    config = load_config(tmp_path / "m")
    with pytest.raises(CheckpointError, match=f"fp8 tensor '{name}' has no '{name}_scale_inv'"):
        Checkpoint(tmp_path / "m").load(tensor_specs(config, layers=[0]), torch.float32)


@pytest.mark.parametrize("use_kernels", [False, True])
def test_a_node_quantized_at_load_gives_the_quantized_reference_tokens(
    tiny_model: Path, use_kernels: bool
) -> None:
    """`quantization: fp8` on a colocated node, through the torch math (CPU) and through the
    kernels (Triton's interpreter on CPU; compiled, with graphs, on a GPU host), against the
    CPU reference engine quantized the same way."""
    if use_kernels and not kernels.HAVE_TRITON:
        pytest.skip("Triton is not installed")
    reference = ReferenceEngine(tiny_model, quantization="fp8")
    unquantized = ReferenceEngine(tiny_model)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    prompts = [reference.tokenizer.encode(p) for p in ("Hello, world!", "one two three")]
    device = "cuda" if use_kernels and torch.cuda.is_available() else "cpu"
    settings = AttentionNodeSettings(0, str(tiny_model), quantization="fp8", device=device)
    with kernels.force(use_kernels):
        node = AttentionNode(settings, None)
        try:
            got: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
            new = [NewRequest(f"r{i}", p, params) for i, p in enumerate(prompts)]
            for step in range(12):
                for token in node.step(step, new, []).outputs:
                    got[token.request_id].append(token.token_id)
                new = []
        finally:
            node.shutdown()
    for i, p in enumerate(prompts):
        want = reference.generate(p, params)
        assert got[f"r{i}"] == want.token_ids
        assert want.logprobs != unquantized.generate(p, params).logprobs  # it did quantize
