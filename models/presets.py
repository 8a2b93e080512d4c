"""Model shapes by name, for benches and dummy-weight deployments: a `config.json` (HF format)
and a small tokenizer trained offline, so `model.load_format: dummy` runs the real shape with
no checkpoint and no download. Token ids past the tokenizer's vocabulary decode to nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from afd.models.tiny import train_tokenizer

QWEN3_30B_A3B: dict[str, Any] = {
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
    "max_position_embeddings": 40960,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
QWEN3_235B_A22B: dict[str, Any] = {
    **QWEN3_30B_A3B,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "moe_intermediate_size": 1536,
    "num_hidden_layers": 94,
    "num_attention_heads": 64,
}
PRESETS = {"qwen3-30b-a3b": QWEN3_30B_A3B, "qwen3-235b-a22b": QWEN3_235B_A22B}


def write_preset(
    name: str, out_dir: str | Path, layers: int | None = None, max_positions: int | None = None
) -> Path:
    """Writes the preset's config.json (optionally cut to `layers`, its context to
    `max_positions`) and a tokenizer into `out_dir`; returns it."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    config = dict(PRESETS[name])
    if layers is not None:
        config["num_hidden_layers"] = layers
    if max_positions is not None:
        config["max_position_embeddings"] = max_positions
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    train_tokenizer(vocab_size=384).save(str(out / "tokenizer.json"))
    return out
