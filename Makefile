# `make run` and `make test` work on a fresh machine with only Python 3.11+ and pip.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test lint clean protos

install: $(STAMP)

# Reinstall only when the package definition changes; the source is installed editable.
# torch is pinned first so pip takes the local CPU build instead of a CUDA one from the registry.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0" || $(BIN)/python -m pip install -q torch
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

run: install
	$(BIN)/afd demo

# mypy reads the packages under their installed names (afd.models, ...) through a tree of
# links, since the folders live at the repository's root.
TYPECHECK := build/typecheck

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	mkdir -p $(TYPECHECK)/afd
	for p in models transport attention_nodes expert_nodes orchestrator protos; do ln -sfn ../../../$$p $(TYPECHECK)/afd/$$p; done
	MYPYPATH=$(TYPECHECK) $(BIN)/mypy -p afd

test: lint
	$(BIN)/pytest  # not `python -m pytest`, which would put the root folders on sys.path

# The generated code is checked in (tests/test_protos.py keeps it current); regenerate after
# editing protos/afd_v1.proto.
# The proto is compiled from a tree where it sits at afd/protos/, so the generated imports name
# the installed package (`afd.protos`).
protos: install
	rm -rf build/protos && mkdir -p build/protos/afd/protos
	cp protos/afd_v1.proto build/protos/afd/protos/
	cd build/protos && ../../$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. afd/protos/afd_v1.proto
	cp build/protos/afd/protos/afd_v1_pb2*.py* protos/

clean:
	rm -rf $(VENV) .afd build *.egg-info
