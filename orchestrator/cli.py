"""The `afd` command line: make-tiny-model, generate, demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from models.checkpoint import CheckpointError
from models.config import SUPPORTED_ARCHS, ConfigError
from models.generation import DTYPES, GenerationResult, PromptError, ReferenceEngine
from models.sampling import SamplingError, SamplingParams
from models.tiny import make_tiny_model
from models.tokenizer import TokenizerError

DEMO_MODEL_DIR = Path(".afd/tiny-qwen3_moe")
USER_ERRORS = (ConfigError, CheckpointError, PromptError, SamplingError, TokenizerError, ValueError)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.handler(args)
    except USER_ERRORS as err:
        print(f"afd: error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="afd", description="Disaggregated MoE inference.")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    tiny = sub.add_parser("make-tiny-model", help="write a random-weight HF checkpoint")
    tiny.add_argument("dir")
    tiny.add_argument("--arch", choices=SUPPORTED_ARCHS, default="qwen3_moe")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--experts", type=int, default=8)
    tiny.add_argument("--top-k", type=int, default=2)
    tiny.add_argument("--hidden", type=int, default=64)
    tiny.set_defaults(handler=_make_tiny_model)

    gen = sub.add_parser("generate", help="generate from a prompt")
    gen.add_argument("--model", required=True, help="HF model directory")
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt")
    prompt.add_argument("--prompt-ids", help='comma-separated token ids, e.g. "1,2,3"')
    _add_sampling_args(gen)
    gen.add_argument("--dtype", choices=list(DTYPES), default="float32")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.set_defaults(handler=_generate)

    demo = sub.add_parser("demo", help="make a tiny model when missing and generate from it")
    demo.set_defaults(handler=_demo)
    return parser


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stop-token-ids", default="", help="comma-separated token ids")


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
        stop_token_ids=tuple(_ids(args.stop_token_ids, "--stop-token-ids")),
    )


def _ids(text: str, flag: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as err:
        raise PromptError(f"{flag} must be comma-separated integers, got {text!r}") from err


def _make_tiny_model(args: argparse.Namespace) -> int:
    out = make_tiny_model(
        args.dir, args.arch, args.seed, args.layers, args.experts, args.top_k, args.hidden
    )
    print(f"wrote a tiny {args.arch} model to {out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    params = _sampling(args)
    engine = ReferenceEngine(args.model, args.dtype)
    prompt_ids = (
        _ids(args.prompt_ids, "--prompt-ids")
        if args.prompt_ids is not None
        else engine.tokenizer.encode(args.prompt)
    )
    result = GenerationResult()
    for event in engine.stream(prompt_ids, params):
        result.add(event)
        if not args.json:
            print(event.text_delta, end="", flush=True)
    print(json.dumps(result.as_json()) if args.json else "")
    return 0


def _demo(args: argparse.Namespace) -> int:
    if not (DEMO_MODEL_DIR / "config.json").is_file():
        make_tiny_model(DEMO_MODEL_DIR)
        print(f"made a tiny qwen3_moe model in {DEMO_MODEL_DIR}")
    engine = ReferenceEngine(DEMO_MODEL_DIR)
    for prompt in ("Hello, world!", "The capital of France is"):
        result = engine.generate(engine.tokenizer.encode(prompt), SamplingParams(max_tokens=24))
        print(
            f"{prompt!r} -> {result.text!r} ({len(result.token_ids)} tokens, {result.finish_reason})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
