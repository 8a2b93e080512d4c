from __future__ import annotations

from pathlib import Path

import pytest
from afd.models.reference import ReferenceEngine
from afd.models.request_state import PromptError
from afd.models.sampling import SamplingParams
from afd.models.tokenizer import IncrementalDetokenizer, Tokenizer


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> ReferenceEngine:
    return ReferenceEngine(tiny_model)


def test_empty_prompt_and_unknown_token_ids_are_rejected(engine: ReferenceEngine) -> None:
    with pytest.raises(PromptError, match="prompt is empty"):
        engine.generate([], SamplingParams())
    with pytest.raises(PromptError, match=r"token id 99999 is outside the vocabulary \[0, "):
        engine.generate([1, 99999], SamplingParams())


def test_prompt_longer_than_context_is_rejected(engine: ReferenceEngine) -> None:
    with pytest.raises(PromptError, match="model's context is 512"):
        engine.generate([5] * 512, SamplingParams())


def test_max_tokens_ends_with_length(engine: ReferenceEngine) -> None:
    result = engine.generate(
        engine.tokenizer.encode("Hello"), SamplingParams(max_tokens=5, ignore_eos=True)
    )
    assert (len(result.token_ids), result.finish_reason) == (5, "length")


def test_stop_token_id_ends_generation_on_that_token(engine: ReferenceEngine) -> None:
    prompt = engine.tokenizer.encode("Hello")
    free = engine.generate(prompt, SamplingParams(max_tokens=10, ignore_eos=True)).token_ids
    stopped = engine.generate(
        prompt, SamplingParams(max_tokens=10, ignore_eos=True, stop_token_ids=(free[3],))
    )
    cut = free.index(free[3]) + 1
    assert (stopped.token_ids, stopped.finish_reason) == (free[:cut], "stop")


def test_stop_string_truncates_the_text_before_it(engine: ReferenceEngine) -> None:
    prompt = engine.tokenizer.encode("Once upon a time")
    free = engine.generate(prompt, SamplingParams(max_tokens=16, ignore_eos=True))
    stop = free.text[5:7]
    assert stop.strip(), f"generated text too short to pick a stop string: {free.text!r}"
    result = engine.generate(prompt, SamplingParams(max_tokens=16, ignore_eos=True, stop=(stop,)))
    assert result.finish_reason == "stop"
    assert result.text == free.text[: free.text.find(stop)]


def test_incremental_detokenizer_streams_exactly_the_full_decode(tiny_model: Path) -> None:
    tokenizer = Tokenizer(tiny_model)
    text = "Unicode text: café, 東京 and 🙂 emoji; numbers 2048."
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, [])
    assert "".join(detok.push(i) for i in ids) == tokenizer.decode(ids) == text
