"""Expert load balancing on a skewed workload: node max/mean load and the expert side's step
time, with today's even placement and with the placement `afd plan-experts` makes from the
measured load (static replication into spare slots).

    python bench/eplb.py                       # tiny model on CPU, 3 expert nodes, 2 spare slots
    python bench/eplb.py --json-out eplb.json

Three runs: the even placement, then `afd plan-experts --all-layers` from the first run's load
(one placement for every layer, as `experts.assignment`), then a plan per layer (as
`experts.placement_file`), both replicating hot experts into the spare slots.

The model is a tiny random qwen3_moe whose router prefers a Zipf-distributed set of experts
in every layer: every token embedding shares one direction u, and expert e's router row is
c_e·u plus noise with c_e falling as a Zipf law (rank by a per-layer random permutation), so
most tokens pick the same few experts. The real nodes run in this process (an `AttentionNode`,
`ExpertNode`s on threads, their transport between them); each run serves the same requests.
Imbalance: per MoE layer, max/mean of the expert nodes' tokens (`ExpertLoadWindow`), averaged
over layers. Expert-side step time: the slowest expert node's compute per step, summed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from afd.attention_nodes.node import AttentionNode, AttentionNodeSettings
from afd.expert_nodes.node import ExpertNode, ExpertNodeSettings
from afd.models.config import load_config
from afd.models.expert_placement import ExpertPlacement
from afd.models.messages import ExpertStepResult, NewRequest
from afd.models.sampling import SamplingParams
from afd.models.tiny import make_tiny_model
from afd.orchestrator.expert_load import ExpertLoadWindow
from afd.orchestrator.plan_experts import merged, plan
from safetensors.torch import load_file, save_file

EXPERT_BASE = 1000
TIMEOUT_S = 60.0


def skewed_model(out: Path, experts: int, zipf: float, strength: float, seed: int) -> Path:
    """The tiny model with a router that prefers a Zipf-ranked set of experts per layer."""
    model = make_tiny_model(out, experts=experts, layers=2, top_k=2, hidden=64, seed=seed)
    tensors = load_file(str(model / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    D = tensors["model.embed_tokens.weight"].shape[1]
    u = torch.randn(D, generator=g)
    u /= u.norm()
    tensors["model.embed_tokens.weight"] += u  # every token leans along u
    for name in [n for n in tensors if n.endswith("mlp.gate.weight")]:
        rank = torch.randperm(experts, generator=g)  # which experts are hot differs per layer
        c = (1.0 + rank.float()) ** -zipf
        tensors[name] = 0.02 * torch.randn(experts, D, generator=g) + strength * c[:, None] * u
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    return model


def run(model: Path, placement: ExpertPlacement, prompts: list[list[int]], tokens: int) -> dict:
    """Serves the prompts on 1 attention node + the placement's expert nodes; the load."""
    config = load_config(model)
    attention = AttentionNode(
        AttentionNodeSettings(0, str(model), max_running=len(prompts)), placement
    )
    experts = [
        ExpertNode(
            ExpertNodeSettings(
                EXPERT_BASE + j, str(model), tuple(ids), layer_expert_ids=placement.node_layers(j)
            )
        )
        for j, ids in enumerate(placement.assignment)
    ]
    assignments = [placement.at(layer) for layer in config.moe_layers]
    window = ExpertLoadWindow(config.moe_layers, config.num_experts, assignments, 10**6)
    slowest = 0.0
    start = time.perf_counter()
    try:
        with ThreadPoolExecutor(len(experts)) as pool:
            waits = [pool.submit(e.wait_for_attention_nodes, [0], TIMEOUT_S) for e in experts]
            attention.connect([(e.settings.node_id, e.address()) for e in experts])
            for w in waits:
                w.result(TIMEOUT_S)
            params = SamplingParams(max_tokens=tokens, ignore_eos=True)
            new = [NewRequest(f"r{i}", p, params) for i, p in enumerate(prompts)]
            left, step = len(prompts), 0
            while left:
                runs = [pool.submit(e.run_step, step) for e in experts]
                result = attention.step(step, new, [])
                done: list[ExpertStepResult] = [r.result(TIMEOUT_S) for r in runs]
                for j, d in enumerate(done):
                    window.add(j, d.layer_tokens)
                slowest += max(d.compute_s for d in done)
                left -= sum(t.finish_reason is not None for t in result.outputs)
                new, step = [], step + 1
    finally:
        for node in [attention, *experts]:
            node.shutdown()
    layers = window.layers()
    return {
        "imbalance": float(np.mean([x.imbalance for x in layers])),
        "imbalance_per_layer": [x.imbalance for x in layers],
        "expert_side_s": slowest,
        "tokens_per_s": len(prompts) * tokens / (time.perf_counter() - start),
        "steps": step,
        "layers": [
            {"layer": x.layer, "expert_tokens": list(x.expert_tokens), "samples": []}
            for x in layers
        ],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--experts", type=int, default=12)
    p.add_argument("--expert-nodes", type=int, default=3)
    p.add_argument("--redundant-slots", type=int, default=2)
    p.add_argument("--zipf", type=float, default=2.0)
    p.add_argument("--strength", type=float, default=0.05, help="how hard the router leans")
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out")
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        model = skewed_model(Path(d) / "skewed", args.experts, args.zipf, args.strength, args.seed)
        g = torch.Generator().manual_seed(args.seed + 1)
        vocab = load_config(model).vocab_size
        prompts = [
            torch.randint(1, vocab, (12,), generator=g).tolist() for _ in range(args.requests)
        ]
        even = ExpertPlacement.even(args.experts, args.expert_nodes)
        before = run(model, even, prompts, args.tokens)
        planned = plan(merged(before["layers"]), args.expert_nodes, args.redundant_slots, 0.1)
        static = ExpertPlacement.explicit(args.experts, planned[0]["assignment"])
        after = run(model, static, prompts, args.tokens)
        per_layer = plan(before["layers"], args.expert_nodes, args.redundant_slots, 0.1)
        layered = even.with_layers({r["layer"]: r["assignment"] for r in per_layer})
        by_layer = run(model, layered, prompts, args.tokens)
    rows = [
        {"placement": "even (today's default)", **before, "assignment": even.assignment},
        {"placement": "one plan for all layers", **after, "assignment": planned[0]["assignment"]},
        {"placement": "a plan per layer", **by_layer, "assignment": [r["assignment"] for r in per_layer]},
    ]  # fmt: skip
    print(f"tiny qwen3_moe, {args.experts} experts, top-2, Zipf {args.zipf}; {args.expert_nodes} "
          f"expert nodes, {args.redundant_slots} spare slots each; {args.requests} requests × {args.tokens} tokens")  # fmt: skip
    print("| placement | node max/mean (mean over layers) | per layer | expert-side s | tok/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        per_layer = ", ".join(f"{x:.2f}" for x in r["imbalance_per_layer"])
        print(f"| {r['placement']} | {r['imbalance']:.2f} | {per_layer} | {r['expert_side_s']:.3f} | {r['tokens_per_s']:.1f} |")  # fmt: skip
    if args.json_out:
        for r in rows:
            r.pop("layers")
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
