"""Everything of the model except the routed experts: what an attention node holds.

Each layer is split where the routed experts sit, `pre_experts` (attention, norm, router) and
`post_experts` (expert output and shared expert), so the ping-pong pipeline can run
micro-batch j+1's attention while micro-batch j is at the expert nodes. `forward` composes the
pieces for the single-process path. Between layers the residual stream travels as a
`Residual`, h plus the last layer's output not yet added: the next layer's first norm does the
add (one kernel for both on GPU).

Shape legend: T = tokens, D = hidden, H = query heads, G = kv heads, Dh = head dim, K = top-k,
V = vocab, B = sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from afd.models import fp8, kernels
from afd.models.attention import BatchAttention, PagedAttention
from afd.models.batch import TokenBatch
from afd.models.checkpoint import TensorSource
from afd.models.config import ModelConfig
from afd.models.layers import (
    Rope,
    add_rms_norm,
    apply_rope,
    linear,
    linear_summands,
    rms_norm,
    route,
    swiglu,
)
from afd.models.moe import Dispatcher
from afd.models.weights import ATTENTION_SIDE_KINDS, tensor_specs


@dataclass(frozen=True, slots=True)
class Residual:
    """The residual stream h + delta, with the add left to whoever normalises it next; delta
    is [T, D], or summands [T, S, D] (the experts' K weighted outputs), summed by that add."""

    h_TD: torch.Tensor
    delta: torch.Tensor | None = None

    def normed(self, weight_D: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + delta, rms_norm(h + delta) · weight)."""
        if self.delta is None:
            return self.h_TD, rms_norm(self.h_TD, weight_D, eps)
        return add_rms_norm(self.h_TD, self.delta, weight_D, eps)

    def rows(self, rows: torch.Tensor) -> Residual:
        return Residual(self.h_TD[rows], None if self.delta is None else self.delta[rows])


@dataclass(frozen=True, slots=True)
class Routed:
    """What a layer's MoE step needs after attention: the residual and the routed input."""

    h_TD: torch.Tensor  # residual stream after attention
    x_TD: torch.Tensor  # normalised input to the experts
    ids_TK: torch.Tensor  # global expert ids (-1 nowhere: every token routes to k experts)
    weights_TK: torch.Tensor


class AttentionSideModel:
    def __init__(
        self, config: ModelConfig, tensors: dict[str, torch.Tensor], quantization: str = "none"
    ) -> None:
        self.config = config
        self.t = _fuse_qkv(config, tensors)
        if quantization == "fp8":
            _quantize_projections(config, self.t)
        elif quantization != "none":
            raise ValueError(
                f"quantization must be one of {fp8.QUANTIZATIONS}, got {quantization!r}"
            )
        self.rope = Rope(config.rope, config.head_dim, config.max_position_embeddings)
        self.lm_head = tensors[
            "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
        ]

    def to(self, device: str | torch.device) -> AttentionSideModel:
        return AttentionSideModel(self.config, {k: v.to(device) for k, v in self.t.items()})

    @classmethod
    def load(
        cls,
        checkpoint: TensorSource,
        config: ModelConfig,
        dtype: torch.dtype,
        quantization: str = "none",
    ) -> AttentionSideModel:
        tensors = checkpoint.load(tensor_specs(config, ATTENTION_SIDE_KINDS), dtype)
        return cls(config, tensors, quantization)

    def embed(self, batch: TokenBatch) -> torch.Tensor:
        return F.embedding(batch.token_ids, self.t["model.embed_tokens.weight"])

    def pre_experts(
        self, layer: int, residual: Residual, batch: TokenBatch, attn: BatchAttention
    ) -> Routed:
        eps = self.config.rms_norm_eps
        h_TD, normed_TD = residual.normed(self._w(layer, "input_layernorm"), eps)
        attended = self._attention(layer, normed_TD, batch, attn)  # [T, D] or [T, S, D]
        h_TD, x_TD = add_rms_norm(h_TD, attended, self._w(layer, "post_attention_layernorm"), eps)
        if not self.config.is_moe_layer(layer):
            empty = torch.empty(x_TD.shape[0], 0, dtype=torch.int64, device=x_TD.device)
            return Routed(h_TD, x_TD, empty, empty.to(x_TD.dtype))
        ids_TK, weights_TK = route(x_TD, self._moe(layer, "gate.weight"), self.config)
        return Routed(h_TD, x_TD, ids_TK, weights_TK)

    def post_experts(self, layer: int, routed: Routed, experts_TD: torch.Tensor | None) -> Residual:
        """Residual + (routed experts' sum + shared expert, or the dense MLP on dense layers)."""
        x = routed.x_TD
        if not self.config.is_moe_layer(layer):
            p = f"model.layers.{layer}.mlp"
            mlp = (self.t[f"{p}.{n}_proj.weight"] for n in ("gate", "up", "down"))
            return Residual(routed.h_TD, swiglu(x, *mlp))
        assert experts_TD is not None
        out_TD = experts_TD
        if self.config.shared_expert_size:
            shared = swiglu(
                x,
                self._moe(layer, "shared_expert.gate_proj.weight"),
                self._moe(layer, "shared_expert.up_proj.weight"),
                self._moe(layer, "shared_expert.down_proj.weight"),
            )
            out_TD = (
                out_TD
                + torch.sigmoid(F.linear(x, self._moe(layer, "shared_expert_gate.weight"))) * shared
            )
        return Residual(routed.h_TD, out_TD)

    def embed_residual(self, batch: TokenBatch) -> Residual:
        return Residual(self.embed(batch))

    def logits(self, residual: Residual, rows: torch.Tensor) -> torch.Tensor:
        """LM head over the chosen rows only (the last token of each sequence): [B, V] in fp32."""
        _, h_BD = residual.rows(rows).normed(self.t["model.norm.weight"], self.config.rms_norm_eps)
        return F.linear(h_BD, self.lm_head).float()

    def forward(
        self,
        batch: TokenBatch,
        attn: BatchAttention,
        dispatcher: Dispatcher,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits at `rows` of the batch (default: each sequence's last token)."""
        residual = self.embed_residual(batch)
        for layer in range(self.config.num_layers):
            routed = self.pre_experts(layer, residual, batch, attn)
            experts_TD = None
            if self.config.is_moe_layer(layer):
                experts_TD = dispatcher.experts(
                    layer, routed.x_TD, routed.ids_TK, routed.weights_TK
                )
            residual = self.post_experts(layer, routed, experts_TD)
        return self.logits(residual, batch.last_token_indices() if rows is None else rows)

    def _fused_attention(self, x_TD: torch.Tensor) -> bool:
        """Whether q/k norm, RoPE and the cache write run as one kernel: on the kernels'
        devices, for per-head or no q/k norm (OLMoE's norm spans all heads) and no clipping."""
        c = self.config
        return (
            kernels.usable(x_TD)
            and c.qk_norm != "full"
            and c.clip_qkv is None
            and c.head_dim & (c.head_dim - 1) == 0
        )

    def _project(self, prefix: str, x_TK: torch.Tensor, summands: bool = False) -> torch.Tensor:
        """An attention projection: weight, bias if any, fp8 scales if quantized. `summands`:
        the caller adds partial sums (the output projection's next add+norm), so the result
        may come back split over K, [T, S, N] (`linear_summands`)."""
        t = self.t
        weight, bias = t[f"{prefix}.weight"], t.get(f"{prefix}.bias")
        scale = t.get(f"{prefix}.weight_scale")
        if summands:
            return linear_summands(x_TK, weight, bias, scale)
        return linear(x_TK, weight, bias, scale)

    def _w(self, layer: int, name: str) -> torch.Tensor:
        return self.t[f"model.layers.{layer}.{name}.weight"]

    def _moe(self, layer: int, name: str) -> torch.Tensor:
        block = "block_sparse_moe" if self.config.arch == "mixtral" else "mlp"
        return self.t[f"model.layers.{layer}.{block}.{name}"]

    def _attention(
        self, layer: int, x_TD: torch.Tensor, batch: TokenBatch, attn: BatchAttention
    ) -> torch.Tensor:
        c, p = self.config, f"model.layers.{layer}.self_attn"
        qkv = self._project(f"{p}.qkv_proj", x_TD)
        if isinstance(attn, PagedAttention) and self._fused_attention(x_TD):
            norms = (
                (self.t[f"{p}.q_norm.weight"], self.t[f"{p}.k_norm.weight"])
                if c.qk_norm == "per_head"
                else None
            )
            out_THDh = attn.attend_projected(
                layer, qkv, batch.positions, norms, c.rms_norm_eps, self.rope
            )
            return self._project(f"{p}.o_proj", out_THDh.flatten(1), summands=True)
        q, k, v = qkv.split(
            [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim],
            dim=-1,
        )
        if c.qk_norm == "full":
            q, k = (
                rms_norm(q, self.t[f"{p}.q_norm.weight"], c.rms_norm_eps),
                rms_norm(k, self.t[f"{p}.k_norm.weight"], c.rms_norm_eps),
            )
        if c.clip_qkv is not None:
            q, k, v = (t.clamp(-c.clip_qkv, c.clip_qkv) for t in (q, k, v))
        T = x_TD.shape[0]
        q_THDh, k_TGDh, v_TGDh = (
            q.view(T, c.num_heads, c.head_dim),
            k.view(T, c.num_kv_heads, c.head_dim),
            v.view(T, c.num_kv_heads, c.head_dim),
        )
        if c.qk_norm == "per_head":
            q_THDh = rms_norm(q_THDh, self.t[f"{p}.q_norm.weight"], c.rms_norm_eps)
            k_TGDh = rms_norm(k_TGDh, self.t[f"{p}.k_norm.weight"], c.rms_norm_eps)
        cos, sin = self.rope.cos_sin(batch.positions, x_TD.dtype)
        q_THDh, k_TGDh = apply_rope(q_THDh, cos, sin), apply_rope(k_TGDh, cos, sin)
        out_THDh = attn.attend(layer, q_THDh, k_TGDh, v_TGDh)
        return self._project(f"{p}.o_proj", out_THDh.reshape(T, c.num_heads * c.head_dim))


def _quantize_projections(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> None:
    """The fused QKV and output projections of every layer to fp8 with their block scales
    (`<name>_scale`); weights already in fp8 (a model moved between devices) stay as they are."""
    for layer in range(config.num_layers):
        for proj in ("qkv_proj", "o_proj"):
            name = f"model.layers.{layer}.self_attn.{proj}.weight"
            if tensors[name].dtype != fp8.FP8:
                tensors[name], tensors[f"{name}_scale"] = fp8.quantize(tensors[name])


def _fuse_qkv(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The q, k and v projections of each layer as one weight (and bias): one GEMM instead of
    three. Checkpoints keep them apart; they are joined here, once, and the parts dropped."""
    for layer in range(config.num_layers):
        p = f"model.layers.{layer}.self_attn"
        for kind in ("weight", "bias"):
            parts = [f"{p}.{n}_proj.{kind}" for n in "qkv"]
            if all(n in tensors for n in parts):
                tensors[f"{p}.qkv_proj.{kind}"] = torch.cat([tensors.pop(n) for n in parts])
    return tensors
