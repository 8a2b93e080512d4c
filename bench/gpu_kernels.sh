#!/usr/bin/env bash
# The kernels on one GPU, in one run: their tests and the GPU engine's (compiled, against the
# torch math and the CPU reference), the tile tuning (into models/kernels/tuned.json, copied to
# OUT, for the rows after it), then the decode bench, and its rows again with PDL off.
# Usage: bench/gpu_kernels.sh OUT_DIR [BATCHES [DECODE_ARGS...]]
set -uo pipefail
out=${1:?output folder}; batches=${2:-1,64,128}; shift; shift || true
mkdir -p "$out"
python3 -m pytest -q -p no:cacheprovider tests/models/test_kernels.py tests/models/test_fp8.py \
    tests/gpu/test_gpu_kernels.py tests/gpu/test_gpu_engine.py tests/gpu/test_gpu_sampling.py \
    > "$out/tests.txt" 2>&1; tail -4 "$out/tests.txt"
python3 bench/tune_kernels.py --json "$out/tune.json" 2>&1 | grep -v OutOfResources | tail -20
cp models/kernels/tuned.json "$out/tuned.json"
python3 bench/decode.py --layers 48 --batches "$batches" --json-out "$out/decode.json" "$@" \
    2>&1 | tail -20
# the baseline without programmatic dependent launch, the same kernels otherwise
AFD_PDL=0 python3 bench/decode.py --layers 48 --batches "$batches" --skip-hf --skip-eager \
    --json-out "$out/decode-pdl-off.json" "$@" 2>&1 | grep afd-graph
