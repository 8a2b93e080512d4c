"""Expert load balancing on a skewed workload whose hot experts shift halfway: node max/mean
load, the expert side's step time and tokens/s, with today's even placement, with a static plan
(`afd plan-experts` per layer, from a first run's load: replication into spare slots), and
with live rebalancing (`experts.rebalance`) starting from the even placement.

    python bench/eplb.py                       # tiny model on CPU, 3 expert nodes, 2 spare slots
    python bench/eplb.py --device cuda --hidden 2048 --ffn 768 --experts 64 --json-out eplb.json

The model is a tiny random qwen3_moe whose router prefers a Zipf-ranked set of experts in
every layer, a different set for each half of the vocabulary: a token of the lower half leans
along a direction u_A, one of the upper half along u_B, and expert e's router row is
c_A[e]·u_A + c_B[e]·u_B plus noise, where c_A and c_B fall as Zipf laws over two rankings per
layer; with `--hot-together 1` each ranking starts with the experts of one node's even range
(drawn per layer and half), the case the even placement serves worst and the one the target
"max/mean ≥ 2.5 before" asks for. The LM head leans the same way, so a sequence generates within its own
half. Phase A's prompts come from the lower half, phase B's (sent once phase A is done) from
the upper half: the hot set moves at the phase boundary.

The real nodes run in this process (an `AttentionNode`, `ExpertNode`s on threads, their
transport between them) and live rebalancing uses the cluster's own `Rebalancer` and the nodes'
`stage_experts`/`hold_experts`/`set_placement`: the expert nodes stage a plan while the next
step runs; all switch at the boundary after. Imbalance: per MoE layer, max/mean of the expert
nodes' tokens over the last `--window` steps, averaged over layers. Expert-side time: the
slowest expert node's compute per step, summed.
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
from afd.orchestrator.config import RebalanceSection
from afd.orchestrator.expert_load import ExpertLoadWindow
from afd.orchestrator.plan_experts import plan
from afd.orchestrator.rebalancer import Rebalancer
from safetensors.torch import load_file, save_file

EXPERT_BASE = 1000
TIMEOUT_S = 120.0


def shape_overrides(args: argparse.Namespace) -> dict:
    """Wider shapes keep heads of 128 (what the GPU attention kernels are built for)."""
    out: dict = {"moe_intermediate_size": args.ffn} if args.ffn else {}
    if args.hidden >= 512:
        heads = args.hidden // 128
        out |= {"num_attention_heads": heads, "head_dim": 128, "num_key_value_heads": heads // 4}
    return out


def skewed_model(out: Path, args: argparse.Namespace) -> Path:
    """The tiny model with a router that prefers a Zipf-ranked set of experts per layer and
    vocabulary half."""
    model = make_tiny_model(
        out,
        experts=args.experts,
        layers=args.layers,
        top_k=2,
        hidden=args.hidden,
        seed=args.seed,
        overrides=shape_overrides(args),
    )
    tensors = load_file(str(model / "model.safetensors"))
    g = torch.Generator().manual_seed(args.seed)
    embed = tensors["model.embed_tokens.weight"]
    V, D = embed.shape
    even = ExpertPlacement.even(args.experts, args.expert_nodes)
    u = torch.randn(2, D, generator=g)
    u /= u.norm(dim=1, keepdim=True)
    # phase A's tokens lean along u_A, phase B's along u_B, by √D: the lean then outweighs what
    # the layers add to the residual stream at any width, so every MoE layer sees it
    u *= D**0.5
    embed[: V // 2] += u[0]
    embed[V // 2 :] += u[1]
    head = tensors["lm_head.weight"]  # and pick their next token from their own half
    head[: V // 2] += 4 * u[0] / D**0.5
    head[V // 2 :] += 4 * u[1] / D**0.5
    for name in [n for n in tensors if n.endswith("mlp.gate.weight")]:
        router = 0.02 * torch.randn(args.experts, D, generator=g)
        for half in range(2):  # which experts are hot differs per layer and per half
            order = torch.randperm(args.experts, generator=g)
            if args.hot_together:  # the hottest in one even range: the even placement's worst
                node = int(torch.randint(0, args.expert_nodes, (1,), generator=g))
                held = torch.tensor(even.assignment[node])
                first = held[torch.randperm(len(held), generator=g)]
                order = torch.cat([first, order[~torch.isin(order, held)]])
            rank = torch.empty(args.experts, dtype=torch.long)
            rank[order] = torch.arange(args.experts)
            c = (1.0 + rank.float()) ** -args.zipf
            router += args.strength * c[:, None] * u[half]
        tensors[name] = router
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    return model


class Deployment:
    """1 attention node and the placement's expert nodes in this process, wired."""

    def __init__(self, model: Path, placement: ExpertPlacement, args: argparse.Namespace) -> None:
        self.config = load_config(model)
        self.placement = placement
        device, dtype = args.device, args.dtype
        self.attention = AttentionNode(
            AttentionNodeSettings(
                0, str(model), dtype=dtype, device=device, max_running=args.requests
            ),
            placement,
        )
        self.experts = [
            ExpertNode(
                ExpertNodeSettings(
                    EXPERT_BASE + j,
                    str(model),
                    tuple(ids),
                    dtype=dtype,
                    device=device,
                    layer_expert_ids=placement.node_layers(j),
                )
            )
            for j, ids in enumerate(placement.assignment)
        ]
        self.pool = ThreadPoolExecutor(len(self.experts) + 1)
        waits = [self.pool.submit(e.wait_for_attention_nodes, [0], TIMEOUT_S) for e in self.experts]
        self.attention.connect([(e.settings.node_id, e.address()) for e in self.experts])
        for w in waits:
            w.result(TIMEOUT_S)

    def window(self, steps: int) -> ExpertLoadWindow:
        layers = self.config.moe_layers
        return ExpertLoadWindow(
            layers,
            self.config.num_experts,
            [self.placement.at(layer) for layer in layers],
            steps,
        )

    def close(self) -> None:
        self.pool.shutdown()
        for node in [self.attention, *self.experts]:
            node.shutdown()


def run(
    model: Path,
    placement: ExpertPlacement,
    phases: list[list[list[int]]],
    args: argparse.Namespace,
    rebalance: bool,
) -> dict:
    """Serves the phases one after the other; per step, the windowed imbalance."""
    d = Deployment(model, placement, args)
    settings = RebalanceSection(rebalance, args.threshold, args.every_steps, args.max_moves)
    rebalancer = Rebalancer(settings, args.redundant_slots)
    window = d.window(args.window)  # what the rebalancer looks at, as the cluster's
    whole = [d.window(10**6) for _ in phases]  # a phase's whole load, for the static plan
    node_tokens: list[np.ndarray] = []  # per step, [N, L]: each node's tokens per layer
    phase_of: list[int] = []
    staging = None
    slowest, step, rebalances = 0.0, 0, []
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    start = time.perf_counter()
    try:
        for p, prompts in enumerate(phases):
            new = [NewRequest(f"{p}-{i}", ids, params) for i, ids in enumerate(prompts)]
            left = len(prompts)
            while left:
                if staging is not None:  # the boundary after the staging step: switch
                    plan_, refs = staging
                    for r in refs:
                        r.result(TIMEOUT_S)
                    for j, e in enumerate(d.experts):
                        e.hold_experts(plan_.version, plan_.node_layers(j))
                    d.attention.set_placement(plan_.version, plan_.placement)
                    d.placement = plan_.placement
                    rebalancer.switched(plan_, step)
                    window = d.window(args.window)
                    rebalances.append({"step": step, "layers": list(plan_.layers),
                                       "moves": plan_.moves, "measured": plan_.measured,
                                       "expected": plan_.expected})  # fmt: skip
                    staging = None
                else:
                    plan_ = rebalancer.look(step, d.placement, window.layers())
                    if plan_ is not None:  # staged while this step runs
                        refs = [
                            d.pool.submit(e.stage_experts, plan_.version, plan_.node_layers(j))
                            for j, e in enumerate(d.experts)
                        ]
                        staging = (plan_, refs)
                runs = [d.pool.submit(e.run_step, step) for e in d.experts]
                result = d.attention.step(step, new, [])
                done: list[ExpertStepResult] = [r.result(TIMEOUT_S) for r in runs]
                for j, r in enumerate(done):
                    window.add(j, r.layer_tokens)
                    if not rebalance:  # columns follow the placement it started with
                        whole[p].add(j, r.layer_tokens)
                node_tokens.append(np.array([[sum(row) for row in r.layer_tokens] for r in done]))
                phase_of.append(p)
                slowest += max(r.compute_s for r in done)
                left -= sum(t.finish_reason is not None for t in result.outputs)
                new, step = [], step + 1
    finally:
        d.close()
    elapsed = time.perf_counter() - start
    imbalance = trailing_imbalance(node_tokens, args.window)
    ends = [max(i for i, q in enumerate(phase_of) if q == p) for p in range(len(phases))]
    shift = ends[0] + 1
    restored = next(
        (i - shift for i in range(shift + args.window, len(imbalance)) if imbalance[i] <= 1.3),
        None,
    )
    return {
        "imbalance_end_of_phase": [imbalance[i] for i in ends],
        "imbalance_mean": float(np.mean(imbalance)),
        "steps_to_1_3_after_shift": restored,
        "expert_side_s": slowest,
        "tokens_per_s": sum(len(x) for x in phases) * args.tokens / elapsed,
        "steps": step,
        "rebalances": rebalances,
        "phase_loads": [
            [
                {"layer": x.layer, "expert_tokens": list(x.expert_tokens), "samples": []}
                for x in w.layers()
            ]
            for w in whole
        ],  # fmt: skip
    }


def trailing_imbalance(node_tokens: list[np.ndarray], steps: int) -> list[float]:
    """Per step: max/mean of the nodes' tokens over the last `steps` steps, per layer, averaged
    over layers (1.0 where nothing ran)."""
    out = []
    for i in range(len(node_tokens)):
        loads = np.sum(node_tokens[max(0, i - steps + 1) : i + 1], axis=0).astype(float)  # [N, L]
        mean = loads.mean(axis=0)
        ratio = np.where(mean > 0, loads.max(axis=0) / np.where(mean > 0, mean, 1.0), 1.0)
        out.append(float(ratio.mean()))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--experts", type=int, default=12)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--ffn", type=int, default=0, help="expert FFN width (0: the tiny default)")
    p.add_argument("--expert-nodes", type=int, default=3)
    p.add_argument("--redundant-slots", type=int, default=2)
    p.add_argument("--zipf", type=float, default=2.0)
    p.add_argument("--strength", type=float, default=0.3, help="how hard the router leans")
    p.add_argument(
        "--hot-together", type=int, default=1, help="1: each hot set within one node's even range"
    )
    p.add_argument("--requests", type=int, default=24, help="per phase")
    p.add_argument("--prompt", type=int, default=12, help="prompt tokens")
    p.add_argument("--tokens", type=int, default=48, help="tokens generated per request")
    p.add_argument("--window", type=int, default=8, help="steps the imbalance is taken over")
    p.add_argument("--threshold", type=float, default=1.3)
    p.add_argument("--every-steps", type=int, default=8)
    p.add_argument("--max-moves", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out")
    args = p.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model = skewed_model(Path(tmp) / "skewed", args)
        g = torch.Generator().manual_seed(args.seed + 1)
        V = load_config(model).vocab_size
        phases = [
            [torch.randint(lo, hi, (args.prompt,), generator=g).tolist() for _ in range(args.requests)]
            for lo, hi in ((1, V // 2), (V // 2, V))
        ]  # fmt: skip
        even = ExpertPlacement.even(args.experts, args.expert_nodes)
        if args.device != "cpu":  # kernels compile (per shape) outside the timed runs
            run(model, even, [x[: max(1, len(x) // 8)] for x in phases], args, rebalance=True)
        before = run(model, even, phases, args, rebalance=False)
        per_layer = plan(before["phase_loads"][0], args.expert_nodes, args.redundant_slots, 0.1)
        static = even.with_layers({r["layer"]: r["assignment"] for r in per_layer})
        planned = run(model, static, phases, args, rebalance=False)
        live = run(model, even, phases, args, rebalance=True)
    rows = [
        {"placement": "even (default)", **before},
        {"placement": "static plan from phase A's load", **planned},
        {"placement": "live rebalancing from even", **live},
    ]
    print(f"tiny qwen3_moe on {args.device}, {args.experts} experts, top-2, hidden {args.hidden}, "
          f"Zipf {args.zipf}; {args.expert_nodes} expert nodes, {args.redundant_slots} spare slots; "
          f"2 phases × {args.requests} requests × ({args.prompt} prompt + {args.tokens}) tokens; "
          f"imbalance over the last {args.window} steps; rebalance: threshold {args.threshold}, "
          f"every {args.every_steps} steps")  # fmt: skip
    print(
        "| placement | max/mean end of A | end of B | mean over steps | steps after the shift "
        "to ≤ 1.3 | rebalances | expert-side s | tok/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        a, b = r["imbalance_end_of_phase"]
        back = "-" if r["steps_to_1_3_after_shift"] is None else r["steps_to_1_3_after_shift"]
        print(f"| {r['placement']} | {a:.2f} | {b:.2f} | {r['imbalance_mean']:.2f} | {back} | "
              f"{len(r['rebalances'])} | {r['expert_side_s']:.3f} | {r['tokens_per_s']:.1f} |")  # fmt: skip
    if args.json_out:
        for r in rows:
            r.pop("phase_loads")
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
