"""Disaggregated against colocated MoE decode on the GPUs of one host, with afd plan's prediction.

    python bench/multigpu.py                         # every GPU of this host, both model shapes
    python bench/multigpu.py --gpus 1 --layers 4 --batches 8 --shapes 30b   # a one-GPU dry run

Configurations (G GPUs): disaggregated A attention GPUs + E expert GPUs (every split A+E = G;
with G = 1 both share the GPU) for m in --micro-batches, and colocated: every GPU hosts one
attention process and one expert process, the usual data-parallel attention with expert
parallelism. Each attention process decodes `batch` sequences (its share of the global batch)
and sends every MoE layer's micro-batch to every expert process holding one of its tokens'
experts (M2N); each expert process waits for all attention processes (N2M), runs its experts
and answers. Weights are random (never zeros), per (layer, expert) seeded as in
bench/decode.py. Reported per configuration and global batch: ms per step (TPOT), decode tokens
per second per GPU, the share of the attention side's step spent waiting for experts, and the
TPOT `afd plan`'s model predicts for the same configuration (catalog entry --gpu-type).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from afd.models.config import load_config
from afd.models.static_decode import StaticDecoder
from decode import QWEN3_30B_A3B, TINY, build_attention, build_experts

QWEN3_235B_A22B = {
    **QWEN3_30B_A3B,
    "hidden_size": 4096,
    "moe_intermediate_size": 1536,
    "num_hidden_layers": 94,
    "num_attention_heads": 64,
    "num_key_value_heads": 4,
    "head_dim": 128,
}
SHAPES = {"30b": QWEN3_30B_A3B, "235b": QWEN3_235B_A22B, "tiny": TINY}
EXPERT_BASE = 1000


def _config(raw: dict):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(raw))
        return load_config(d)


def _experts_of(j: int, n_experts: int, n_nodes: int) -> list[int]:
    per = -(-n_experts // n_nodes)
    return list(range(j * per, min(n_experts, (j + 1) * per)))


def _pin(gpu: int, device: str) -> torch.dtype:
    if device == "cuda":
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
        return torch.bfloat16
    return torch.float32  # the CPU smoke run


def expert_worker(
    j: int, gpu: int, raw: dict, n_attention: int, n_expert: int, queue, device: str
) -> None:
    dtype = _pin(gpu, device)
    from afd.transport.endpoint import Transport
    from afd.transport.wire import RoundKey

    config = _config(raw)
    shard = build_experts(config, dtype, device, 1, _experts_of(j, config.num_experts, n_expert))
    t = Transport(EXPERT_BASE + j, device=device)
    queue.put(("expert", j, t.address))
    peers = list(range(n_attention))
    t.wait_for_peers(peers, 600)
    step = 0
    with torch.inference_mode():
        while m := max(int(t.recv(p, RoundKey.control(step), 1800)[0].item()) for p in peers):
            for layer in config.moe_layers:
                for mb in range(m):
                    key = RoundKey.exchange(step, layer, mb)
                    frames = [t.recv(p, key, 300) for p in peers]
                    x = torch.cat([f[0] for f in frames])
                    ids = torch.cat([f[1] for f in frames]).long()
                    w = torch.cat([f[2] for f in frames])
                    y = shard.forward(layer, x, ids, w)
                    for p, part in zip(
                        peers, y.split([f[0].shape[0] for f in frames]), strict=True
                    ):
                        t.send(p, key, [part])
            t.flush(300)
            step += 1
    t.close()


def attention_worker(
    i: int,
    gpu: int,
    raw: dict,
    experts: list,
    batch: int,
    plan: list[tuple[int, int]],
    prompt: int,
    queue,
    device: str,
) -> None:
    """Runs each (m, steps) of `plan` in turn and reports (ms per step, wait share) for each."""
    dtype = _pin(gpu, device)
    from afd.transport.endpoint import Transport
    from afd.transport.wire import RoundKey

    config = _config(raw)
    model = build_attention(config, dtype, device, 0)
    t = Transport(i, device=device)
    for j, address in enumerate(experts):
        t.connect(EXPERT_BASE + j, address)
    owner = torch.empty(config.num_experts, dtype=torch.int64, device=device)
    local = torch.empty(config.num_experts, dtype=torch.int64, device=device)
    for j in range(len(experts)):
        ids = _experts_of(j, config.num_experts, len(experts))
        owner[ids] = j
        local[ids] = torch.arange(len(ids), device=device)
    step = 0
    with torch.inference_mode():
        for m, steps in plan:
            decoder = StaticDecoder(model, None, batch, prompt + steps + 8)
            tokens = torch.randint(0, config.vocab_size, (batch,), device=device)
            waited = 0.0
            start = 0.0
            for s in range(prompt + steps):
                if s == prompt:
                    _sync(device)
                    start, waited = time.perf_counter(), 0.0
                for j in range(len(experts)):
                    t.send(
                        EXPERT_BASE + j,
                        RoundKey.control(step),
                        [torch.full((1,), m, dtype=torch.uint8)],
                    )
                positions = torch.full((batch,), min(s, prompt + steps), device=device)
                groups = torch.arange(batch).chunk(m)
                mbs = [decoder.micro_batch(int(g[0]), tokens[g], positions[g]) for g in groups]
                for layer in range(config.num_layers):
                    moe = config.is_moe_layer(layer)
                    plans = []
                    for k, mb in enumerate(mbs):
                        r = decoder.pre_experts(layer, mb)
                        rows_per = []
                        if moe:
                            node = owner[r.ids_TK]
                            for j in range(len(experts)):
                                on_j = node == j
                                rows = torch.nonzero(on_j.any(dim=1)).flatten()
                                lid = torch.where(on_j[rows], local[r.ids_TK[rows]], -1).to(
                                    torch.int16
                                )
                                wts = torch.where(on_j[rows], r.weights_TK[rows], 0)
                                t.send(
                                    EXPERT_BASE + j,
                                    RoundKey.exchange(step, layer, k),
                                    [r.x_TD[rows], lid, wts],
                                )
                                rows_per.append(rows)
                        plans.append((r, rows_per))
                    for k, (mb, (r, rows_per)) in enumerate(zip(mbs, plans, strict=True)):
                        out = None
                        if moe:
                            t0 = time.perf_counter()
                            out = torch.zeros_like(r.x_TD)
                            for j, rows in enumerate(rows_per):
                                (y,) = t.recv(
                                    EXPERT_BASE + j, RoundKey.exchange(step, layer, k), 300
                                )
                                out.index_add_(0, rows, y)
                            waited += time.perf_counter() - t0
                        decoder.post_experts(layer, mb, r, out)
                tokens = torch.argmax(torch.cat([decoder.logits(mb) for mb in mbs]), -1)
                t.flush(300)
                step += 1
            _sync(device)
            wall = time.perf_counter() - start
            queue.put(("result", i, m, wall / steps * 1e3, waited / wall))
    for j in range(len(experts)):  # every expert process reads every attention node's control
        t.send(EXPERT_BASE + j, RoundKey.control(step), [torch.zeros(1, dtype=torch.uint8)])
    t.flush(60)
    t.close()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_config(
    raw: dict,
    attention_gpus: list[int],
    expert_gpus: list[int],
    global_batch: int,
    micro_batches: list[int],
    steps: int,
    prompt: int,
    device: str,
) -> list[dict]:
    """One placement, every m in turn on the same processes; rows of ms/step per m."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    A, E = len(attention_gpus), len(expert_gpus)
    procs = [
        ctx.Process(target=expert_worker, args=(j, g, raw, A, E, queue, device))
        for j, g in enumerate(expert_gpus)
    ]
    for p in procs:
        p.start()
    addresses = {}
    while len(addresses) < E:
        kind, j, address = queue.get(timeout=1800)
        addresses[j] = address
    experts = [addresses[j] for j in range(E)]
    batch = global_batch // A
    plan = [(m, steps) for m in micro_batches if batch >= m]
    attention = [
        ctx.Process(
            target=attention_worker, args=(i, g, raw, experts, batch, plan, prompt, queue, device)
        )
        for i, g in enumerate(attention_gpus)
    ]
    for p in attention:
        p.start()
    results: dict[int, list] = {}
    for _ in range(A * len(plan)):
        _, i, m, ms, wait = queue.get(timeout=3600)
        results.setdefault(m, []).append((ms, wait))
    for p in attention + procs:
        p.join(600)
    rows = []
    for m, per_node in sorted(results.items()):
        ms = max(r[0] for r in per_node)  # the step is as slow as the slowest attention node
        wait = sum(r[1] for r in per_node) / len(per_node)
        rows.append(
            {
                "attention_gpus": A,
                "expert_gpus": E,
                "m": m,
                "batch": batch * A,
                "ms_per_step": ms,
                "wait_share": wait,
            }
        )
    return rows


def predicted_ms(
    raw: dict, gpu_type: str, n_att: int, n_exp: int, m: int, batch: int, context: int
) -> float:
    from afd.orchestrator.planner import Shape, load_catalog, model_step

    catalog = load_catalog(Path(__file__).resolve().parents[1] / "configs" / "gpu-catalog.yaml")
    config = _config(raw)
    g = catalog.gpus[gpu_type]
    *_, t_layer = model_step(
        Shape.of(config, 2), catalog, g, 1, n_att, g, n_exp, m, batch, 2, context
    )
    return config.num_layers * t_layer * 1e3


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run")
    p.add_argument("--shapes", default="30b,235b")
    p.add_argument("--layers", type=int, help="fewer layers (the 235B shape needs it on few GPUs)")
    p.add_argument("--batches", default="64,256", help="global batch sizes")
    p.add_argument("--micro-batches", default="1,2,3")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--prompt", type=int, default=8)
    p.add_argument("--gpu-type", default="H200", help="catalog entry for afd plan's prediction")
    p.add_argument("--json-out")
    args = p.parse_args()
    G = args.gpus if args.device == "cuda" else max(args.gpus, 1)
    if G < 1:
        print("no GPU here", file=sys.stderr)
        return 2
    ms_list = [int(m) for m in args.micro_batches.split(",")]
    rows = []
    for shape in args.shapes.split(","):
        raw = dict(SHAPES[shape])
        if args.layers:
            raw["num_hidden_layers"] = args.layers
        splits = (
            [(list(range(a)), list(range(a, G))) for a in range(1, G)] if G > 1 else [([0], [0])]
        )
        configs = [("disaggregated", att, exp) for att, exp in splits]
        configs.append(("colocated", list(range(G)), list(range(G))))
        for batch in (int(b) for b in args.batches.split(",")):
            for kind, att, exp in configs:
                if (
                    kind == "colocated"
                    and G == 1
                    and configs[0][1:] == (att, exp)
                    and len(configs) > 1
                ):
                    continue
                for r in run_config(
                    raw, att, exp, batch, ms_list, args.steps, args.prompt, args.device
                ):
                    r.update(shape=shape, kind=kind, gpus=G)
                    r["tokens_per_s_per_gpu"] = r["batch"] / (r["ms_per_step"] / 1e3) / G
                    r["predicted_ms"] = predicted_ms(
                        raw,
                        args.gpu_type,
                        r["attention_gpus"],
                        r["expert_gpus"],
                        r["m"],
                        r["batch"],
                        args.prompt + args.steps,
                    )
                    r["prediction_error"] = r["predicted_ms"] / r["ms_per_step"] - 1
                    rows.append(r)
                    print(json.dumps(r), flush=True)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    meta = {"device": name, "gpus": G, "layers": args.layers, "steps": args.steps}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({**meta, "rows": rows}, indent=1))
    print(meta)
    print(
        f"{'shape':<6}{'kind':<15}{'A+E':>6}{'m':>3}{'batch':>7}{'ms/step':>10}{'tok/s/GPU':>11}{'wait':>7}{'plan ms':>9}{'err':>7}"
    )
    for r in rows:
        print(
            f"{r['shape']:<6}{r['kind']:<15}{str(r['attention_gpus']) + '+' + str(r['expert_gpus']):>6}{r['m']:>3}"
            f"{r['batch']:>7}{r['ms_per_step']:>10.2f}{r['tokens_per_s_per_gpu']:>11.1f}{r['wait_share']:>7.0%}"
            f"{r['predicted_ms']:>9.2f}{r['prediction_error']:>7.0%}"
        )
    for shape in {r["shape"] for r in rows}:
        best = {
            k: max(
                (r for r in rows if r["shape"] == shape and r["kind"] == k),
                key=lambda r: r["tokens_per_s_per_gpu"],
                default=None,
            )
            for k in ("disaggregated", "colocated")
        }
        if all(best.values()):
            ratio = (
                best["disaggregated"]["tokens_per_s_per_gpu"]
                / best["colocated"]["tokens_per_s_per_gpu"]
            )
            d = best["disaggregated"]
            print(
                f"{shape}: best disaggregated {d['attention_gpus']}+{d['expert_gpus']} m={d['m']} is {ratio:.2f}x colocated per GPU (target 1.5x at the same TPOT)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
