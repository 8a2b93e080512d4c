"""Writes tiny random-weight checkpoints in HF format, offline, for tests and demos.

The tokenizer is trained here with `tokenizers` on a corpus shipped with the package, so
nothing is ever downloaded, and the config follows each family's HF field names so
`transformers.AutoModelForCausalLM.from_pretrained` loads the result.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from afd.models.config import SUPPORTED_ARCHS, parse_config
from afd.models.weights import tensor_specs
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = (
        resources.files(__package__ or "afd.models")
        .joinpath("data/corpus.txt")
        .read_text(encoding="utf-8")
    )
    tok.train_from_iterator(corpus.splitlines(), trainer=trainer)
    return tok


def tiny_config(
    arch: str, vocab_size: int, layers: int, experts: int, top_k: int, hidden: int
) -> dict[str, Any]:
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"--arch must be one of {', '.join(SUPPORTED_ARCHS)}, got {arch!r}")
    heads = 4
    common: dict[str, Any] = {
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "head_dim": hidden // heads,
        "num_experts_per_tok": top_k,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
        "torch_dtype": "float32",
        "output_router_logits": False,
    }
    width = hidden // 2
    per_arch: dict[str, dict[str, Any]] = {
        "qwen3_moe": {
            "num_experts": experts,
            "moe_intermediate_size": width,
            "intermediate_size": 2 * hidden,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "attention_bias": False,
        },
        "qwen2_moe": {
            "num_experts": experts,
            "moe_intermediate_size": width,
            "intermediate_size": 2 * hidden,
            "shared_expert_intermediate_size": 3 * width // 2,
            "norm_topk_prob": False,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [0] if layers > 1 else [],
            "qkv_bias": True,
        },
        "mixtral": {
            "num_local_experts": experts,
            "intermediate_size": width,
            "sliding_window": None,
        },
        "olmoe": {
            "num_experts": experts,
            "intermediate_size": width,
            "norm_topk_prob": False,
            "clip_qkv": None,
        },
    }
    return {**common, **per_arch[arch], "architectures": [_HF_CLASS[arch]]}


_HF_CLASS = {
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}


def make_tiny_model(
    out_dir: str | Path,
    arch: str = "qwen3_moe",
    seed: int = 0,
    layers: int = 2,
    experts: int = 8,
    top_k: int = 2,
    hidden: int = 64,
    max_shard_bytes: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Writes config.json, safetensors (sharded above `max_shard_bytes`) and the tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(vocab_size=384)
    raw = {
        **tiny_config(arch, tokenizer.get_vocab_size(), layers, experts, top_k, hidden),
        **(overrides or {}),
    }
    config = parse_config(raw, str(out / "config.json"))
    generator = torch.Generator().manual_seed(seed)
    tensors = {s.name: _random(s.name, s.shape, generator) for s in tensor_specs(config)}
    _save(out, tensors, max_shard_bytes)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "eos_token": SPECIAL_TOKENS[0],
                "bos_token": None,
                "pad_token": SPECIAL_TOKENS[0],
                "chat_template": CHAT_TEMPLATE,
                "tokenizer_class": "PreTrainedTokenizerFast",
            },
            indent=2,
        )
    )
    return out


def _random(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    std = 0.5 if name.endswith("gate.weight") else 0.08  # spread router logits so routing varies
    return std * torch.randn(shape, generator=generator)


def _save(out: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int | None) -> None:
    if max_shard_bytes is None:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
