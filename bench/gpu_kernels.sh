#!/usr/bin/env bash
# The kernels on one GPU, in one run: their tests and the GPU engine's (compiled, against the
# torch math and the CPU reference), the MoE tile tuning (its table goes to OUT and, for the
# rows after it, into models/kernels/moe_configs.json), then the decode bench.
# Usage: bench/gpu_kernels.sh OUT_DIR [BATCHES [DECODE_ARGS...]]
set -uo pipefail
out=${1:?output folder}; batches=${2:-1,64,128}; shift; shift || true
mkdir -p "$out"
python3 -m pytest -q -p no:cacheprovider tests/models/test_kernels.py tests/gpu/test_gpu_engine.py \
    > "$out/tests.txt" 2>&1; tail -4 "$out/tests.txt"
python3 bench/tune_moe.py --json "$out/tune.json" --out "$out/moe_configs.json" 2>&1 | tail -9
cp "$out/moe_configs.json" models/kernels/moe_configs.json
python3 bench/decode.py --layers 48 --batches "$batches" --json-out "$out/decode.json" "$@" \
    2>&1 | tail -20
