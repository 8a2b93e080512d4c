"""The checked-in gRPC code is what protos/afd_v1.proto generates today (as `afd.protos`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ["afd_v1_pb2.py", "afd_v1_pb2_grpc.py", "afd_v1_pb2.pyi"]


def test_generated_code_is_current(tmp_path: Path) -> None:
    out = tmp_path / "afd" / "protos"
    out.mkdir(parents=True)
    shutil.copy(ROOT / "protos" / "afd_v1.proto", out)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I.",
            "--python_out=.",
            "--grpc_python_out=.",
            "--pyi_out=.",
            "afd/protos/afd_v1.proto",
        ],
        cwd=tmp_path,
        check=True,
    )
    for name in GENERATED:
        fresh = (out / name).read_text()
        assert fresh == (ROOT / "protos" / name).read_text(), f"run `make protos`: {name} is stale"
