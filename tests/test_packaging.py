"""afd installs under one namespace: `afd.models` and friends, never a top-level `models`."""

from __future__ import annotations

import subprocess
import sys


def test_packages_import_only_under_the_afd_namespace(tmp_path) -> None:
    code = (
        "import importlib.util, afd.models, afd.transport, afd.attention_nodes, "
        "afd.expert_nodes, afd.orchestrator, afd.protos\n"
        "names = ['models', 'transport', 'attention_nodes', 'expert_nodes', 'orchestrator', 'protos']\n"
        "print([n for n in names if importlib.util.find_spec(n) is not None])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_the_tiny_model_corpus_ships_inside_the_package(tmp_path) -> None:
    code = "from afd.models.tiny import make_tiny_model; make_tiny_model('m', layers=1)"
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True)
    assert (tmp_path / "m" / "tokenizer.json").is_file()
