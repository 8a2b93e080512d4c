"""`afd plan`: MegaScale-Infer's deployment-plan search over GPU types, pool sizes, tensor
parallelism, micro-batches and batch size, with a roofline performance model.

Per layer and micro-batch of b tokens (per attention node):
  T_a = max(attention bytes / HBM, attention FLOPs / peak)   on one attention node (TP t_a)
  T_e = max(expert bytes / HBM, expert FLOPs / peak)         on one expert node
  T_c = dispatch bytes / network + fixed latency             one way
Ping-pong with m micro-batches: a layer takes T_layer = max(m·T_a, m·T_e, T_a + T_e + 2·T_c):
the busier pool sets the pace unless one micro-batch's round trip is longer, which is the
paper's m >= 2(1 + T_c/T_f) condition (T_f = max(T_a, T_e)) seen from the other side.
TPOT = layers · T_layer; throughput = batch / TPOT. A plan must fit memory (weights, and the
KV cache of its batch at the catalog's context length) and the TPOT SLO; the search maximises
decode throughput per GPU (or per dollar), within the budget or GPU count.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from pathlib import Path

import yaml
from afd.models.config import ModelConfig

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "fp8": 1, "float32": 4}


class PlanError(ValueError):
    """Bad catalog or search inputs, or no plan meets them; the message says which."""


@dataclass(frozen=True, slots=True)
class GpuType:
    name: str
    memory_GB: float
    hbm_TBps: float
    bf16_TFLOPs: float
    fp8_TFLOPs: float
    net_GBps: float
    price_per_hour: float
    hbm_efficiency: float
    flops_efficiency: float

    def hbm(self) -> float:  # bytes/s
        return self.hbm_TBps * 1e12 * self.hbm_efficiency

    def flops(self, dtype_bytes: int) -> float:
        peak = self.fp8_TFLOPs if dtype_bytes == 1 else self.bf16_TFLOPs
        return peak * 1e12 * self.flops_efficiency


@dataclass(frozen=True, slots=True)
class Catalog:
    gpus: dict[str, GpuType]
    latency_s: float
    max_context: int


@dataclass(frozen=True, slots=True)
class Plan:
    attention_gpu: str
    attention_nodes: int
    attention_tp: int
    expert_gpu: str
    expert_nodes: int
    micro_batches: int
    batch: int  # sequences decoding at once, over all attention nodes
    t_attention_us: float
    t_expert_us: float
    t_comm_us: float
    tpot_ms: float
    tokens_per_s: float
    gpus: int
    price_per_hour: float

    @property
    def per_gpu(self) -> float:
        return self.tokens_per_s / self.gpus

    @property
    def per_dollar(self) -> float:  # tokens per dollar
        return (
            self.tokens_per_s * 3600 / self.price_per_hour if self.price_per_hour else float("inf")
        )


def load_catalog(path: str | Path) -> Catalog:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise PlanError(f"{path}: cannot read the GPU catalog ({err})") from err
    defaults = raw.get("defaults", {}) if isinstance(raw, dict) else {}
    entries = raw.get("gpus") if isinstance(raw, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise PlanError(f"{path}: needs a 'gpus' mapping of GPU types")
    fields = ("memory_GB", "hbm_TBps", "bf16_TFLOPs", "fp8_TFLOPs", "net_GBps", "price_per_hour")
    gpus = {}
    for name, spec in entries.items():
        spec = {
            **{k: defaults[k] for k in ("hbm_efficiency", "flops_efficiency") if k in defaults},
            **(spec or {}),
        }
        missing = [f for f in (*fields, "hbm_efficiency", "flops_efficiency") if f not in spec]
        if missing:
            raise PlanError(f"{path}: GPU type '{name}' lacks {', '.join(missing)}")
        bad = [f for f in spec if not isinstance(spec[f], int | float) or spec[f] < 0]
        if bad:
            raise PlanError(f"{path}: GPU type '{name}': {bad[0]} must be a non-negative number")
        gpus[name] = GpuType(
            name, **{k: float(spec[k]) for k in (*fields, "hbm_efficiency", "flops_efficiency")}
        )
    return Catalog(
        gpus, float(defaults.get("latency_us", 20)) * 1e-6, int(defaults.get("max_context", 4096))
    )


def with_measured(catalog: Catalog, gpu: str, bench_json: str | Path) -> Catalog:
    """The catalog with one GPU type's memory rates replaced by what `bench/decode.py --json-out`
    measured on it: its copy bandwidth, and the best MBU afd reached there as the efficiency."""
    if gpu not in catalog.gpus:
        raise PlanError(f"--measured names {gpu!r}, which is not in the catalog")
    try:
        run = yaml.safe_load(Path(bench_json).read_text())  # JSON is YAML
        copy = float(run["copy_GBps"])
        mbus = [r["mbu"] for r in run["rows"] if r["engine"].startswith("afd")]
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as err:
        raise PlanError(f"{bench_json}: not a bench/decode.py result ({err})") from err
    if not mbus:
        raise PlanError(f"{bench_json}: has no afd rows to take an efficiency from")
    g = catalog.gpus[gpu]
    measured = replace(g, hbm_TBps=copy / 1e3, hbm_efficiency=max(mbus))
    return replace(catalog, gpus={**catalog.gpus, gpu: measured})


@dataclass(frozen=True, slots=True)
class Shape:
    """What the performance model needs of a model, in parameters and bytes."""

    layers: int
    attention_params: float  # per layer: q, k, v, o, router, norms
    expert_params: float  # per expert per layer
    experts: int
    top_k: int
    hidden: int
    kv_bytes_per_token: float  # per layer, K and V
    head_params: float  # embedding + LM head
    attention_flops_per_ctx: float  # per token per layer per context position (QK and PV)

    @classmethod
    def of(cls, c: ModelConfig, dtype_bytes: int) -> Shape:
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        attention = c.hidden_size * (q + 2 * kv) + q * c.hidden_size + c.num_experts * c.hidden_size
        attention += (
            3 * c.hidden_size * c.shared_expert_size
        )  # a shared expert lives with attention
        return cls(
            layers=c.num_layers,
            attention_params=attention,
            expert_params=3 * c.hidden_size * c.moe_intermediate_size,
            experts=c.num_experts,
            top_k=c.top_k,
            hidden=c.hidden_size,
            kv_bytes_per_token=2 * kv * dtype_bytes,
            head_params=(1 if c.tie_word_embeddings else 2) * c.vocab_size * c.hidden_size,
            attention_flops_per_ctx=4 * q,
        )


def model_step(
    shape: Shape,
    catalog: Catalog,
    att: GpuType,
    tp: int,
    n_att: int,
    exp: GpuType,
    n_exp: int,
    m: int,
    batch: int,
    dtype_bytes: int,
    context: int,
) -> tuple[float, float, float, float]:
    """(T_a, T_e, T_c, T_layer) in seconds for one layer at this plan and batch."""
    b = batch / n_att / m  # tokens of one micro-batch on one attention node
    att_bytes = (shape.attention_params * dtype_bytes + b * context * shape.kv_bytes_per_token) / tp
    att_flops = (2 * shape.attention_params + shape.attention_flops_per_ctx * context) * b / tp
    t_a = max(att_bytes / att.hbm(), att_flops / att.flops(dtype_bytes))
    tokens = batch / m * shape.top_k / n_exp  # (token, expert) pairs one expert node serves
    experts_here = shape.experts / n_exp
    touched = experts_here * (1 - (1 - 1 / experts_here) ** tokens) if tokens else 0
    exp_bytes = touched * shape.expert_params * dtype_bytes
    exp_flops = 2 * shape.expert_params * tokens
    t_e = max(exp_bytes / exp.hbm(), exp_flops / exp.flops(dtype_bytes))
    pairs = b * min(shape.top_k, n_exp)  # rows one attention node sends, one per expert node hit
    net = min(att.net_GBps, exp.net_GBps) * 1e9 * tp  # every attention GPU has its own link
    t_c = pairs * shape.hidden * dtype_bytes / net + catalog.latency_s
    return t_a, t_e, t_c, max(m * t_a, m * t_e, t_a + t_e + 2 * t_c)


def search(
    config: ModelConfig,
    catalog: Catalog,
    tpot_slo_ms: float,
    dtype: str = "bfloat16",
    max_gpus: int = 16,
    budget_per_hour: float | None = None,
    objective: str = "per_gpu",
    gpu_types: list[str] | None = None,
    tp_sizes: tuple[int, ...] = (1,),  # afd's attention nodes run on one GPU today
    micro_batches: tuple[int, ...] = (1, 2, 3, 4),
    batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
) -> list[Plan]:
    """Every feasible plan, best first."""
    if dtype not in DTYPE_BYTES:
        raise PlanError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    if objective not in ("per_gpu", "per_dollar"):
        raise PlanError(f"objective must be per_gpu or per_dollar, got {objective!r}")
    names = gpu_types or list(catalog.gpus)
    unknown = [n for n in names if n not in catalog.gpus]
    if unknown:
        raise PlanError(
            f"GPU type {unknown[0]!r} is not in the catalog ({', '.join(catalog.gpus)})"
        )
    bytes_ = DTYPE_BYTES[dtype]
    shape = Shape.of(config, bytes_)
    context = min(catalog.max_context, config.max_position_embeddings)
    plans = []
    for a_name, e_name in itertools.product(names, names):
        att, exp = catalog.gpus[a_name], catalog.gpus[e_name]
        for tp, n_att in itertools.product(tp_sizes, range(1, max_gpus + 1)):
            att_weights = (shape.layers * shape.attention_params + shape.head_params) * bytes_ / tp
            free = att.memory_GB * 1e9 * 0.9 - att_weights
            if free <= 0:
                continue
            kv_per_seq = shape.layers * context * shape.kv_bytes_per_token / tp
            for n_exp in range(1, max_gpus - n_att * tp + 1):
                per_node = -(-shape.experts // n_exp) * shape.layers * shape.expert_params * bytes_
                if per_node > exp.memory_GB * 1e9 * 0.9 or n_exp > shape.experts:
                    continue
                gpus = n_att * tp + n_exp
                price = n_att * tp * att.price_per_hour + n_exp * exp.price_per_hour
                if budget_per_hour is not None and price > budget_per_hour:
                    continue
                for m, batch in itertools.product(micro_batches, batches):
                    if batch < n_att * m or batch / n_att * kv_per_seq > free:
                        continue
                    t_a, t_e, t_c, t_layer = model_step(
                        shape, catalog, att, tp, n_att, exp, n_exp, m, batch, bytes_, context
                    )
                    tpot = shape.layers * t_layer
                    if tpot * 1e3 > tpot_slo_ms:
                        continue
                    plans.append(
                        Plan(
                            a_name,
                            n_att,
                            tp,
                            e_name,
                            n_exp,
                            m,
                            batch,
                            t_a * 1e6,
                            t_e * 1e6,
                            t_c * 1e6,
                            tpot * 1e3,
                            batch / tpot,
                            gpus,
                            price,
                        )
                    )
    if not plans:
        raise PlanError(
            f"no plan meets a TPOT of {tpot_slo_ms} ms within {max_gpus} GPUs"
            + (f" and ${budget_per_hour}/h" if budget_per_hour is not None else "")
        )
    key = (lambda p: p.per_gpu) if objective == "per_gpu" else (lambda p: p.per_dollar)
    return sorted(plans, key=lambda p: (-key(p), p.tpot_ms))


def table(plans: list[Plan], top: int = 10) -> str:
    head = f"{'#':>3} {'attention':<14}{'experts':<11}{'m':>2}{'batch':>6}{'T_a us':>9}{'T_e us':>9}{'T_c us':>9}{'TPOT ms':>9}{'tok/s':>10}{'/GPU':>8}{'$/h':>7}"
    lines = [head]
    for i, p in enumerate(plans[:top], 1):
        att = f"{p.attention_nodes}x{p.attention_gpu}" + (
            f"(tp{p.attention_tp})" if p.attention_tp > 1 else ""
        )
        lines.append(
            f"{i:>3} {att:<14}{f'{p.expert_nodes}x{p.expert_gpu}':<11}{p.micro_batches:>2}{p.batch:>6}"
            f"{p.t_attention_us:>9.1f}{p.t_expert_us:>9.1f}{p.t_comm_us:>9.1f}{p.tpot_ms:>9.2f}"
            f"{p.tokens_per_s:>10.0f}{p.per_gpu:>8.0f}{p.price_per_hour:>7.2f}"
        )
    return "\n".join(lines)


def deployment_yaml(plan: Plan, model_path: str, dtype: str, cpu_only: bool = False) -> str:
    """The plan as a deployment config `afd serve` starts from."""
    per_node = max(1, plan.batch // plan.attention_nodes)
    doc = {
        "model": {"path": model_path, "dtype": dtype},
        "attention": {
            "nodes": plan.attention_nodes,
            "num_gpus": 0 if cpu_only else plan.attention_tp,
            "accelerator_type": None if cpu_only else plan.attention_gpu,
            "strategy": "spread",
            "max_running": per_node,
        },
        "experts": {
            "nodes": plan.expert_nodes,
            "num_gpus": 0 if cpu_only else 1,
            "accelerator_type": None if cpu_only else plan.expert_gpu,
            "strategy": "spread",
        },
        "pipeline": {"micro_batches": plan.micro_batches},
    }
    note = (
        f"# afd plan: {plan.attention_nodes}x{plan.attention_gpu} (tp {plan.attention_tp}) attention, "
        f"{plan.expert_nodes}x{plan.expert_gpu} experts, m={plan.micro_batches}, batch {plan.batch}: "
        f"predicted TPOT {plan.tpot_ms:.2f} ms, {plan.tokens_per_s:.0f} tokens/s, "
        f"{plan.per_gpu:.0f} per GPU\n"
    )
    return note + yaml.safe_dump(doc, sort_keys=False)
