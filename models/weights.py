"""The checkpoint's tensor names and shapes, per architecture, and selection by kind/layer/expert.

A node never asks for "the model": it asks for kinds (attention-side or experts), layers and
expert ids, so the expert nodes and attention nodes each read only their own tensors.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from afd.models.config import ModelConfig

Kind = Literal[
    "embed", "attention", "router", "shared_expert", "dense_mlp", "experts", "final_norm", "lm_head"
]
ALL_KINDS: tuple[Kind, ...] = (
    "embed",
    "attention",
    "router",
    "shared_expert",
    "dense_mlp",
    "experts",
    "final_norm",
    "lm_head",
)
ATTENTION_SIDE_KINDS: tuple[Kind, ...] = tuple(k for k in ALL_KINDS if k != "experts")
# Projections of one expert as (afd name, HF name for qwen/olmoe, HF name for mixtral).
EXPERT_PROJECTIONS = (
    ("gate", "gate_proj", "w1"),
    ("up", "up_proj", "w3"),
    ("down", "down_proj", "w2"),
)
# Buffers some HF checkpoints carry that are recomputed, never loaded.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    kind: Kind
    layer: int | None = None
    expert: int | None = None


def moe_prefix(config: ModelConfig, layer: int) -> str:
    block = "block_sparse_moe" if config.arch == "mixtral" else "mlp"
    return f"model.layers.{layer}.{block}"


def expert_tensor_name(config: ModelConfig, layer: int, expert: int, projection: str) -> str:
    hf = {afd: (mix if config.arch == "mixtral" else qwen) for afd, qwen, mix in EXPERT_PROJECTIONS}
    return f"{moe_prefix(config, layer)}.experts.{expert}.{hf[projection]}.weight"


def tensor_specs(
    config: ModelConfig,
    kinds: Iterable[Kind] = ALL_KINDS,
    layers: Iterable[int] | None = None,
    experts: Iterable[int] | None = None,
) -> list[TensorSpec]:
    """Every tensor of the requested kinds, restricted to `layers` and (for experts) `experts`."""
    wanted = set(kinds)
    layer_ids = range(config.num_layers) if layers is None else sorted(set(layers))
    expert_ids = range(config.num_experts) if experts is None else sorted(set(experts))
    specs = [s for s in _global_specs(config) if s.kind in wanted]
    for layer in layer_ids:
        specs += [s for s in _layer_specs(config, layer, expert_ids) if s.kind in wanted]
    return specs


def _global_specs(c: ModelConfig) -> list[TensorSpec]:
    specs = [
        TensorSpec("model.embed_tokens.weight", (c.vocab_size, c.hidden_size), "embed"),
        TensorSpec("model.norm.weight", (c.hidden_size,), "final_norm"),
    ]
    if not c.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", (c.vocab_size, c.hidden_size), "lm_head"))
    return specs


def _layer_specs(c: ModelConfig, layer: int, experts: Iterable[int]) -> list[TensorSpec]:
    d, hd = c.hidden_size, c.head_dim
    q_out, kv_out = c.num_heads * hd, c.num_kv_heads * hd
    attn = f"model.layers.{layer}.self_attn"
    shapes = {"q": (q_out, d), "k": (kv_out, d), "v": (kv_out, d), "o": (d, q_out)}
    specs = [
        TensorSpec(f"{attn}.{p}_proj.weight", s, "attention", layer) for p, s in shapes.items()
    ]
    if c.attention_bias:
        specs += [
            TensorSpec(f"{attn}.{p}_proj.bias", (shapes[p][0],), "attention", layer) for p in "qkv"
        ]
    if c.qk_norm != "none":
        q_norm, k_norm = (hd, hd) if c.qk_norm == "per_head" else (q_out, kv_out)
        specs += [
            TensorSpec(f"{attn}.q_norm.weight", (q_norm,), "attention", layer),
            TensorSpec(f"{attn}.k_norm.weight", (k_norm,), "attention", layer),
        ]
    for norm in ("input_layernorm", "post_attention_layernorm"):
        specs.append(TensorSpec(f"model.layers.{layer}.{norm}.weight", (d,), "attention", layer))
    if not c.is_moe_layer(layer):
        return specs + _mlp_specs(
            f"model.layers.{layer}.mlp", c.dense_intermediate_size, d, "dense_mlp", layer
        )
    moe = moe_prefix(c, layer)
    specs.append(TensorSpec(f"{moe}.gate.weight", (c.num_experts, d), "router", layer))
    if c.shared_expert_size:
        specs += _mlp_specs(f"{moe}.shared_expert", c.shared_expert_size, d, "shared_expert", layer)
        specs.append(TensorSpec(f"{moe}.shared_expert_gate.weight", (1, d), "shared_expert", layer))
    inter = c.moe_intermediate_size
    for e in experts:
        for proj, shape in (("gate", (inter, d)), ("up", (inter, d)), ("down", (d, inter))):
            specs.append(
                TensorSpec(expert_tensor_name(c, layer, e, proj), shape, "experts", layer, e)
            )
    return specs


def _mlp_specs(prefix: str, inter: int, d: int, kind: Kind, layer: int) -> list[TensorSpec]:
    shapes = {"gate_proj": (inter, d), "up_proj": (inter, d), "down_proj": (d, inter)}
    return [TensorSpec(f"{prefix}.{p}.weight", s, kind, layer) for p, s in shapes.items()]
