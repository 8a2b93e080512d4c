"""Tunes the fused MoE kernels' tiles for one expert shape on this GPU and writes the winners
into `models/kernels/moe_configs.json` (what `fused_experts` reads), keyed by shape, dtype and
GPU name, per number of (token, slot) pairs.

    python bench/tune_moe.py --experts 128 --ffn 768 --hidden 2048 --top-k 8

Each candidate runs the whole `fused_experts` (alignment, both GEMMs, combine) on uniformly
routed random tokens; the weights rotate over several layers' worth so the L2 cache does not
hold them between calls (a decode step reads each layer's experts once). Prints a table and
the JSON. Timed as CUDA graph replays (as the served engine runs them); the floor column is the bytes of the experts the routing touches over the measured
copy bandwidth.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from collections.abc import Callable
from dataclasses import asdict
from functools import partial

import torch
from afd.models.kernels.fused_moe import CONFIG_FILE, MoEConfig, config_key, fused_experts

PAIRS = (8, 64, 256, 512, 1024, 4096)


def candidates(pairs: int) -> list[MoEConfig]:
    block_ms = (16,) if pairs <= 1024 else (16, 32, 64)
    return [
        MoEConfig(m, n, k, w, s)
        for m, n, k, w, s in itertools.product(block_ms, (32, 64, 128), (64, 128), (4, 8), (3, 4))
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


def run_config(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, cfg: MoEConfig, w: list[torch.Tensor]
) -> torch.Tensor:
    return fused_experts(x, w[0], w[1], w[2], ids, weights, cfg)


def time_us(run: Callable[[list[torch.Tensor]], object], layers: list[list[torch.Tensor]]) -> float:
    """Median µs of one call, from replays of a CUDA graph that calls it once per layer's
    weights (as a decode step does: inside a graph, no launch gaps, no L2 reuse)."""
    for weights in layers:  # compiles, and warms the allocator up outside the capture
        run(weights)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for weights in layers:
            run(weights)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(layers))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--ffn", type=int, default=768)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4, help="weight sets to rotate over")
    parser.add_argument("--pairs", type=int, nargs="*", default=list(PAIRS))
    parser.add_argument("--out", default=str(CONFIG_FILE))
    parser.add_argument("--json", default="", help="also write the measurements here")
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    E, FFN, D, K = args.experts, args.ffn, args.hidden, args.top_k
    layers = [
        [torch.randn(E, FFN, D, dtype=dtype, device=device) / 32 for _ in range(2)]
        + [torch.randn(E, D, FFN, dtype=dtype, device=device) / 32]
        for _ in range(args.layers)
    ]
    bandwidth = copy_bandwidth(device)
    name = torch.cuda.get_device_name(device)
    rows, best = [], {}
    for pairs in args.pairs:
        T = max(1, pairs // K)
        x = torch.randn(T, D, dtype=dtype, device=device)
        ids = torch.rand(T, E, device=device).argsort(-1)[:, :K]
        weights = torch.rand(T, K, device=device).to(dtype)
        touched = int(ids.unique().numel())
        floor_us = touched * 3 * FFN * D * 2 / bandwidth * 1e6
        results = []
        for cfg in candidates(pairs):
            try:
                us = time_us(partial(run_config, x, ids, weights, cfg), layers)
            except Exception as err:  # a tile that does not fit this GPU's shared memory
                print(f"pairs {pairs} {cfg}: {type(err).__name__}")
                continue
            results.append((us, cfg))
        us, cfg = min(results, key=lambda r: r[0])
        best[str(pairs)] = asdict(cfg)
        rows.append({"pairs": pairs, "tokens": T, "experts_touched": touched, "us": us,
                     "floor_us": floor_us, "config": asdict(cfg)})  # fmt: skip
    table = json.loads(CONFIG_FILE.read_text()) if CONFIG_FILE.exists() else {}
    table[config_key(E, FFN, D, dtype, name)] = best
    with open(args.out, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"| pairs | tokens | experts touched | µs | floor µs | of floor | config |  ({name})")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        c = r["config"]
        print(
            f"| {r['pairs']} | {r['tokens']} | {r['experts_touched']} | {r['us']:.1f} | "
            f"{r['floor_us']:.1f} | {r['floor_us'] / r['us']:.0%} | "
            f"m{c['block_m']} n{c['block_n']} k{c['block_k']} w{c['num_warps']} s{c['num_stages']} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": name, "copy_bytes_per_s": bandwidth, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
