"""`tokenizer.json` through `tokenizers`, and incremental detokenization for streaming."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer


class TokenizerError(ValueError):
    """A missing or unreadable tokenizer; the message names the file."""


class Tokenizer:
    def __init__(self, model_dir: str | Path) -> None:
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{path}: no tokenizer.json in model directory {model_dir}")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises its own exception type
            raise TokenizerError(f"{path}: cannot load tokenizer ({err})") from err
        self.chat_template = _chat_template(Path(model_dir))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


def _chat_template(model_dir: Path) -> str | None:
    config = model_dir / "tokenizer_config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("chat_template")


class IncrementalDetokenizer:
    """Yields text deltas as ids arrive, holding back bytes of an unfinished UTF-8 character.

    Decoding a growing window (instead of token by token) keeps BPE merges and spaces right.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-6:])  # a little context so the first token's spacing is right
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""
        delta = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta


class ChatTemplateError(ValueError):
    """No chat template, or messages it cannot render; the message says which."""


def render_chat(template: str | None, messages: list[dict[str, str]]) -> str:
    """The checkpoint's own chat template, rendered in a sandbox as HF does, with the
    assistant's turn opened."""
    if not template:
        raise ChatTemplateError("the model's tokenizer_config.json has no chat_template")
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True)
    except TemplateError as err:
        raise ChatTemplateError(f"chat template failed: {err}") from err
