"""One typed config for every supported MoE architecture, parsed from HF `config.json`.

The four HF families name the same ideas differently (Mixtral's `num_local_experts`,
Qwen2-MoE's shared expert, OLMoE's full-width q/k norm); everything downstream reads
`ModelConfig` only, so architecture differences live here and in `weights.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtypes a model may run in, by the name configs and the command line use."""

SUPPORTED_ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")
SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn")

Arch = Literal["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"]
# Mixtral and OLMoE have no dense layers, so their `intermediate_size` is the expert width.
_EXPERT_WIDTH_FIELD = {"mixtral": "intermediate_size", "olmoe": "intermediate_size"}


class ConfigError(ValueError):
    """A config file that afd cannot serve; the message names the file and the field."""


@dataclass(frozen=True, slots=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position: int | None = None  # yarn
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn: scales cos/sin; None means derived


@dataclass(frozen=True, slots=True)
class ModelConfig:
    arch: Arch
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    dense_intermediate_size: int  # FFN width of the dense (non-MoE) layers
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    norm_topk_prob: bool
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: Literal["none", "per_head", "full"]  # qwen3: per head; olmoe: over all heads
    clip_qkv: float | None = None  # olmoe: clamp q, k, v to +-clip_qkv
    shared_expert_size: int = 0  # qwen2_moe only; 0 means no shared expert
    dense_layers: frozenset[int] = field(default_factory=frozenset)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def is_moe_layer(self, layer: int) -> bool:
        return layer not in self.dense_layers

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

    @property
    def renormalize_topk(self) -> bool:
        return self.arch == "mixtral" or self.norm_topk_prob


class _Fields:
    """Reads fields of one raw config dict, naming the file in every error."""

    def __init__(self, raw: dict[str, Any], source: str) -> None:
        self.raw, self.source = raw, source

    def need(self, *names: str) -> Any:
        for name in names:
            if self.raw.get(name) is not None:
                return self.raw[name]
        raise ConfigError(f"{self.source}: missing field '{names[0]}' (needed for {self.arch})")

    def get(self, name: str, default: Any) -> Any:
        value = self.raw.get(name)
        return default if value is None else value

    @property
    def arch(self) -> str:
        return str(self.raw.get("model_type"))


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no config.json in model directory {model_dir}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object at top level")
    return parse_config(raw, str(path))


def parse_config(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    arch = raw.get("model_type")
    if arch not in SUPPORTED_ARCHS:
        raise ConfigError(
            f"{source}: field 'model_type' is {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}"
        )
    f = _Fields(raw, source)
    hidden, heads = int(f.need("hidden_size")), int(f.need("num_attention_heads"))
    num_layers = int(f.need("num_hidden_layers"))
    config = ModelConfig(
        arch=arch,
        vocab_size=int(f.need("vocab_size")),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=int(f.get("num_key_value_heads", heads)),
        head_dim=int(f.get("head_dim", hidden // heads)),
        num_experts=int(f.need("num_local_experts" if arch == "mixtral" else "num_experts")),
        top_k=int(f.need("num_experts_per_tok")),
        moe_intermediate_size=int(f.need(_EXPERT_WIDTH_FIELD.get(arch, "moe_intermediate_size"))),
        dense_intermediate_size=int(f.get("intermediate_size", 0)),
        rms_norm_eps=float(f.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(f.need("max_position_embeddings")),
        rope=_parse_rope(f),
        norm_topk_prob=bool(f.get("norm_topk_prob", False)),
        tie_word_embeddings=bool(f.get("tie_word_embeddings", False)),
        attention_bias=_attention_bias(f),
        qk_norm={"qwen3_moe": "per_head", "olmoe": "full"}.get(arch, "none"),  # type: ignore[arg-type]
        clip_qkv=raw.get("clip_qkv"),
        shared_expert_size=int(f.need("shared_expert_intermediate_size"))
        if arch == "qwen2_moe"
        else 0,
        dense_layers=_dense_layers(f, num_layers),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_ids(raw.get("eos_token_id")),
    )
    _check(config, source)
    return config


def _attention_bias(f: _Fields) -> bool:
    if f.arch == "qwen2_moe":
        return bool(f.get("qkv_bias", True))
    return bool(f.get("attention_bias", False))


def _dense_layers(f: _Fields, num_layers: int) -> frozenset[int]:
    """Qwen MoE families put a dense MLP where `mlp_only_layers` or `decoder_sparse_step` say."""
    if f.arch not in ("qwen3_moe", "qwen2_moe"):
        return frozenset()
    only = {int(i) for i in f.get("mlp_only_layers", [])}
    step = int(f.get("decoder_sparse_step", 1))
    if step < 1:
        raise ConfigError(f"{f.source}: field 'decoder_sparse_step' must be >= 1, got {step}")
    sparse = {i for i in range(num_layers) if (i + 1) % step == 0}
    return frozenset(i for i in range(num_layers) if i in only or i not in sparse)


def _parse_rope(f: _Fields) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters`; older configs use rope_theta + rope_scaling.
    params = dict(f.get("rope_parameters", {}) or {})
    scaling = dict(f.get("rope_scaling", {}) or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", f.raw.get("rope_theta"))
    if theta is None:
        raise ConfigError(f"{f.source}: missing field 'rope_theta' (or rope_parameters.rope_theta)")
    rope_type = str(merged.get("rope_type", merged.get("type", "default")))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{f.source}: rope type {rope_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(merged.get("factor", 1.0)),
        original_max_position=merged.get("original_max_position_embeddings"),
        beta_fast=float(merged.get("beta_fast") or 32.0),
        beta_slow=float(merged.get("beta_slow") or 1.0),
        attention_factor=merged.get("attention_factor"),
    )


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)


def _check(c: ModelConfig, source: str) -> None:
    checks = [
        (
            "num_attention_heads",
            c.num_heads % c.num_kv_heads == 0,
            "a multiple of num_key_value_heads",
        ),
        (
            "num_experts_per_tok",
            1 <= c.top_k <= c.num_experts,
            "between 1 and the number of experts",
        ),
        ("hidden_size", c.hidden_size > 0, "positive"),
        ("vocab_size", c.vocab_size > 0, "positive"),
    ]
    for name, ok, must in checks:
        if not ok:
            raise ConfigError(f"{source}: field '{name}' must be {must}")
    if c.dense_layers and c.dense_intermediate_size <= 0:
        raise ConfigError(f"{source}: field 'intermediate_size' needed for the dense layers")
