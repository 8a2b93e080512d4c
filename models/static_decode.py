"""Batched decode with fixed shapes, for the GPU: B sequences in B cache slots, one token each.

The reference path (`AttentionSideModel.forward`) loops over sequences in Python and grows its
KV cache, which is exact but launches thousands of kernels a step. Here every tensor has a shape
fixed by (batch bucket, max_len): a slot-major KV cache [L, B, G, S, Dh], attention over all S
positions with a length mask, grouped expert GEMMs without host synchronisation. That makes a
whole step capturable as one CUDA graph per batch bucket (`capture`), replayed each step.

The math is the reference's (same weights, same layer functions); tests check the logits match.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from afd.models.layers import apply_rope, rms_norm, route
from afd.models.model import AttentionSideModel, Routed
from afd.models.moe import ExpertShard, grouped_experts


class StaticDecoder:
    def __init__(
        self,
        model: AttentionSideModel,
        shard: ExpertShard | None,
        max_batch: int,
        max_len: int,
    ) -> None:
        """`shard` None: the routed experts run elsewhere (see `pre_experts`/`post_experts`);
        `step` and `capture` then cannot be used."""
        c = model.config
        if shard is not None and shard.expert_ids != tuple(range(c.num_experts)):
            raise ValueError("StaticDecoder.step runs all experts in this process")
        self.model, self.shard, self.config = model, shard, c
        ref = model.t["model.embed_tokens.weight"]
        self.device, self.dtype = ref.device, ref.dtype
        self.max_batch, self.max_len = max_batch, max_len
        shape = (c.num_layers, max_batch, c.num_kv_heads, max_len, c.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        positions = torch.arange(max_len, device=self.device)
        self.cos_SDh, self.sin_SDh = model.rope.cos_sin(positions, self.dtype)  # once, on device
        self._graphs: dict[
            int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]
        ] = {}

    @torch.inference_mode()
    def step(self, tokens_B: torch.Tensor, positions_B: torch.Tensor) -> torch.Tensor:
        """Slot b takes token tokens_B[b] at position positions_B[b]; returns logits [B, V]."""
        B = tokens_B.shape[0]
        graph = self._graphs.get(B)
        if graph is None:
            return self._step(tokens_B, positions_B)
        g, tokens, positions, logits = graph
        tokens.copy_(tokens_B)
        positions.copy_(positions_B)
        g.replay()
        return logits

    @torch.inference_mode()
    def capture(self, batch: int, warmup: int = 2) -> None:
        """Records one step at this batch size as a CUDA graph (slots 0..batch-1)."""
        tokens = torch.zeros(batch, dtype=torch.int64, device=self.device)
        positions = torch.zeros(batch, dtype=torch.int64, device=self.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):  # lazy init (cuBLAS handles, grouped-GEMM plans) off the graph
                self._step(tokens, positions)
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            logits = self._step(tokens, positions)
        self._graphs[batch] = (g, tokens, positions, logits)

    def _step(self, tokens_B: torch.Tensor, positions_B: torch.Tensor) -> torch.Tensor:
        mb = self.micro_batch(0, tokens_B, positions_B)
        for layer in range(self.config.num_layers):
            routed = self.pre_experts(layer, mb)
            experts_BD = None
            if self.config.is_moe_layer(layer):
                if self.shard is None:
                    raise RuntimeError("StaticDecoder: MoE layer without an expert shard")
                w = self.shard.layers[layer]
                experts_BD = grouped_experts(w, routed.x_TD, routed.ids_TK, routed.weights_TK)
            self.post_experts(layer, mb, routed, experts_BD)
        return self.logits(mb)

    def micro_batch(
        self, first_slot: int, tokens_B: torch.Tensor, positions_B: torch.Tensor
    ) -> MicroBatch:
        """Slots first_slot .. first_slot+B-1 taking one token each: the state of their step."""
        B = tokens_B.shape[0]
        keep = torch.arange(self.max_len, device=self.device)[None, :] <= positions_B[:, None]
        return MicroBatch(
            slice(first_slot, first_slot + B),
            torch.arange(first_slot, first_slot + B, device=self.device),
            positions_B,
            self.cos_SDh[positions_B],
            self.sin_SDh[positions_B],
            keep[:, None, None, :],
            F.embedding(tokens_B, self.model.t["model.embed_tokens.weight"]),
        )

    def pre_experts(self, layer: int, mb: MicroBatch) -> Routed:
        """Attention and the router of one layer; the routed experts may run anywhere."""
        m, c = self.model, self.config
        x_BD = rms_norm(mb.h_BD, m._w(layer, "input_layernorm"), c.rms_norm_eps)
        mb.h_BD = mb.h_BD + self._attention(layer, x_BD, mb)
        x_BD = rms_norm(mb.h_BD, m._w(layer, "post_attention_layernorm"), c.rms_norm_eps)
        if not c.is_moe_layer(layer):
            empty = torch.empty(x_BD.shape[0], 0, dtype=torch.int64, device=self.device)
            return Routed(mb.h_BD, x_BD, empty, empty)
        ids_BK, weights_BK = route(x_BD, m._moe(layer, "gate.weight"), c)
        return Routed(mb.h_BD, x_BD, ids_BK, weights_BK)

    def post_experts(
        self, layer: int, mb: MicroBatch, routed: Routed, experts_BD: torch.Tensor | None
    ) -> None:
        mb.h_BD = self.model.post_experts(layer, routed, experts_BD)

    def logits(self, mb: MicroBatch) -> torch.Tensor:
        return self.model.logits(mb.h_BD, torch.arange(mb.h_BD.shape[0], device=self.device))

    def _attention(self, layer: int, x_BD: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
        m, c, p = self.model, self.config, f"model.layers.{layer}.self_attn"
        B = x_BD.shape[0]
        q, k, v = (
            F.linear(x_BD, m.t[f"{p}.{n}_proj.weight"], m.t.get(f"{p}.{n}_proj.bias"))
            for n in "qkv"
        )
        if c.qk_norm == "full":
            q = rms_norm(q, m.t[f"{p}.q_norm.weight"], c.rms_norm_eps)
            k = rms_norm(k, m.t[f"{p}.k_norm.weight"], c.rms_norm_eps)
        if c.clip_qkv is not None:
            q, k, v = (t.clamp(-c.clip_qkv, c.clip_qkv) for t in (q, k, v))
        q_BHDh = q.view(B, c.num_heads, c.head_dim)
        k_BGDh = k.view(B, c.num_kv_heads, c.head_dim)
        v_BGDh = v.view(B, c.num_kv_heads, c.head_dim)
        if c.qk_norm == "per_head":
            q_BHDh = rms_norm(q_BHDh, m.t[f"{p}.q_norm.weight"], c.rms_norm_eps)
            k_BGDh = rms_norm(k_BGDh, m.t[f"{p}.k_norm.weight"], c.rms_norm_eps)
        q_BHDh, k_BGDh = apply_rope(q_BHDh, mb.cos, mb.sin), apply_rope(k_BGDh, mb.cos, mb.sin)
        self.k_cache[layer, mb.slots_B, :, mb.positions_B] = k_BGDh
        self.v_cache[layer, mb.slots_B, :, mb.positions_B] = v_BGDh
        k_BGSDh, v_BGSDh = self.k_cache[layer, mb.slots], self.v_cache[layer, mb.slots]
        out_BH1Dh = F.scaled_dot_product_attention(
            q_BHDh[:, :, None, :], k_BGSDh, v_BGSDh, attn_mask=mb.keep_B11S, enable_gqa=True
        )
        return F.linear(out_BH1Dh.reshape(B, c.num_heads * c.head_dim), m.t[f"{p}.o_proj.weight"])


@dataclass
class MicroBatch:
    """A run of cache slots decoding together, and their hidden state between layer halves."""

    slots: slice
    slots_B: torch.Tensor
    positions_B: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    keep_B11S: torch.Tensor
    h_BD: torch.Tensor
