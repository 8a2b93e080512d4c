from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from afd.models.reference import ReferenceEngine
from afd.models.sampling import SamplingParams


def _afd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "afd.orchestrator.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_make_tiny_model_then_generate_json_matches_the_reference(tmp_path: Path) -> None:
    model_dir = tmp_path / "olmoe"
    made = _afd(
        "make-tiny-model", str(model_dir), "--arch", "olmoe", "--layers", "3", "--experts", "4"
    )
    assert made.returncode == 0, made.stderr
    out = _afd(
        "generate",
        "--model",
        str(model_dir),
        "--prompt-ids",
        "5,6,7,8",
        "--max-tokens",
        "6",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    want = ReferenceEngine(model_dir).generate([5, 6, 7, 8], SamplingParams(max_tokens=6))
    assert got == want.as_json()
    assert set(got) == {"token_ids", "logprobs", "text", "finish_reason"}


def test_sampled_generation_is_reproducible_with_a_seed(tiny_model: Path) -> None:
    args = (
        "generate",
        "--model",
        str(tiny_model),
        "--prompt",
        "Hello",
        "--max-tokens",
        "8",
        "--temperature",
        "0.9",
        "--top-p",
        "0.9",
        "--top-k",
        "50",
        "--seed",
        "3",
        "--json",
    )
    first, second = _afd(*args), _afd(*args)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == json.loads(second.stdout)


def test_generate_quantized_to_fp8_prints_the_quantized_reference(tiny_model: Path) -> None:
    out = _afd(
        "generate", "--model", str(tiny_model), "--prompt-ids", "5,6,7", "--max-tokens", "5",
        "--quantization", "fp8", "--json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    want = ReferenceEngine(tiny_model, quantization="fp8").generate(
        [5, 6, 7], SamplingParams(max_tokens=5)
    )
    assert json.loads(out.stdout) == want.as_json()


def test_bad_input_exits_with_a_message_not_a_traceback(tiny_model: Path, tmp_path: Path) -> None:
    cases = [
        (("--prompt", ""), "prompt is empty"),
        (("--prompt", "hi", "--temperature", "-1"), "temperature: is -1.0; must be in [0, 100]"),
        (("--prompt-ids", "1,x"), "--prompt-ids must be comma-separated integers"),
    ]
    for extra, message in cases:
        out = _afd("generate", "--model", str(tiny_model), *extra)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, (
            out.stderr
        )
    out = _afd("generate", "--model", str(tmp_path), "--prompt", "hi")
    assert out.returncode == 2 and "no config.json" in out.stderr


def test_generate_on_a_cluster_prints_the_reference_json(tiny_model: Path) -> None:
    args = (
        "generate",
        "--model",
        str(tiny_model),
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "6",
        "--json",
    )
    reference = _afd(*args)
    cluster = _afd(*args, "--attention-nodes", "2", "--expert-nodes", "2", "--micro-batches", "2")
    assert cluster.returncode == 0, cluster.stderr
    got, want = json.loads(cluster.stdout), json.loads(reference.stdout)
    assert got["token_ids"] == want["token_ids"] and got["text"] == want["text"]
    assert got["logprobs"] == pytest.approx(want["logprobs"], abs=1e-5)


def test_generate_with_a_config_file_and_a_bad_one(tiny_model: Path, tmp_path: Path) -> None:
    config = tmp_path / "d.yaml"
    config.write_text(
        f"model: {{path: {tiny_model}}}\nattention: {{nodes: 1}}\nexperts: {{nodes: 9}}\n"
    )
    out = _afd("generate", "--config", str(config), "--prompt", "hi")
    assert out.returncode == 2 and "expert nodes must be between 1 and 8" in out.stderr, out.stderr


def test_serve_streams_to_the_client_and_sigterm_drains(tiny_model: Path) -> None:
    """`afd serve` in its own process: `afd client` streams from it, and SIGTERM lets the running
    request finish before the process exits 0."""
    import re
    import signal
    import threading

    from afd.orchestrator.client import channel, generate, request

    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "afd.orchestrator.cli",
            "serve",
            "configs/tiny-cpu.yaml",
            "--model",
            str(tiny_model),
            "--attention-nodes",
            "1",
            "--expert-nodes",
            "1",
            "--grpc-port",
            "0",
            "--http-port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log: list[str] = []
    ready = threading.Event()
    target: list[str] = []

    def read() -> None:
        for line in server.stdout:
            log.append(line)
            if m := re.search(r"gRPC on (\S+),", line):
                target.append(m.group(1))
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(120), "".join(log)
        client = _afd("client", "--target", target[0], "--prompt", "Hello", "--max-tokens", "5")
        assert client.returncode == 0, client.stderr
        assert "[length: " in client.stdout and "5 generated tokens]" in client.stdout
        with channel(target[0]) as ch:
            call = generate(ch, request(text="Once upon a time", max_tokens=40, ignore_eos=True))
            first = next(call)
            server.send_signal(signal.SIGTERM)
            rest = list(call)
        assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 40
        assert rest[-1].finish_reason == "length"
        assert server.wait(60) == 0, "".join(log)
    finally:
        server.kill()
    assert any("draining" in line for line in log)
