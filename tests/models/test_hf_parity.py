"""The reference forward equals HF transformers on tiny random models of every architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from afd.models.attention import ContiguousAttention, ContiguousKVCache
from afd.models.batch import TokenBatch
from afd.models.reference import ReferenceEngine
from afd.models.sampling import SamplingParams
from afd.models.tiny import make_tiny_model

ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")

PROMPT = "The quick brown fox jumps over the lazy dog."
DECODE_STEPS = 32


def _hf(model_dir: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def _max_logit_error(
    engine: ReferenceEngine, hf: transformers.PreTrainedModel, prompt: list[int], steps: list[int]
) -> float:
    """Prefill then one decode step per token, compared with HF's logits over the full text."""
    with torch.no_grad():
        hf_logits = hf(torch.tensor([prompt + steps])).logits[0]
    cache = ContiguousKVCache()
    worst = 0.0
    with torch.inference_mode():
        batch = TokenBatch.build([(0, prompt, 0)])
        for i in range(len(steps) + 1):
            logits = engine.model.forward(
                batch, ContiguousAttention(cache, batch), engine.dispatcher
            )[0]
            worst = max(worst, (logits - hf_logits[len(prompt) + i - 1]).abs().max().item())
            if i < len(steps):
                batch = TokenBatch.build([(0, [steps[i]], len(prompt) + i)])
    return worst


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_and_decode_logits_and_greedy_ids_match_hf(
    arch: str, tiny_models: dict[str, Path]
) -> None:
    engine, hf = ReferenceEngine(tiny_models[arch]), _hf(tiny_models[arch])
    prompt = engine.tokenizer.encode(PROMPT)
    with torch.no_grad():
        hf_out = hf.generate(torch.tensor([prompt]), max_new_tokens=DECODE_STEPS, do_sample=False)
    hf_ids = hf_out[0, len(prompt) :].tolist()
    ours = engine.generate(prompt, SamplingParams(max_tokens=DECODE_STEPS))
    assert ours.token_ids == hf_ids[: len(ours.token_ids)]
    assert len(ours.token_ids) == DECODE_STEPS or ours.finish_reason == "stop"

    forced = engine.generate(
        prompt, SamplingParams(max_tokens=DECODE_STEPS, ignore_eos=True)
    ).token_ids
    assert len(forced) == DECODE_STEPS
    assert _max_logit_error(engine, hf, prompt, forced) < 1e-4


@pytest.mark.parametrize(
    "rope_scaling",
    [
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    ],
)
def test_scaled_rope_matches_hf(rope_scaling: dict, tmp_path: Path) -> None:
    model_dir = make_tiny_model(
        tmp_path / "m", "qwen3_moe", seed=3, overrides={"rope_scaling": rope_scaling}
    )
    engine, hf = ReferenceEngine(model_dir), _hf(model_dir)
    assert engine.config.rope.rope_type == rope_scaling["rope_type"]
    prompt = engine.tokenizer.encode(PROMPT * 3)
    steps = engine.generate(prompt, SamplingParams(max_tokens=8, ignore_eos=True)).token_ids
    assert _max_logit_error(engine, hf, prompt, steps) < 1e-4


def test_sharded_checkpoint_gives_the_same_tokens_as_single_file(tmp_path: Path) -> None:
    single = make_tiny_model(tmp_path / "single", "mixtral", seed=5)
    sharded = make_tiny_model(tmp_path / "sharded", "mixtral", seed=5, max_shard_bytes=64 * 1024)
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    a, b = ReferenceEngine(single), ReferenceEngine(sharded)
    prompt = a.tokenizer.encode(PROMPT)
    assert a.generate(prompt, params).logprobs == b.generate(prompt, params).logprobs
