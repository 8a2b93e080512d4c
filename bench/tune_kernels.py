"""Tunes the kernels' tiles for one model shape on this GPU and writes the winners into
`models/kernels/tuned.json` (what the kernels read), keyed by shape, dtype and GPU name.

    python bench/tune_kernels.py                     # the Qwen3-30B-A3B shape
    python bench/tune_kernels.py --preset qwen3-235b-a22b --out /tmp/tuned.json

Two families:
- the fused MoE (alignment, both GEMMs, combine: the whole `fused_experts`) per number of
  (token, slot) pairs, on uniformly routed random tokens;
  (`--fp8`: the same with the experts in block-scaled fp8, and nothing else);
- the skinny linear for the attention side's projections (fused QKV, output, router) at 1, 8
  and 16 rows, against cuBLAS (`F.linear`) in the same run: where cuBLAS wins, the table says
  so and the engine keeps it.

Every candidate is timed as CUDA graph replays (as the served engine runs it), the graph
calling it once for each of several layers' weights so that the L2 cache does not hold them
between calls (a decode step reads each layer's weights once). The floor column: the bytes
the call must read over the copy bandwidth measured in the same run. Prints tables; `--json`
writes the measurements.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from afd.models import fp8
from afd.models.kernels.fused_moe import MoEConfig, fused_experts
from afd.models.kernels.skinny_linear import SkinnyConfig, skinny_linear
from afd.models.kernels.tuning import TABLE_FILE, save, shape_key
from afd.models.presets import PRESETS

PAIRS = (8, 64, 256, 512, 1024, 4096)
ROWS = (1, 8, 16)


def moe_candidates(pairs: int, quantized: bool) -> list[MoEConfig]:
    """fp8 tiles read half the bytes of bf16 ones, so their K tiles go one size wider."""
    block_ms = (16,) if pairs <= 1024 else (16, 32, 64)
    block_ks = (128, 256) if quantized else (64, 128)
    return [
        MoEConfig(m, n, k, w, s)
        for m, n, k, w, s in itertools.product(block_ms, (32, 64, 128), block_ks, (4, 8), (3, 4))
    ]


def skinny_candidates(split: bool = False, K: int = 0) -> list[SkinnyConfig]:
    """`split`: the projection's caller adds partial sums, so splits over K are candidates
    too (timed without that add, which rides in a kernel the step runs anyway)."""
    whole = [
        SkinnyConfig(n, k, w, s)
        for n, k, w, s in itertools.product((16, 32, 64), (128, 256, 512), (4,), (3, 4, 5))
    ]
    if not split:
        return whole
    return whole + [  # only splits that K leaves each at least one tile
        SkinnyConfig(n, k, 4, s, splits)
        for n, k, s, splits in itertools.product((16, 32), (128, 256), (3, 4), (2, 4, 8, 16))
        if splits <= K // k
    ]


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read plus written per second by a 1 GiB device-to-device copy."""
    a = torch.empty(1 << 29, dtype=torch.bfloat16, device=device).normal_()
    b = torch.empty_like(a)
    b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    end.synchronize()
    return 10 * 2 * a.numel() * a.element_size() / (start.elapsed_time(end) / 1e3)


def time_us(run: Callable[[Any], object], weight_sets: list[Any]) -> float:
    """Median µs of one call, from replays of a CUDA graph that calls `run` once per weight
    set. Raises what the first (compiling) call raises, e.g. a tile too big for the GPU."""
    for weights in weight_sets:  # compiles, and warms the allocator up outside the capture
        run(weights)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for weights in weight_sets:
            run(weights)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(weight_sets))
    return statistics.median(times)


def best_of(
    candidates: list[Any], run: Callable[[Any, Any], object], sets: list[Any]
) -> tuple[float, Any]:
    results = []
    for cfg in candidates:
        try:
            results.append((time_us(lambda w, cfg=cfg: run(cfg, w), sets), cfg))
        except Exception as err:  # a tile that does not fit this GPU's shared memory
            print(f"  {cfg}: {type(err).__name__}")
    return min(results, key=lambda r: r[0])


def tune_moe(
    cfg: dict[str, Any],
    layers: int,
    bandwidth: float,
    name: str,
    quantized: bool,
    pair_counts: tuple[int, ...] = PAIRS,
) -> tuple[dict, list]:
    """`quantized`: the experts in fp8 with block scales (the table's fp8 entries)."""
    device, dtype = torch.device("cuda"), torch.bfloat16
    E, FFN, D = cfg["num_experts"], cfg["moe_intermediate_size"], cfg["hidden_size"]
    K = cfg["num_experts_per_tok"]
    shapes = [(E, FFN, D), (E, FFN, D), (E, D, FFN)]
    sets = []
    for _ in range(layers):
        ws = [torch.randn(shape, dtype=dtype, device=device) / 32 for shape in shapes]
        sets.append([fp8.quantize(w) for w in ws] if quantized else [(w, None) for w in ws])
    weight_bytes = 1 if quantized else 2
    best, rows = {}, []
    for pairs in pair_counts:
        T = max(1, pairs // K)
        x = torch.randn(T, D, dtype=dtype, device=device)
        ids = torch.rand(T, E, device=device).argsort(-1)[:, :K]
        weights = torch.rand(T, K, device=device).to(dtype)
        touched = int(ids.unique().numel())
        floor_us = touched * 3 * FFN * D * weight_bytes / bandwidth * 1e6

        def run(
            c: MoEConfig, w: list, x=x, ids=ids, weights=weights, quantized=quantized
        ) -> object:
            scales = (w[0][1], w[1][1], w[2][1]) if quantized else None
            return fused_experts(x, w[0][0], w[1][0], w[2][0], ids, weights, c, scales)

        us, won = best_of(moe_candidates(pairs, quantized), run, sets)
        best[str(pairs)] = asdict(won)
        rows.append({"pairs": pairs, "experts_touched": touched, "us": us, "floor_us": floor_us,
                     "config": asdict(won)})  # fmt: skip
    del sets
    key_dtype = fp8.FP8 if quantized else dtype
    return {shape_key("moe", key_dtype, name, E=E, I=FFN, D=D): best}, rows


def tune_linear(
    cfg: dict[str, Any],
    layers: int,
    bandwidth: float,
    name: str,
    quantized: bool,
    row_counts: tuple[int, ...] = ROWS,
) -> tuple[dict, list]:
    """`quantized`: the fused QKV and output projections in fp8 with block scales, which always
    take the skinny kernel (no cuBLAS to compare); the router stays bf16. The output projection
    (bf16 or fp8) and the router may split over K: their callers add partial sums."""
    device, dtype = torch.device("cuda"), torch.bfloat16
    D, H, G = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    Dh = cfg.get("head_dim") or D // H
    shapes = {
        "qkv": ((H + 2 * G) * Dh, D),
        "o_proj": (D, H * Dh),
        "router": (cfg["num_experts"], D),
    }
    if quantized:
        del shapes["router"]
    updates, rows = {}, []
    for proj, (N, K) in shapes.items():
        raw = [torch.randn(N, K, dtype=dtype, device=device) / 32 for _ in range(layers)]
        sets = [fp8.quantize(w) for w in raw] if quantized else [(w, None) for w in raw]
        entry: dict[str, Any] = {}
        for M in row_counts:
            x = torch.randn(M, K, dtype=dtype, device=device)
            cublas = float("inf") if quantized else time_us(lambda w, x=x: F.linear(x, w[0]), sets)
            split = proj in ("o_proj", "router")

            def run(c: SkinnyConfig, w: Any, x: torch.Tensor = x, split: bool = split) -> object:
                return skinny_linear(x, w[0], None, c, w[1], partials=split)

            us, won = best_of(skinny_candidates(split, K), run, sets)
            entry[str(M)] = asdict(won) if us < cublas else None
            rows.append({"proj": proj, "N": N, "K": K, "rows": M, "cublas_us": cublas, "us": us,
                         "floor_us": N * K * (1 if quantized else 2) / bandwidth * 1e6,
                         "config": asdict(won)})  # fmt: skip
        updates[shape_key("linear", fp8.FP8 if quantized else dtype, name, N=N, K=K)] = entry
        del sets
    return updates, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="qwen3-30b-a3b")
    parser.add_argument("--layers", type=int, default=8, help="weight sets to rotate over")
    parser.add_argument("--out", default=str(TABLE_FILE))
    parser.add_argument("--json", default="", help="also write the measurements here")
    parser.add_argument(
        "--fp8",
        action="store_true",
        help="tune for fp8 weights: the fused MoE and the attention projections",
    )
    parser.add_argument(
        "--pairs", type=lambda s: tuple(int(n) for n in s.split(",")), default=PAIRS,
        help="the fused MoE's (token, slot) pair counts to tune; the table keeps the others",
    )  # fmt: skip
    parser.add_argument(
        "--rows", type=lambda s: tuple(int(n) for n in s.split(",")), default=ROWS,
        help="the projections' row counts to tune; the table keeps the others",
    )  # fmt: skip
    args = parser.parse_args()
    cfg = PRESETS[args.preset]
    name = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth(torch.device("cuda"))
    linear_updates, linear_rows = tune_linear(
        cfg, args.layers, bandwidth, name, args.fp8, args.rows
    )
    moe_updates, moe_rows = tune_moe(
        cfg, max(2, args.layers // 2), bandwidth, name, args.fp8, args.pairs
    )
    save({**moe_updates, **linear_updates}, Path(args.out))
    print(f"{name}, copy {bandwidth / 1e9:.0f} GB/s")
    print("| pairs | experts touched | µs | floor µs | of floor | tiles |")
    print("|---|---|---|---|---|---|")
    for r in moe_rows:
        c = r["config"]
        print(f"| {r['pairs']} | {r['experts_touched']} | {r['us']:.1f} | {r['floor_us']:.1f} | "
              f"{r['floor_us'] / r['us']:.0%} | m{c['block_m']} n{c['block_n']} k{c['block_k']} "
              f"w{c['num_warps']} s{c['num_stages']} |")  # fmt: skip
    print("| projection | N×K | rows | cuBLAS µs | skinny µs | floor µs | used |")
    print("|---|---|---|---|---|---|---|")
    for r in linear_rows:
        used = "skinny" if r["us"] < r["cublas_us"] else "cuBLAS"
        print(f"| {r['proj']} | {r['N']}×{r['K']} | {r['rows']} | {r['cublas_us']:.1f} | "
              f"{r['us']:.1f} | {r['floor_us']:.1f} | {used} |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": name, "copy_bytes_per_s": bandwidth, "moe": moe_rows,
                       "linear": linear_rows}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
