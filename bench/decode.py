"""Decode throughput of the engine `afd serve` runs, on one device, beside HF transformers.

    python bench/decode.py                           # Qwen3-30B-A3B shape, 48 layers, bf16
    python bench/decode.py --layers 4 --batches 1,8 --skip-hf --json
    python bench/decode.py --preset tiny --device cpu --batches 1,4 --steps 4   # a smoke run
    python bench/decode.py --skip-hf --skip-eager --disaggregated 1,2   # + 1 attn + 1 expert
    python bench/decode.py --skip-hf --skip-eager --disaggregated 1,2 --lanes host,device

afd rows drive a colocated `AttentionNode` in-process (`experts.nodes: 0`, what a one-GPU
`afd serve` runs on each node, without Ray and the front ends): dummy weights from the preset's
config.json, paged KV, continuous batching, CUDA graphs for decode steps (`afd-graph`) or not
(`afd-eager`), sampling on the device, detokenization on the host. `afd-disagg-m<m>` rows: the
same attention node with its experts in an `ExpertNode` in a second process (the real nodes,
m micro-batches), over the host lane (frames through the transport), the device lane (slots
in GPU memory shared by CUDA IPC; one GPU needs CUDA MPS) or the proxy lane (the same slots,
moved between the nodes' proxy threads over UCX, as across hosts); on the slot lanes decode
steps replay graphs that hold the exchange. What a disaggregated deployment runs on each node. Each row admits B requests of a
`--prompt`-token random prompt, runs their prefill and `--warmup` decode steps, then times
`--steps` decode steps by the host clock around `AttentionNode.step` (which returns once a
step's tokens reached the host; colocated, it has launched the next step first: decode-ahead,
off in the `-sync` rows of `--sync-rows`). `hf` = transformers `generate` (greedy) on the same shape. The floor:
bytes a step must read (attention-side weights, the LM head, the experts the batch is expected
to touch, the KV cache) over the device-to-device copy rate measured in the same run;
MBU = floor time / measured time.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

import torch
from afd.attention_nodes.decode_graphs import batch_bucket, block_bucket
from afd.attention_nodes.node import AttentionNode, AttentionNodeSettings
from afd.expert_nodes import process as expert_process
from afd.expert_nodes.node import ExpertNodeSettings
from afd.models.attention import ContiguousAttention, ContiguousKVCache
from afd.models.batch import TokenBatch
from afd.models.config import ModelConfig, load_config
from afd.models.expert_placement import ExpertPlacement
from afd.models.messages import NewRequest
from afd.models.presets import PRESETS, write_preset
from afd.models.sampling import SamplingParams
from afd.models.step_trace import chrome_trace

TINY = {
    **PRESETS["qwen3-30b-a3b"],
    "hidden_size": 64,
    "moe_intermediate_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 512,
}
BLOCK = 16
SAMPLED = {"temperature": 0.8, "top_k": 50, "top_p": 0.95}


def copy_bandwidth(device: str) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    n = (1 << 30) if device == "cuda" else (1 << 26)
    a = torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    _sync(device)
    start = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    _sync(device)
    return 2 * n * 10 / (time.perf_counter() - start)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def floor_bytes(
    c: ModelConfig, batch: int, context: int, dtype_bytes: int, fp8_weights: bool = False
) -> float:
    """What one decode step must read at least: every attention-side weight but the embedding
    table (one row per token), the experts the batch is expected to touch, and the KV cache;
    `fp8_weights`: the attention projections and the experts at one byte a weight."""
    attn = (
        c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        + c.num_heads * c.head_dim * c.hidden_size
    )
    router = c.num_experts * c.hidden_size
    expert = 3 * c.hidden_size * c.moe_intermediate_size
    touched = c.num_experts * (1 - (1 - c.top_k / c.num_experts) ** batch)
    kv = 2 * batch * context * c.num_kv_heads * c.head_dim
    weight_bytes = 1 if fp8_weights else dtype_bytes
    per_layer = (attn + touched * expert) * weight_bytes + (router + kv) * dtype_bytes
    return c.num_layers * per_layer + c.vocab_size * c.hidden_size * dtype_bytes


EXPERT_NODE_ID = 1000


def _start_disaggregated(
    settings: AttentionNodeSettings, micro_batches: int, lane: str
) -> tuple[AttentionNode, BaseProcess, Connection]:
    """1 attention node here + 1 expert process holding every expert, wired over the
    transport: rows and sums through a slot lane's slots, or the host lane's frames."""
    config = load_config(settings.model_dir)
    placement = ExpertPlacement.even(config.num_experts, 1)
    settings = replace(settings, micro_batches=micro_batches, lane=lane)
    expert_settings = ExpertNodeSettings(
        EXPERT_NODE_ID,
        settings.model_dir,
        placement.assignment[0],
        dtype=settings.dtype,
        load_format=settings.load_format,
        quantization=settings.quantization,
        micro_batches=micro_batches,
        device=settings.device,
        lane=lane,
        dispatch_fp8=settings.dispatch_fp8,
    )
    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    process = ctx.Process(
        target=expert_process.serve,
        args=(expert_settings, settings.max_batch_tokens, 1, there),
        daemon=True,
    )
    process.start()
    node = AttentionNode(settings, placement)
    address, slots = here.recv()
    here.send([settings.node_id])
    own = node.connect([(EXPERT_NODE_ID, address)], None if slots is None else [slots])
    if own is not None:
        here.send([own])
    here.send(0)  # the step it starts at
    return node, process, here


def _trace(node: AttentionNode, conn: Connection, step: int, out: Path) -> int:
    """Traces three decode steps on both nodes (from step + 2: the expert process takes the
    request between two steps) and writes the timeline of the last two to `out` (the first
    one captures the graphs of traced steps on both nodes, and waits on the other's capture);
    the next step to run."""
    first, count = step + 2, 3
    node.trace_steps(count, first)
    conn.send(("trace", count, first))
    spans = []
    for s in range(step, first + count):
        result = node.step(s, [], [])
        if result.trace and s > first:
            spans.append((s, list(result.trace)))
    expert = []
    for _ in range(count):
        _, s, got = conn.recv()
        if s > first:
            expert.append((s, list(got)))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(chrome_trace({"attention-0": spans, "expert-0": expert})))
    return first + count


def bench_afd(
    model_dir: Path,
    args: argparse.Namespace,
    dtype: str,
    graphs: bool,
    sampling: dict[str, float] | None = None,
    micro_batches: int = 0,
    quantization: str = "none",
    lane: str = "host",
    ahead: bool = True,
    fp8_rows: bool = False,
) -> list[dict]:
    """Rows of the colocated engine; `sampling` (temperature, top-k, top-p) makes every
    request sample, seeded, instead of greedy; `micro_batches` > 0: the disaggregated engine
    (1 attention node here, 1 expert process) with that many micro-batches."""
    sampling = sampling or {}
    most, total = max(args.batches), args.prompt + args.warmup + args.steps + 7  # + traced
    settings = AttentionNodeSettings(
        0,
        str(model_dir),
        dtype=dtype,
        load_format="dummy",
        kv_blocks=most * -(-total // BLOCK) + 8,
        block_size=BLOCK,
        max_batch_tokens=most * args.prompt,
        max_running=most,
        device=args.device,
        cuda_graphs=graphs,
        quantization=quantization,
        decode_ahead=ahead,
        dispatch_fp8=fp8_rows,
    )
    expert_proc = conn = None
    if micro_batches:
        node, expert_proc, conn = _start_disaggregated(settings, micro_batches, lane)
    else:
        node = AttentionNode(settings, None)  # colocated: every expert on the node
    vocab = node.config.vocab_size
    rows, step = [], 0
    for B in args.batches:
        gen = torch.Generator().manual_seed(B)
        requests = [
            NewRequest(
                f"b{B}-{i}",
                torch.randint(0, vocab, (args.prompt,), generator=gen).tolist(),
                SamplingParams(max_tokens=total, ignore_eos=True, **sampling, seed=i),
            )
            for i in range(B)
        ]
        node.step(step, requests, [])  # the prefill: every prompt fits one step's budget
        step += 1
        node.prepare_graphs([B], total)  # as a server does at start: no capture in the timing
        for _ in range(args.warmup):  # graphs are captured here
            node.step(step, [], [])
            step += 1
        _sync(args.device)
        start = time.perf_counter()
        for _ in range(args.steps):
            result = node.step(step, [], [])
            assert len(result.outputs) == B, "every sequence decodes in every timed step"
            step += 1
        seconds = (time.perf_counter() - start) / args.steps
        if args.trace and conn is not None:
            name = f"trace-{lane}-m{micro_batches}-b{B}.json"
            step = _trace(node, conn, step, Path(args.trace) / name)
        node.step(step, [], [r.request_id for r in requests])
        step += 1
        name = ("afd-graph" if graphs else "afd-eager") + ("-sampled" if sampling else "")
        if micro_batches:
            name = f"afd-disagg-{lane}-m{micro_batches}" + ("-graph" if graphs else "")
        if quantization != "none":
            name += f"-{quantization}"
        if not ahead:
            name += "-sync"
        if fp8_rows:
            name += "-fp8rows"
        rows.append(_row(name, B, seconds, args.prompt + args.warmup + args.steps))
        if graphs and node.graphs is not None:
            rows[-1]["graph_replays"] = node.graphs.replays
    node.shutdown()
    if expert_proc is not None:
        expert_proc.terminate()
        expert_proc.join(30)
    del node
    return rows


def profile_step(model_dir: Path, args: argparse.Namespace, dtype: str) -> int:
    """Where an eager decode step's GPU time goes, by kernel (for bench/NOTES.md)."""
    from torch.profiler import ProfilerActivity, profile

    settings = AttentionNodeSettings(
        0,
        str(model_dir),
        dtype=dtype,
        load_format="dummy",
        max_batch_tokens=args.profile * args.prompt,
        max_running=args.profile,
        kv_blocks=args.profile * -(-(args.prompt + 140) // BLOCK) + 8,  # no preemption
        block_size=BLOCK,
        device=args.device,
        cuda_graphs=False,
    )
    node = AttentionNode(settings, None)
    sampling = SAMPLED if args.sampled else {}
    params = SamplingParams(max_tokens=200, ignore_eos=True, **sampling, seed=0)
    gen = torch.Generator().manual_seed(0)
    prompts = [  # distinct prompts: identical ones would all route to the same experts
        torch.randint(0, node.config.vocab_size, (args.prompt,), generator=gen).tolist()
        for _ in range(args.profile)
    ]
    node.step(0, [NewRequest(f"p{i}", p, params) for i, p in enumerate(prompts)], [])
    node.prepare_graphs([args.profile], args.prompt + 80)
    for step in range(1, 4):
        node.step(step, [], [])
    _sync(args.device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        node.step(4, [], [])
        _sync(args.device)
    kernels: Counter[str] = Counter()
    device_us: Counter[str] = Counter()
    for e in prof.events():
        if e.device_type.name == "CUDA":
            kernels[e.name[:80]] += 1
            device_us[e.name[:80]] += e.device_time_total
    print(f"eager step at batch {args.profile}: {sum(kernels.values())} kernels, "
          f"{sum(device_us.values()) / 1e3:.2f} ms of kernel time")  # fmt: skip
    for name, us in device_us.most_common(30):
        print(f"{kernels[name]:6} {us / 1e3:8.3f} ms  {name}")
    node.shutdown()
    del node
    _free(args.device)
    if args.device == "cuda":  # the same step as one graph: GPU time of a replay alone
        graphed = AttentionNode(replace(settings, cuda_graphs=True), None)
        graphed.step(0, [NewRequest(f"g{i}", p, params) for i, p in enumerate(prompts)], [])
        graphed.prepare_graphs([args.profile], args.prompt + 80)
        for step in range(1, 4):
            graphed.step(step, [], [])
        assert graphed.graphs is not None
        # the bucket the timed steps use: this batch, the blocks its sequences hold now
        blocks = max(len(t) for t in graphed.cache.tables.values())
        Mp = block_bucket(blocks, graphed.graphs.max_blocks)
        g = graphed.graphs.graphs[batch_bucket(args.profile), Mp]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            g.graph.replay()
        end.record()
        end.synchronize()
        replay_ms = start.elapsed_time(end) / 50
        _sync(args.device)
        t0 = time.perf_counter()
        for step in range(4, 54):
            graphed.step(step, [], [])
        step_ms = (time.perf_counter() - t0) / 50 * 1e3
        print(f"graph replay {replay_ms:.3f} ms on the GPU; the whole node step {step_ms:.3f} ms")
        import cProfile
        import pstats

        with cProfile.Profile() as host:
            for step in range(54, 74):
                graphed.step(step, [], [])
        pstats.Stats(host).sort_stats("cumulative").print_stats(22)
    return 0


def fp8_agreement(model_dir: Path, args: argparse.Namespace, dtype: str) -> dict:
    """The issue's accuracy check: 64 random prompts, 64 greedy tokens each from the engine in
    `dtype`; then the fp8 engine reads each whole sequence (teacher forcing) and its greedy
    choice at every generated position is compared with the bf16 token there. Also the
    logprob the fp8 model gives the bf16 token, against bf16's own (the drift)."""
    prompts, new = 64, 64
    settings = AttentionNodeSettings(
        0, str(model_dir), dtype=dtype, load_format="dummy", block_size=BLOCK,
        kv_blocks=prompts * -(-(args.prompt + new + 1) // BLOCK) + 8,
        max_batch_tokens=prompts * args.prompt, max_running=prompts, device=args.device,
    )  # fmt: skip
    node = AttentionNode(settings, None)
    gen = torch.Generator().manual_seed(64)
    vocab = node.config.vocab_size
    prompt_ids = [
        torch.randint(0, vocab, (args.prompt,), generator=gen).tolist() for _ in range(prompts)
    ]
    params = SamplingParams(max_tokens=new, ignore_eos=True)
    out: dict[str, list[tuple[int, float]]] = {f"a{i}": [] for i in range(prompts)}
    requests = [NewRequest(f"a{i}", p, params) for i, p in enumerate(prompt_ids)]
    for step in range(new + 2):
        for t in node.step(step, requests if step == 0 else [], []).outputs:
            out[t.request_id].append((t.token_id, t.logprob))
    node.shutdown()
    del node
    _free(args.device)
    quantized = AttentionNode(replace(settings, quantization="fp8", cuda_graphs=False), None)
    assert quantized.pipeline is not None
    same = total = 0
    drift = []
    with torch.inference_mode():
        for i, prompt in enumerate(prompt_ids):
            tokens = [t for t, _ in out[f"a{i}"]]
            batch = TokenBatch.build([(0, prompt + tokens[:-1], 0)]).to(args.device)
            rows = torch.arange(len(prompt) - 1, len(prompt) + len(tokens) - 1, device=args.device)
            attn = ContiguousAttention(ContiguousKVCache(), batch)
            logits = quantized.model.forward(batch, attn, quantized.pipeline.dispatcher, rows)
            chosen = logits.argmax(-1).tolist()
            logprobs = torch.log_softmax(logits, -1)[
                torch.arange(len(tokens)), torch.tensor(tokens)
            ]
            same += sum(a == b for a, b in zip(chosen, tokens, strict=True))
            total += len(tokens)
            drift += [abs(q - b) for q, (_, b) in zip(logprobs.tolist(), out[f"a{i}"], strict=True)]
    quantized.shutdown()
    drift_t = torch.tensor(drift)
    return {
        "positions": total,
        "greedy_agreement": same / total,
        "logprob_drift_mean": float(drift_t.mean()),
        "logprob_drift_p99": float(drift_t.quantile(0.99)),
    }


def bench_hf(raw: dict, args: argparse.Namespace, dtype: torch.dtype) -> list[dict]:
    import transformers

    config = transformers.AutoConfig.for_model(**raw)
    with torch.device(args.device):
        torch.set_default_dtype(dtype)
        try:
            model = transformers.AutoModelForCausalLM.from_config(config)
        finally:
            torch.set_default_dtype(torch.float32)
    model.eval()
    rows = []
    for B in args.batches:
        gen = torch.Generator(device=args.device).manual_seed(B)
        shape = (B, args.prompt)
        ids = torch.randint(0, raw["vocab_size"], shape, generator=gen, device=args.device)
        kwargs = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up
        _sync(args.device)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        _sync(args.device)
        t1 = time.perf_counter()
        n = args.steps + 1
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        _sync(args.device)
        t2 = time.perf_counter()
        decode = max((t2 - t1) - (t1 - t0), 1e-9) / args.steps
        rows.append(_row("hf", B, decode, args.prompt + args.steps))
    del model
    return rows


def _row(engine: str, batch: int, seconds: float, context: int) -> dict:
    return {
        "engine": engine,
        "batch": batch,
        "ms_per_step": seconds * 1e3,
        "tokens_per_s": batch / seconds,
        "context": context,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=[*PRESETS, "tiny"], default="qwen3-30b-a3b")
    p.add_argument("--layers", type=int, help="cut the model to this many layers")
    p.add_argument(
        "--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 8, 32, 64, 128]
    )
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-eager", action="store_true")
    p.add_argument(
        "--profile",
        type=int,
        metavar="B",
        help="print the top GPU kernels of an eager decode step at batch B, then exit",
    )
    p.add_argument(
        "--sampled",
        action="store_true",
        help="add rows whose requests sample (temperature 0.8, top-k 50, top-p 0.95, seeded)",
    )
    p.add_argument(
        "--fp8-dispatch",
        action="store_true",
        help="add host-lane disaggregated rows whose rows go to the expert node in fp8 "
        "(`transport.dispatch_dtype: fp8`, `-fp8rows`)",
    )
    p.add_argument(
        "--sync-rows",
        action="store_true",
        help="add rows of the colocated engine with decode-ahead off (`-sync`): each step's "
        "tokens read before the next step is launched",
    )
    p.add_argument(
        "--disaggregated",
        type=lambda s: [int(m) for m in s.split(",")],
        default=[],
        metavar="M,...",
        help="add rows of 1 attention node + 1 expert process, for each micro-batch count",
    )
    p.add_argument(
        "--lanes",
        type=lambda s: s.split(","),
        default=["host"],
        metavar="LANE,...",
        help="exchange lanes of the disaggregated rows: host, device, proxy (one GPU: run CUDA MPS)",
    )
    p.add_argument(
        "--fp8",
        action="store_true",
        help="add graph rows with fp8 weights, and their greedy agreement with bf16",
    )
    p.add_argument(
        "--skip-agreement",
        action="store_true",
        help="with --fp8: the rows only, not the greedy agreement with bf16 (64 × 64 tokens)",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--json-out", help="also write the JSON object to this file")
    p.add_argument(
        "--trace",
        metavar="DIR",
        help="after each disaggregated row's timed steps, trace three more and write the last two's "
        "timeline into DIR (the first captures the traced graphs)",
    )
    args = p.parse_args()
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    with tempfile.TemporaryDirectory() as d:
        if args.preset == "tiny":
            raw = dict(TINY, num_hidden_layers=args.layers or TINY["num_hidden_layers"])
            model_dir = write_preset("qwen3-30b-a3b", d, raw["num_hidden_layers"])
            (model_dir / "config.json").write_text(json.dumps(raw))
        else:
            model_dir = write_preset(args.preset, d, args.layers, max_positions=4096)
            raw = json.loads((model_dir / "config.json").read_text())
        config = load_config(model_dir)
        if args.profile:
            return profile_step(model_dir, args, dtype)
        bandwidth = copy_bandwidth(args.device)
        rows: list[dict] = []
        if not args.skip_hf:
            rows += bench_hf(raw, args, getattr(torch, dtype))
            _free(args.device)
        rows += bench_afd(model_dir, args, dtype, graphs=args.device == "cuda")
        _free(args.device)
        if args.sync_rows:  # the same engine reading each step's tokens before the next
            rows += bench_afd(model_dir, args, dtype, graphs=args.device == "cuda", ahead=False)
        _free(args.device)
        if args.sampled:
            rows += bench_afd(model_dir, args, dtype, args.device == "cuda", SAMPLED)
            _free(args.device)
        agreement = None
        if args.fp8:
            rows += bench_afd(model_dir, args, dtype, args.device == "cuda", quantization="fp8")
            _free(args.device)
            if not args.skip_agreement:
                agreement = fp8_agreement(model_dir, args, dtype)
                _free(args.device)
        for lane in args.lanes:
            for m in args.disaggregated:
                # a slot lane's step is one graph (m >= 2 too)
                graphs = lane in ("device", "proxy") and args.device == "cuda"
                rows += bench_afd(model_dir, args, dtype, graphs, micro_batches=m, lane=lane)
                _free(args.device)
                if lane == "host" and args.fp8_dispatch:  # the same rows dispatched in fp8
                    rows += bench_afd(
                        model_dir, args, dtype, graphs, micro_batches=m, lane=lane, fp8_rows=True
                    )
                    _free(args.device)
        if args.device == "cuda" and not args.skip_eager:
            rows += bench_afd(model_dir, args, dtype, graphs=False)
    itemsize = getattr(torch, dtype).itemsize
    for r in rows:
        one_byte = r["engine"].endswith("-fp8")  # projections and experts in fp8
        floor_s = floor_bytes(config, r["batch"], r["context"], itemsize, one_byte) / bandwidth
        r["floor_ms"], r["mbu"] = floor_s * 1e3, floor_s / (r["ms_per_step"] / 1e3)
    hf = {r["batch"]: r["tokens_per_s"] for r in rows if r["engine"] == "hf"}
    for r in rows:
        r["x_hf"] = r["tokens_per_s"] / hf[r["batch"]] if r["batch"] in hf else None
    meta = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "copy_GBps": bandwidth / 1e9,
        "preset": args.preset,
        "layers": config.num_layers,
        "dtype": dtype,
        "steps": args.steps,
        "prompt": args.prompt,
        "fp8_agreement": agreement,
    }
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({**meta, "rows": rows}, indent=1))
    if args.json:
        print(json.dumps({**meta, "rows": rows}))
        return 0
    print(meta)
    print(
        f"{'engine':<20}{'batch':>6}{'ms/step':>10}{'tok/s':>10}{'floor ms':>10}{'MBU':>7}{'x HF':>7}"
    )
    for r in rows:
        x = f"{r['x_hf']:.1f}" if r["x_hf"] else "-"
        print(
            f"{r['engine']:<20}{r['batch']:>6}{r['ms_per_step']:>10.2f}{r['tokens_per_s']:>10.1f}"
            f"{r['floor_ms']:>10.2f}{r['mbu']:>7.0%}{x:>7}"
        )
    return 0


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
