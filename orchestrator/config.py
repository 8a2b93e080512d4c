"""The deployment config: which model, how many attention and expert nodes, with what resources,
how many micro-batches, KV capacity and transport settings. Read from YAML and checked field by
field; an unknown or bad field is an error naming its path in the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, get_args, get_type_hints

import yaml
from afd.models.checkpoint import LOAD_FORMATS
from afd.models.config import DTYPES
from afd.models.fp8 import QUANTIZATIONS
from afd.transport.endpoint import TransportSettings
from afd.transport.lanes import SLOT_LANES

_SCALARS = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict}


class DeploymentError(ValueError):
    """A deployment config afd cannot run; the message names the file and the field."""


@dataclass(frozen=True, slots=True)
class ModelSection:
    path: str = ""  # the HF model directory: config.json, tokenizer, safetensors
    dtype: str = "float32"
    load_format: str = "auto"  # "dummy": random weights from config.json alone (benches)
    quantization: str = "none"  # "fp8": attention projections and experts in block-scaled fp8


@dataclass(frozen=True, slots=True)
class PoolSection:
    """What the attention and expert pools have in common: how many actors, and where Ray
    puts them."""

    nodes: int = 1
    num_cpus: float = 0.0
    num_gpus: float = 0.0  # GPUs per actor
    accelerator_type: str | None = None  # e.g. "H100": only nodes whose GPUs Ray reports as that
    resources: dict | None = None  # custom Ray resources per actor, e.g. {"afd_expert_host": 1}
    strategy: str = "spread"  # spread: actors on as many nodes as possible; pack: on few

    @property
    def device(self) -> str:
        """Where the pool's nodes hold their tensors: "cuda" (the GPU Ray gave the actor)."""
        return "cuda" if self.num_gpus > 0 else "cpu"


@dataclass(frozen=True, slots=True)
class AttentionSection(PoolSection):
    cuda_graphs: bool = True  # colocated on CUDA: decode-only steps replay CUDA graphs
    # captured at start for every batch bucket up to max_running and sequences up to this many
    # tokens (longer ones capture their graphs when they get there); 0: all on first use
    cuda_graph_context: int = 1024
    # colocated or on a slot lane: launch each decode step before reading the previous
    # one's tokens, so the host's scheduling, detokenizing and streaming overlap the GPU's step
    decode_ahead: bool = True
    kv_blocks: int = 256
    block_size: int = 16
    max_batch_tokens: int = 512
    max_running: int = 64


@dataclass(frozen=True, slots=True)
class RebalanceSection:
    """Live rebalancing: every `every_steps` steps the orchestrator looks at the load window;
    where a layer's node imbalance (max/mean) exceeds `threshold`, it plans that layer again,
    the expert nodes load the experts they newly hold while serving, and every node switches
    at one step boundary. At most `max_moves` (layer, node, expert) copies move at a time."""

    enabled: bool = False
    threshold: float = 1.5
    every_steps: int = 64
    max_moves: int = 64


@dataclass(frozen=True, slots=True)
class ExpertSection(PoolSection):
    assignment: list | None = None  # explicit expert ids per node; default: even contiguous ranges
    replicas: int = 1  # nodes holding each expert: with 2, an expert node's death costs no round
    load_window: int = 128  # steps over which expert load and imbalance are reported
    placement_file: str | None = None  # `afd plan-experts --out`: a placement per MoE layer
    redundant_slots: int = 0  # spare expert slots per node and layer, for copies of hot experts
    rebalance: RebalanceSection = field(default_factory=RebalanceSection)


@dataclass(frozen=True, slots=True)
class PipelineSection:
    micro_batches: int = 1


@dataclass(frozen=True, slots=True)
class TransportSection(TransportSettings):
    """The transport's own settings (defaults and meaning in `TransportSettings`) and the
    orchestrator's deadlines for a round and for a recovery."""

    round_timeout_s: float = 30.0
    recovery_timeout_s: float = 120.0  # a dead node must be back (restarted, loaded) by then
    # the exchange lane for rows and sums: "host" (frames over the transport, any machines),
    # "device" (slots in shared GPU or host memory; every node on one host, MPS for one GPU) or
    # "proxy" (the same slots, moved over the network by a proxy thread per node: any machines)
    lane: str = "host"
    # the rows sent to expert nodes: "model" (the model's dtype) or "fp8" (E4M3 with a scale per
    # 128 features: half of bf16's bytes; the partial sums come back in the model's dtype)
    dispatch_dtype: str = "model"

    def settings(self) -> TransportSettings:
        """The part a node's transport takes."""
        return TransportSettings(
            **{f.name: getattr(self, f.name) for f in fields(TransportSettings)}
        )


@dataclass(frozen=True, slots=True)
class RaySection:
    address: str | None = None  # None: start a local Ray instance (or use the running one)
    startup_timeout_s: float = 120.0
    max_restarts: int = 8  # per node actor; -1: without limit


@dataclass(frozen=True, slots=True)
class ServeSection:
    host: str = "127.0.0.1"  # loopback unless the operator opens it up
    grpc_port: int = 50051
    http_port: int = 8000
    model_name: str | None = None  # the name clients use; default: the model directory's name
    auth_token: str | None = None  # bearer token clients must send; None: no auth
    auth_token_env: str | None = None  # or: the environment variable that holds it
    tls_cert: str | None = None  # PEM files; both or neither
    tls_key: str | None = None
    max_requests: int = 256  # admitted and unfinished, cluster-wide; more get RESOURCE_EXHAUSTED
    max_prompt_chars: int = 1 << 20
    max_message_bytes: int = 4 << 20
    drain_timeout_s: float = 60.0
    trace_dir: str | None = None  # `afd serve --trace DIR`: a timeline of the first steps run
    trace_steps: int = 8  # how many steps it covers


@dataclass(frozen=True, slots=True)
class Deployment:
    model: ModelSection = field(default_factory=ModelSection)
    attention: AttentionSection = field(default_factory=AttentionSection)
    experts: ExpertSection = field(default_factory=ExpertSection)
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    transport: TransportSection = field(default_factory=TransportSection)
    ray: RaySection = field(default_factory=RaySection)
    serve: ServeSection = field(default_factory=ServeSection)

    def with_shape(
        self,
        attention_nodes: int | None,
        expert_nodes: int | None,
        micro_batches: int | None,
        model: str | None = None,
        load_format: str | None = None,
        quantization: str | None = None,
    ) -> Deployment:
        """The same deployment with the CLI's overrides applied, and checked again."""
        d = self
        if model is not None:
            d = replace(d, model=replace(d.model, path=model))
        if load_format is not None:
            d = replace(d, model=replace(d.model, load_format=load_format))
        if quantization is not None:
            d = replace(d, model=replace(d.model, quantization=quantization))
        if attention_nodes is not None:
            d = replace(d, attention=replace(d.attention, nodes=attention_nodes))
        if expert_nodes is not None:
            d = replace(d, experts=replace(d.experts, nodes=expert_nodes, assignment=None))
        if micro_batches is not None:
            d = replace(d, pipeline=replace(d.pipeline, micro_batches=micro_batches))
        _check(d, "command line")
        return d


def load_deployment(path: str | Path) -> Deployment:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise DeploymentError(f"{path}: cannot read deployment config ({err.strerror})") from err
    except yaml.YAMLError as err:
        raise DeploymentError(f"{path}: not valid YAML ({err})") from err
    deployment = _build(Deployment, raw or {}, str(path), "")
    _check(deployment, str(path))
    return deployment


def _build(cls: type, raw: Any, source: str, where: str) -> Any:
    if not isinstance(raw, dict):
        raise DeploymentError(
            f"{source}: '{where.rstrip('.') or 'top level'}' must be a mapping, got {type(raw).__name__}"
        )
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise DeploymentError(
            f"{source}: unknown field '{where}{unknown[0]}'; known: {', '.join(sorted(known))}"
        )
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        path = f"{where}{name}"
        if isinstance(hint, type) and is_dataclass(hint):
            values[name] = _build(hint, value, source, path + ".")
        else:
            values[name] = _coerce(value, hint, source, path)
    return cls(**values)


def _coerce(value: Any, hint: Any, source: str, path: str) -> Any:
    names = [a.__name__ for a in get_args(hint)] or [hint.__name__]
    if value is None:
        if "NoneType" in names:
            return None
        raise DeploymentError(f"{source}: field '{path}' must not be empty")
    expected = next(n for n in names if n != "NoneType")
    if expected == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    typ = _SCALARS[expected]
    if not isinstance(value, typ) or (typ is not bool and isinstance(value, bool)):
        raise DeploymentError(f"{source}: field '{path}' must be {expected}, got {value!r}")
    return value


def _resource_map(resources: dict | None) -> bool:
    return resources is None or all(
        isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool) and v >= 0
        for k, v in resources.items()
    )


def _pool_rules(
    pool: str, s: PoolSection, colocated_allowed: bool = False
) -> list[tuple[str, bool, str]]:
    """The checks every pool section passes (the attention pool's and the experts'). The
    experts may have no nodes: each attention node then holds every expert (colocated)."""
    least = 0 if colocated_allowed else 1
    return [
        (
            f"{pool}.nodes",
            s.nodes >= least,
            ">= 0 (0: colocated, experts on the attention nodes)" if least == 0 else ">= 1",
        ),
        (f"{pool}.num_cpus", s.num_cpus >= 0, ">= 0"),
        (f"{pool}.num_gpus", s.num_gpus >= 0, ">= 0"),
        (f"{pool}.strategy", s.strategy in ("spread", "pack"), "spread or pack"),
        (
            f"{pool}.resources",
            _resource_map(s.resources),
            "a mapping of resource names to non-negative numbers",
        ),
    ]


def _check(d: Deployment, source: str) -> None:
    rules = [
        ("model.path", bool(d.model.path), "a model directory"),
        ("model.dtype", d.model.dtype in DTYPES, f"one of {', '.join(DTYPES)}"),
        ("model.load_format", d.model.load_format in LOAD_FORMATS, " or ".join(LOAD_FORMATS)),
        ("model.quantization", d.model.quantization in QUANTIZATIONS, " or ".join(QUANTIZATIONS)),
        *_pool_rules("attention", d.attention),
        *_pool_rules("experts", d.experts, colocated_allowed=True),
        ("experts.load_window", d.experts.load_window >= 1, "at least 1 (steps)"),
        (
            "experts.replicas",
            1 <= d.experts.replicas <= max(1, d.experts.nodes),
            f"between 1 and experts.nodes ({d.experts.nodes})",
        ),
        ("experts.redundant_slots", d.experts.redundant_slots >= 0, ">= 0"),
        ("experts.rebalance.threshold", d.experts.rebalance.threshold >= 1.0, ">= 1.0 (max/mean)"),
        ("experts.rebalance.every_steps", d.experts.rebalance.every_steps >= 1, ">= 1"),
        ("experts.rebalance.max_moves", d.experts.rebalance.max_moves >= 1, ">= 1"),
        (
            "experts.rebalance.enabled",
            not d.experts.rebalance.enabled or d.experts.nodes >= 2,
            "false with fewer than 2 expert nodes (nothing to balance)",
        ),
        ("pipeline.micro_batches", 1 <= d.pipeline.micro_batches <= 16, "between 1 and 16"),
        ("attention.kv_blocks", d.attention.kv_blocks >= 1, ">= 1"),
        ("attention.block_size", d.attention.block_size >= 1, ">= 1"),
        ("attention.max_batch_tokens", d.attention.max_batch_tokens >= 1, ">= 1"),
        ("attention.max_running", d.attention.max_running >= 1, ">= 1"),
        ("attention.cuda_graph_context", d.attention.cuda_graph_context >= 0, ">= 0"),
        (
            "transport.progress_mode",
            d.transport.progress_mode in ("blocking", "polling"),
            "blocking or polling",
        ),
        ("transport.spin_us", d.transport.spin_us >= 0, ">= 0"),
        (
            "transport.lane",
            d.transport.lane in ("host", *SLOT_LANES),
            "host, device or proxy",
        ),
        (
            "transport.lane",
            d.transport.lane == "host" or (d.experts.nodes >= 1 and d.experts.replicas == 1),
            "host with experts.nodes 0 (no exchange) or experts.replicas > 1 (failover within "
            "a step is the host lane's)",
        ),
        (
            "transport.dispatch_dtype",
            d.transport.dispatch_dtype in ("model", "fp8"),
            "model or fp8",
        ),
        (
            "transport.dispatch_dtype",
            d.transport.dispatch_dtype == "model" or d.transport.lane == "host",
            "model on the device and proxy lanes (their slots hold rows in the model's dtype; "
            "fp8 dispatch is the host lane's)",
        ),
        ("serve.grpc_port", 0 <= d.serve.grpc_port < 65536, "a port number (0: any free port)"),
        ("serve.http_port", 0 <= d.serve.http_port < 65536, "a port number (0: any free port)"),
        ("serve.max_requests", d.serve.max_requests >= 1, ">= 1"),
        ("serve.max_prompt_chars", d.serve.max_prompt_chars >= 1, ">= 1"),
        ("serve.max_message_bytes", d.serve.max_message_bytes >= 1024, ">= 1024"),
        ("serve.drain_timeout_s", d.serve.drain_timeout_s > 0, "> 0"),
        ("serve.trace_steps", d.serve.trace_steps >= 1, ">= 1"),
        (
            "serve.tls_key",
            (d.serve.tls_cert is None) == (d.serve.tls_key is None),
            "given together with serve.tls_cert",
        ),
        ("transport.round_timeout_s", d.transport.round_timeout_s > 0, "> 0"),
        ("transport.recovery_timeout_s", d.transport.recovery_timeout_s > 0, "> 0"),
        ("transport.connect_timeout_s", d.transport.connect_timeout_s > 0, "> 0"),
        ("transport.max_frame_bytes", d.transport.max_frame_bytes >= 1024, ">= 1024"),
        ("transport.max_pending_frames", d.transport.max_pending_frames >= 1, ">= 1"),
    ]
    for name, ok, must in rules:
        if not ok:
            raise DeploymentError(f"{source}: field '{name}' must be {must}")
    if d.experts.assignment is not None and len(d.experts.assignment) != d.experts.nodes:
        raise DeploymentError(
            f"{source}: field 'experts.assignment' lists {len(d.experts.assignment)} nodes but 'experts.nodes' is {d.experts.nodes}"
        )
