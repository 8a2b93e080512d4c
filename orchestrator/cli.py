"""The `afd` command line: make-tiny-model, generate, serve, client, demo."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from afd.models.checkpoint import LOAD_FORMATS, CheckpointError
from afd.models.config import DTYPES, SUPPORTED_ARCHS, ConfigError, load_config
from afd.models.expert_placement import ExpertPlacementError
from afd.models.fp8 import QUANTIZATIONS
from afd.models.messages import TokenOutput
from afd.models.reference import GenerationResult, ReferenceEngine
from afd.models.request_state import PromptError
from afd.models.sampling import SamplingError, SamplingParams
from afd.models.tiny import make_tiny_model
from afd.models.tokenizer import Tokenizer, TokenizerError
from afd.orchestrator.client import channel, generate, request
from afd.orchestrator.cluster import Cluster, RequestFailed
from afd.orchestrator.config import Deployment, DeploymentError, ModelSection, load_deployment
from afd.orchestrator.local_ray import LocalRayError, disconnect_ray
from afd.orchestrator.plan_experts import LoadFileError
from afd.orchestrator.planner import (
    PlanError,
    deployment_yaml,
    load_catalog,
    search,
    table,
    with_measured,
)
from afd.orchestrator.pool_placement import PoolPlacementError
from afd.orchestrator.server import BackgroundServer, Server, with_ports, with_trace

DEMO_MODEL_DIR = Path(".afd/tiny-qwen3_moe")
LOAD_HELP = "dummy: random weights from config.json alone (no checkpoint needed)"
QUANT_HELP = "fp8: attention projections and experts in 128x128 block-scaled fp8 (E4M3)"
USER_ERRORS = (
    ConfigError,
    CheckpointError,
    DeploymentError,
    ExpertPlacementError,
    PromptError,
    SamplingError,
    TokenizerError,
    RequestFailed,
    PlanError,
    PoolPlacementError,
    LocalRayError,
    LoadFileError,
)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.handler(args)
    except USER_ERRORS as err:
        print(f"afd: error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="afd", description="Disaggregated MoE inference.")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    tiny = sub.add_parser("make-tiny-model", help="write a random-weight HF checkpoint")
    tiny.add_argument("dir")
    tiny.add_argument("--arch", choices=SUPPORTED_ARCHS, default="qwen3_moe")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--experts", type=int, default=8)
    tiny.add_argument("--top-k", type=int, default=2)
    tiny.add_argument("--hidden", type=int, default=64)
    tiny.set_defaults(handler=_make_tiny_model)

    gen = sub.add_parser("generate", help="generate from a prompt, in one process or on a cluster")
    gen.add_argument("--model", help="HF model directory (alone: the single-process path)")
    gen.add_argument("--config", help="deployment config YAML: run on the disaggregated cluster")
    gen.add_argument("--attention-nodes", type=int, help="cluster shape override (M)")
    gen.add_argument("--expert-nodes", type=int, help="cluster shape override (N)")
    gen.add_argument("--micro-batches", type=int, help="ping-pong micro-batches (m)")
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt")
    prompt.add_argument("--prompt-ids", help='comma-separated token ids, e.g. "1,2,3"')
    _add_sampling_args(gen)
    gen.add_argument("--dtype", choices=list(DTYPES), default="float32")
    gen.add_argument("--load-format", choices=LOAD_FORMATS, default=None, help=LOAD_HELP)
    gen.add_argument("--quantization", choices=QUANTIZATIONS, default=None, help=QUANT_HELP)
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.set_defaults(handler=_generate)

    serve = sub.add_parser("serve", help="serve gRPC and OpenAI-compatible HTTP until SIGTERM")
    serve.add_argument("config", help="deployment config YAML")
    serve.add_argument("--model", help="HF model directory (overrides the config's)")
    serve.add_argument("--attention-nodes", type=int)
    serve.add_argument("--expert-nodes", type=int)
    serve.add_argument("--micro-batches", type=int)
    serve.add_argument("--load-format", choices=LOAD_FORMATS, default=None, help=LOAD_HELP)
    serve.add_argument("--quantization", choices=QUANTIZATIONS, default=None, help=QUANT_HELP)
    serve.add_argument("--host")
    serve.add_argument("--grpc-port", type=int)
    serve.add_argument("--http-port", type=int)
    serve.add_argument(
        "--trace",
        metavar="DIR",
        help="write a Chrome/Perfetto timeline of the first steps with traffic into DIR",
    )
    serve.add_argument("--trace-steps", type=int, help="steps the timeline covers (default 8)")
    serve.set_defaults(handler=_serve)

    client = sub.add_parser("client", help="stream one generation from a running server")
    client.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of the gRPC API")
    client_prompt = client.add_mutually_exclusive_group(required=True)
    client_prompt.add_argument("--prompt")
    client_prompt.add_argument("--prompt-ids")
    _add_sampling_args(client)
    client.add_argument("--token", help="bearer token, when the server wants one")
    client.add_argument("--tls-ca", help="CA certificate (PEM) for a TLS server")
    client.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds")
    client.set_defaults(handler=_client)

    plan = sub.add_parser("plan", help="search deployment plans for a model and write the best")
    plan.add_argument("--model", required=True, help="HF model directory (its config.json)")
    plan.add_argument("--catalog", default="configs/gpu-catalog.yaml", help="GPU types to consider")
    plan.add_argument("--tpot-ms", type=float, required=True, help="time-per-output-token SLO")
    plan.add_argument("--max-gpus", type=int, default=16)
    plan.add_argument("--budget", type=float, help="dollars per hour, at most")
    plan.add_argument("--gpus", help="comma-separated GPU types from the catalog (default: all)")
    plan.add_argument("--tp", default="1", help="attention tensor-parallel sizes to consider")
    plan.add_argument("--objective", choices=["per_gpu", "per_dollar"], default="per_gpu")
    plan.add_argument(
        "--dtype", default="bfloat16", choices=["bfloat16", "float16", "fp8", "float32"]
    )
    plan.add_argument("--top", type=int, default=10)
    plan.add_argument(
        "--measured",
        action="append",
        default=[],
        metavar="GPU=RESULT.json",
        help="take a GPU type's HBM rate and efficiency from a bench/decode.py --json-out result",
    )
    plan.add_argument("--out", help="write the best plan as a deployment config here")
    plan.add_argument(
        "--cpu-only", action="store_true", help="written config asks for no GPUs (local tests)"
    )
    plan.set_defaults(handler=_plan)

    experts = sub.add_parser(
        "plan-experts", help="plan an expert placement per MoE layer from measured load"
    )
    load = experts.add_mutually_exclusive_group(required=True)
    load.add_argument("--loads", help='load file: {"layers": [{"expert_tokens": [...]}]}')
    load.add_argument("--target", help="HOST:PORT of a running server: its ClusterStatus load")
    experts.add_argument("--tls-ca", help="CA certificate (PEM) for a TLS server")
    experts.add_argument("--token", help="bearer token, when the server wants one")
    experts.add_argument("--nodes", type=int, required=True, help="expert nodes")
    experts.add_argument("--redundant-slots", type=int, default=0, help="spare slots per node")
    experts.add_argument(
        "--slack",
        type=float,
        default=0.1,
        help="load over the mean allowed to keep co-chosen experts together",
    )
    experts.add_argument(
        "--all-layers",
        action="store_true",
        help="one placement for every layer (usable as experts.assignment)",
    )
    experts.add_argument("--out", help="write the plan here as JSON")
    experts.set_defaults(handler=_plan_experts)

    demo = sub.add_parser("demo", help="tiny model served by a local 2+2-node cluster with m=2")
    demo.set_defaults(handler=_demo)
    return parser


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stop-token-ids", default="", help="comma-separated token ids")


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
        stop_token_ids=tuple(_ids(args.stop_token_ids, "--stop-token-ids")),
    )


def _ids(text: str, flag: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as err:
        raise PromptError(f"{flag} must be comma-separated integers, got {text!r}") from err


def _make_tiny_model(args: argparse.Namespace) -> int:
    out = make_tiny_model(
        args.dir, args.arch, args.seed, args.layers, args.experts, args.top_k, args.hidden
    )
    print(f"wrote a tiny {args.arch} model to {out}")
    return 0


def _deployment(args: argparse.Namespace) -> Deployment | None:
    """The cluster to run on, or None for the single-process path."""
    shape = (args.attention_nodes, args.expert_nodes, args.micro_batches)
    if args.config is None and all(v is None for v in shape):  # the single-process reference
        if args.model is None:
            raise DeploymentError("give --model DIR, --config CONFIG.yaml, or both")
        return None
    base = (
        load_deployment(args.config)
        if args.config
        else Deployment(model=ModelSection(path=args.model or ""))
    )
    return base.with_shape(
        *shape, model=args.model, load_format=args.load_format, quantization=args.quantization
    )


def _generate(args: argparse.Namespace) -> int:
    params = _sampling(args)
    deployment = _deployment(args)
    model_dir = deployment.model.path if deployment else args.model
    load_config(model_dir)  # a bad model directory is reported by its config first
    tokenizer = Tokenizer(model_dir)
    prompt_ids = (
        _ids(args.prompt_ids, "--prompt-ids")
        if args.prompt_ids is not None
        else tokenizer.encode(args.prompt)
    )
    if deployment is None:
        engine = ReferenceEngine(
            model_dir, args.dtype, args.load_format or "auto", args.quantization or "none"
        )
        events = engine.stream(prompt_ids, params)
        return _print_stream(events, args.json)
    cluster = Cluster(deployment)
    try:
        return _print_stream(cluster.submit(prompt_ids, params), args.json)
    finally:
        cluster.shutdown()
        disconnect_ray()


def _print_stream(events: Iterable[TokenOutput], as_json: bool) -> int:
    result = GenerationResult()
    for event in events:
        result.add(event)
        if not as_json:
            print(event.text_delta, end="", flush=True)
    print(json.dumps(result.as_json()) if as_json else "")
    return 0


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    deployment = load_deployment(args.config).with_shape(
        args.attention_nodes,
        args.expert_nodes,
        args.micro_batches,
        model=args.model,
        load_format=args.load_format,
        quantization=args.quantization,
    )
    load_config(deployment.model.path)  # a bad model directory fails before Ray starts
    deployment = with_ports(deployment, args.host, args.grpc_port, args.http_port)
    deployment = with_trace(deployment, args.trace, args.trace_steps)
    return Server(deployment).run_forever()


def _plan_experts(args: argparse.Namespace) -> int:
    from afd.orchestrator import plan_experts

    for flag, value, least in (
        ("--nodes", args.nodes, 1),
        ("--redundant-slots", args.redundant_slots, 0),
        ("--slack", args.slack, 0),
    ):
        if value < least:
            raise DeploymentError(f"{flag} must be at least {least}, got {value}")
    layers = (
        plan_experts.read_load_file(args.loads)
        if args.loads
        else plan_experts.read_server_load(args.target, args.tls_ca, args.token)
    )
    if not layers:
        raise DeploymentError("no expert load to plan from (a colocated server reports none)")
    if args.all_layers:
        layers = plan_experts.merged(layers)
    rows = plan_experts.plan(layers, args.nodes, args.redundant_slots, args.slack)
    plan_experts.print_table(rows)
    if args.out:
        result: dict = {"nodes": args.nodes, "layers": rows}
        if args.all_layers:
            result["assignment"] = rows[0]["assignment"]  # for experts.assignment
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


def _client(args: argparse.Namespace) -> int:
    sampling = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "stop": args.stop,
        "stop_token_ids": _ids(args.stop_token_ids, "--stop-token-ids"),
        "logprobs": True,
    }
    if args.seed is not None:
        sampling["seed"] = args.seed
    req = (
        request(ids=_ids(args.prompt_ids, "--prompt-ids"), **sampling)
        if args.prompt_ids is not None
        else request(text=args.prompt, **sampling)
    )
    try:
        with channel(args.target, args.tls_ca) as ch:
            for response in generate(ch, req, args.token, args.timeout):
                print(response.text, end="", flush=True)
                if response.finish_reason:
                    u = response.usage
                    print(
                        f"\n[{response.finish_reason}: {u.prompt_tokens} prompt + "
                        f"{u.completion_tokens} generated tokens]"
                    )
    except grpc.RpcError as err:
        print(f"afd: error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 2
    return 0


def _plan(args: argparse.Namespace) -> int:
    config = load_config(args.model)
    catalog = load_catalog(args.catalog)
    for item in args.measured:
        gpu, _, path = item.partition("=")
        catalog = with_measured(catalog, gpu, path)
    plans = search(
        config,
        catalog,
        args.tpot_ms,
        dtype=args.dtype,
        max_gpus=args.max_gpus,
        budget_per_hour=args.budget,
        objective=args.objective,
        gpu_types=args.gpus.split(",") if args.gpus else None,
        tp_sizes=tuple(_ids(args.tp, "--tp")),
    )
    print(f"{len(plans)} plans meet TPOT <= {args.tpot_ms} ms; best by {args.objective}:")
    print(table(plans, args.top))
    if args.out:
        dtype = "bfloat16" if args.dtype == "fp8" else args.dtype
        Path(args.out).write_text(deployment_yaml(plans[0], args.model, dtype, args.cpu_only))
        print(f"wrote plan 1 to {args.out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING)
    if not (DEMO_MODEL_DIR / "config.json").is_file():
        make_tiny_model(DEMO_MODEL_DIR)
        print(f"made a tiny qwen3_moe model in {DEMO_MODEL_DIR}")
    deployment = Deployment(model=ModelSection(path=str(DEMO_MODEL_DIR))).with_shape(2, 2, 2)
    deployment = with_ports(deployment, "127.0.0.1", 0, 0)
    print("starting a local Ray cluster: 2 attention nodes, 2 expert nodes, 2 micro-batches")
    server = BackgroundServer(deployment)
    endpoints = server.start()
    print(f"serving: gRPC {endpoints.grpc}, HTTP {endpoints.http}")
    cluster = server.server.cluster
    assert cluster is not None  # started with the server
    cluster.keep_history = True
    prompts = ["Hello, world!", "The capital of France is", "Once upon a time", "def add(a, b):"]
    try:
        with channel(endpoints.grpc) as ch, ThreadPoolExecutor(len(prompts)) as pool:
            texts = pool.map(
                lambda p: "".join(
                    r.text for r in generate(ch, request(text=p, max_tokens=24, ignore_eos=True))
                ),
                prompts,
            )
            for prompt, text in zip(prompts, texts, strict=True):
                print(f"{prompt!r} -> {text!r}")
        print(_stats_table(cluster))
    finally:
        server.stop()
    print("shut down cleanly")
    return 0


def _stats_table(cluster: Cluster) -> str:
    steps = cluster.history
    lines = [f"{len(steps)} steps", f"{'node':<12}{'busy s':>10}{'wait s':>10}{'tokens':>10}"]
    for i in range(len(cluster.attention)):
        mine = [a for s in steps if (a := s.attention[i]) is not None]
        busy = sum(a.timings.attention_s for a in mine)
        wait = sum(a.timings.expert_wait_s for a in mine)
        tokens = sum(a.tokens for a in mine)
        lines.append(f"{f'attention-{i}':<12}{busy:>10.3f}{wait:>10.3f}{tokens:>10}")
    for j in range(len(cluster.experts)):
        busy = sum(s.experts[j].compute_s for s in steps)
        wait = sum(s.experts[j].wait_s for s in steps)
        tokens = sum(sum(s.experts[j].tokens_per_expert.values()) for s in steps)
        lines.append(f"{f'expert-{j}':<12}{busy:>10.3f}{wait:>10.3f}{tokens:>10}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
