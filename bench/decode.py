"""Decode throughput on one GPU: HF transformers (the peer) against afd, with each row's MBU.

    python bench/decode.py                      # Qwen3-30B-A3B shape, bf16, random weights
    python bench/decode.py --layers 8 --batches 1,8 --skip-hf --json
    python bench/decode.py --tiny --device cpu  # a smoke run of the same code on the CPU

Model: 48 layers, hidden 2048, 128 experts, top-8, expert FFN 768, 32/4 heads of 128, vocab
151936 (`--layers` shortens it). Weights are random normal (never zeros), made on the device.
Each row decodes `--steps` tokens for a batch of B sequences after a short prompt, timed with
CUDA events after warm-up. The floor: bytes a step must read (attention-side weights, the
LM head, the experts the batch is expected to touch, the KV cache) over the device-to-device
copy bandwidth measured in the same run; MBU = floor time / measured time.

Rows: `hf` = transformers `generate` (greedy, static shapes as HF runs them), `afd-eager` =
afd's fixed-shape decode without graphs, `afd-graph` = the same captured as one CUDA graph
per batch size. The disaggregated rows (one attention + one expert process) are not here yet:
see bench/NOTES.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from afd.models.config import load_config
from afd.models.model import AttentionSideModel
from afd.models.moe import ExpertShard, StackedExperts
from afd.models.static_decode import StaticDecoder
from afd.models.weights import ATTENTION_SIDE_KINDS, tensor_specs

QWEN3_30B_A3B = {
    "model_type": "qwen3_moe",
    "architectures": ["Qwen3MoeForCausalLM"],
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
}
TINY = {
    **QWEN3_30B_A3B,
    "vocab_size": 512,
    "hidden_size": 64,
    "moe_intermediate_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_experts": 8,
    "num_experts_per_tok": 2,
}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class _Timer:
    """CUDA events on the GPU, perf_counter elsewhere."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __enter__(self) -> _Timer:
        _sync(self.device)
        if self.device == "cuda":
            self.start, self.end = (
                torch.cuda.Event(enable_timing=True),
                torch.cuda.Event(enable_timing=True),
            )
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device == "cuda":
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1e3
        else:
            self.seconds = time.perf_counter() - self.t0


def copy_bandwidth(device: str) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    n = (1 << 30) if device == "cuda" else (1 << 26)
    a = torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    with _Timer(device) as t:
        for _ in range(10):
            b.copy_(a)
    return 2 * n * 10 / t.seconds


def _random(
    shape: tuple[int, ...], dtype: torch.dtype, device: str, gen: torch.Generator
) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * 0.02).to(dtype)


def build_attention(config, dtype: torch.dtype, device: str, seed: int) -> AttentionSideModel:
    gen = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for spec in tensor_specs(config, ATTENTION_SIDE_KINDS):
        if spec.name.endswith("norm.weight") or "layernorm" in spec.name:
            tensors[spec.name] = torch.ones(spec.shape, dtype=dtype, device=device)
        else:
            tensors[spec.name] = _random(spec.shape, dtype, device, gen)
    return AttentionSideModel(config, tensors)


def build_experts(
    config, dtype: torch.dtype, device: str, seed: int, expert_ids: list[int] | None = None
) -> ExpertShard:
    """Each (layer, expert) from its own seed, so that an expert process holding any subset
    makes exactly the experts the single process has."""
    ids = list(range(config.num_experts)) if expert_ids is None else list(expert_ids)
    F, D = config.moe_intermediate_size, config.hidden_size
    gen = torch.Generator(device=device)
    layers = {}
    for layer in config.moe_layers:
        parts = []
        for e in ids:
            gen.manual_seed(seed * 1_000_003 + layer * 4099 + e)
            parts.append([_random(s, dtype, device, gen) for s in ((F, D), (F, D), (D, F))])
        layers[layer] = StackedExperts(*(torch.stack(p) for p in zip(*parts, strict=True)))
    return ExpertShard(config, ids, layers)


# ---- disaggregated on one GPU: this process runs attention, a child process the experts -----


def _expert_process(
    raw: dict, dtype_name: str, seed: int, micro_batches: int, ports, device: str
) -> None:
    from afd.transport.endpoint import Transport
    from afd.transport.wire import RoundKey

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(raw))
        config = load_config(d)
    shard = build_experts(config, getattr(torch, dtype_name), device, seed)
    t = Transport(1000, device=device)
    ports.put(t.address)
    t.wait_for_peers([0], 120)
    step = 0
    with torch.inference_mode():
        while m := int(t.recv(0, RoundKey.control(step), 600)[0].item()):
            for layer in config.moe_layers:
                for mb in range(m):
                    key = RoundKey.exchange(step, layer, mb)
                    x, ids, weights = t.recv(0, key, 120)
                    t.send(0, key, [shard.forward(layer, x, ids.long(), weights)])
            t.flush(120)
            step += 1
    t.close()


class RemoteExperts:
    """The attention process's side: one expert process holding every expert."""

    def __init__(
        self, raw: dict, dtype: torch.dtype, seed: int, micro_batches: int, device: str
    ) -> None:
        import multiprocessing as mp

        from afd.transport.endpoint import Transport

        ctx = mp.get_context("spawn")
        ports = ctx.Queue()
        self.proc = ctx.Process(
            target=_expert_process,
            args=(raw, str(dtype).split(".")[-1], seed, micro_batches, ports, device),
        )
        self.proc.start()
        address = ports.get(timeout=600)
        self.t = Transport(0, device=device)
        self.t.connect(1000, address)
        self.step_id = 0

    def step(
        self, decoder: StaticDecoder, tokens_B: torch.Tensor, positions_B: torch.Tensor, m: int
    ) -> torch.Tensor:
        """One decode step, ping-ponging m micro-batches of slots between the two processes."""
        from afd.transport.wire import RoundKey

        s = self.step_id
        self.step_id += 1
        self.t.send(1000, RoundKey.control(s), [torch.full((1,), m, dtype=torch.uint8)])
        groups = torch.arange(tokens_B.shape[0]).chunk(m)
        mbs = [decoder.micro_batch(int(g[0]), tokens_B[g], positions_B[g]) for g in groups]
        for layer in range(decoder.config.num_layers):
            moe = decoder.config.is_moe_layer(layer)
            routed = []
            for i, mb in enumerate(mbs):  # attention of micro-batch i+1 overlaps experts of i
                r = decoder.pre_experts(layer, mb)
                routed.append(r)
                if moe:
                    ids = r.ids_TK.to(torch.int16)
                    self.t.send(1000, RoundKey.exchange(s, layer, i), [r.x_TD, ids, r.weights_TK])
            for i, (mb, r) in enumerate(zip(mbs, routed, strict=True)):
                y = self.t.recv(1000, RoundKey.exchange(s, layer, i), 120)[0] if moe else None
                decoder.post_experts(layer, mb, r, y)
        self.t.flush(120)
        return torch.cat([decoder.logits(mb) for mb in mbs])

    def close(self) -> None:
        from afd.transport.wire import RoundKey

        self.t.send(1000, RoundKey.control(self.step_id), [torch.zeros(1, dtype=torch.uint8)])
        self.t.flush(60)
        self.proc.join(120)
        self.t.close()


def bench_disaggregated(
    raw: dict, model, batches, steps, prompt, dtype, micro_batches, check, device
) -> list[dict]:
    rows = []
    remote = RemoteExperts(raw, dtype, 1, max(micro_batches), device)
    try:
        for m in micro_batches:
            for B in batches:
                if m > B:
                    continue
                decoder = StaticDecoder(model, None, B, prompt + steps + 8)
                gen = torch.Generator(device=device).manual_seed(B)
                tokens = torch.randint(
                    0, model.config.vocab_size, (B,), generator=gen, device=device
                )
                if check is not None and check[0] == B:
                    logits = remote.step(
                        decoder, check[1], torch.zeros(B, dtype=torch.int64, device=device), m
                    ).float()
                    err = float((logits - check[2]).norm() / check[2].norm())
                else:
                    err = None
                for pos in range(prompt):
                    logits = remote.step(decoder, tokens, torch.full((B,), pos, device=device), m)
                tokens = torch.argmax(logits, -1)
                with _Timer(device) as t:
                    for i in range(steps):
                        logits = remote.step(
                            decoder, tokens, torch.full((B,), prompt + i, device=device), m
                        )
                        tokens = torch.argmax(logits, -1)
                rows.append(_row(f"afd-disagg-m{m}", B, t.seconds / steps, prompt + steps))
                rows[-1]["vs_single_process_rel_err"] = err
    finally:
        remote.close()
    return rows


def floor_bytes(config, batch: int, context: int, dtype_bytes: int = 2) -> float:
    """What one decode step must read at least: every attention-side weight but the embedding
    table (one row per token), the experts the batch is expected to touch, and the KV cache."""
    c = config
    attn = (
        c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        + c.num_heads * c.head_dim * c.hidden_size
    )
    router = c.num_experts * c.hidden_size
    lm_head = c.vocab_size * c.hidden_size
    expert = 3 * c.hidden_size * c.moe_intermediate_size
    touched = c.num_experts * (1 - (1 - c.top_k / c.num_experts) ** batch)
    kv = 2 * batch * context * c.num_kv_heads * c.head_dim
    per_layer = attn + router + touched * expert + kv
    return (c.num_layers * per_layer + lm_head) * dtype_bytes


def bench_afd(model, shard, batches, steps, prompt, device, graphs: bool) -> list[dict]:
    rows = []
    max_len = prompt + steps + 8
    decoder = StaticDecoder(model, shard, max(batches), max_len)
    for B in batches:
        gen = torch.Generator(device=device).manual_seed(B)
        tokens = torch.randint(0, model.config.vocab_size, (B,), generator=gen, device=device)
        check = None
        if graphs:
            decoder.capture(B)
            where = torch.zeros(B, dtype=torch.int64, device=device)
            replayed = decoder.step(tokens, where).float()
            eager = decoder._step(tokens, where).float()  # same writes: the cache is unchanged
            check = float((replayed - eager).norm() / eager.norm())
        for pos in range(prompt):  # the prompt, one position a step, as decode would see it
            logits = decoder.step(tokens, torch.full((B,), pos, device=device))
        tokens = torch.argmax(logits, -1)
        with _Timer(device) as t:
            for i in range(steps):
                logits = decoder.step(tokens, torch.full((B,), prompt + i, device=device))
                tokens = torch.argmax(logits, -1)
        rows.append(
            _row("afd-graph" if graphs else "afd-eager", B, t.seconds / steps, prompt + steps)
        )
        rows[-1]["graph_vs_eager_rel_err"] = check
    return rows


def bench_hf(raw: dict, batches, steps, prompt, device, dtype) -> list[dict]:
    import transformers

    config = transformers.AutoConfig.for_model(**raw)
    with torch.device(device):
        torch.set_default_dtype(dtype)
        try:
            model = transformers.AutoModelForCausalLM.from_config(config)
        finally:
            torch.set_default_dtype(torch.float32)
    model.eval()
    rows = []
    for B in batches:
        gen = torch.Generator(device=device).manual_seed(B)
        ids = torch.randint(0, raw["vocab_size"], (B, prompt), generator=gen, device=device)
        kwargs = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up
        with _Timer(device) as prefill:
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        with _Timer(device) as t:
            model.generate(ids, max_new_tokens=steps + 1, min_new_tokens=steps + 1, **kwargs)
        rows.append(_row("hf", B, max(t.seconds - prefill.seconds, 1e-9) / steps, prompt + steps))
    del model
    return rows


def profile_step(config, dtype: torch.dtype, device: str, batch: int, prompt: int) -> int:
    """Where one eager decode step spends GPU time, by kernel (for the notes)."""
    from torch.profiler import ProfilerActivity, profile

    model, shard = (
        build_attention(config, dtype, device, 0),
        build_experts(config, dtype, device, 1),
    )
    decoder = StaticDecoder(model, shard, batch, prompt + 8)
    tokens = torch.ones(batch, dtype=torch.int64, device=device)
    where = torch.full((batch,), prompt, device=device)
    for _ in range(3):
        decoder.step(tokens, where)
    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            decoder.step(tokens, where)
        _sync(device)
    print(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)
    )
    return 0


def _row(engine: str, batch: int, step_s: float, context: int) -> dict:
    return {
        "engine": engine,
        "batch": batch,
        "ms_per_step": step_s * 1e3,
        "tokens_per_s": batch / step_s,
        "context": context,
    }


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, help="fewer layers than the model's 48")
    p.add_argument("--batches", default="1,8,32,64,128")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph rows")
    p.add_argument("--tiny", action="store_true", help="a tiny model of the same kind (smoke runs)")
    p.add_argument(
        "--disaggregated",
        default="1,2",
        help="micro-batch counts for the one attention + one expert process rows ('' to skip)",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--json-out", help="also write the JSON object to this file")
    p.add_argument(
        "--profile",
        type=int,
        metavar="B",
        help="print the top GPU kernels of one eager step at batch B, then exit",
    )
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    raw = dict(TINY if args.tiny else QWEN3_30B_A3B)
    if args.layers:
        raw["num_hidden_layers"] = args.layers
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(raw))
        config = load_config(d)
    if args.profile:
        return profile_step(config, dtype, args.device, args.profile, args.prompt)
    bandwidth = copy_bandwidth(args.device)
    rows = []
    if not args.skip_hf:
        rows += bench_hf(raw, batches, args.steps, args.prompt, args.device, dtype)
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    model = build_attention(config, dtype, args.device, seed=0)
    shard = build_experts(config, dtype, args.device, seed=1)
    rows += bench_afd(model, shard, batches, args.steps, args.prompt, args.device, graphs=False)
    if args.device == "cuda" and not args.no_graphs:
        rows += bench_afd(model, shard, batches, args.steps, args.prompt, args.device, graphs=True)
    if args.disaggregated:
        dev, check_b = args.device, batches[-1]
        gen = torch.Generator(device=dev).manual_seed(12345)
        check_tokens = torch.randint(0, config.vocab_size, (check_b,), generator=gen, device=dev)
        single = StaticDecoder(model, shard, check_b, args.prompt + args.steps + 8)
        with torch.inference_mode():
            zero = torch.zeros(check_b, dtype=torch.int64, device=dev)
            reference = single._step(check_tokens, zero).float()
        del single, shard
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()  # the expert process needs the memory the experts held here
        ms = [int(m) for m in args.disaggregated.split(",")]
        check = (check_b, check_tokens, reference)
        rows += bench_disaggregated(
            raw, model, batches, args.steps, args.prompt, dtype, ms, check, dev
        )
    for r in rows:
        floor_s = floor_bytes(config, r["batch"], r["context"], dtype.itemsize) / bandwidth
        r["floor_ms"] = floor_s * 1e3
        r["mbu"] = floor_s / (r["ms_per_step"] / 1e3)
    hf = {r["batch"]: r["tokens_per_s"] for r in rows if r["engine"] == "hf"}
    for r in rows:
        r["x_hf"] = r["tokens_per_s"] / hf[r["batch"]] if r["batch"] in hf else None
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    meta = {
        "device": device_name,
        "torch": torch.__version__,
        "copy_GBps": bandwidth / 1e9,
        "layers": raw["num_hidden_layers"],
        "steps": args.steps,
        "prompt": args.prompt,
    }
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({**meta, "rows": rows}, indent=1))
    if args.json:
        print(json.dumps({**meta, "rows": rows}))
        return 0
    print(f"{meta}")
    head = f"{'engine':<14}{'batch':>6}{'ms/step':>10}{'tok/s':>10}{'floor ms':>10}{'MBU':>7}"
    print(head + f"{'x HF':>7}{'check':>10}")
    for r in rows:
        x = f"{r['x_hf']:.1f}" if r["x_hf"] else "-"
        err = r.get("graph_vs_eager_rel_err", r.get("vs_single_process_rel_err"))
        check = "-" if err is None else f"{err:.1e}"
        print(
            f"{r['engine']:<14}{r['batch']:>6}{r['ms_per_step']:>10.2f}{r['tokens_per_s']:>10.1f}"
            f"{r['floor_ms']:>10.2f}{r['mbu']:>7.0%}{x:>7}{check:>10}"
        )
    by = {(r["engine"], r["batch"]): r["tokens_per_s"] for r in rows}
    for single in ("afd-graph", "afd-eager"):
        if ("afd-disagg-m2", 64) in by and (single, 64) in by:
            ratio = by["afd-disagg-m2", 64] / by[single, 64]
            print(f"disaggregated m=2 / {single} at batch 64: {ratio:.0%} (target 70% of single)")
    print("check: graph vs eager, or disaggregated vs single process: relative L2 of logits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
