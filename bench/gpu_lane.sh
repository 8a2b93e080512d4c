#!/usr/bin/env bash
# The device lane on one GPU, in one run, under CUDA MPS (started here, stopped at the end): its
# GPU tests, the GPU engine's and the Ray cluster's (needs Ray), the transport bench's lane rows, then the decode bench's
# colocated rows beside 1 attention node + 1 expert process over the device lane.
# Usage: bench/gpu_lane.sh OUT_DIR [BATCHES [DECODE_ARGS...]]
set -uo pipefail
out=${1:?output folder}; batches=${2:-1,8,64}; shift; shift || true
mkdir -p "$out"
export CUDA_MPS_PIPE_DIRECTORY=${CUDA_MPS_PIPE_DIRECTORY:-/tmp/mps}
export CUDA_MPS_LOG_DIRECTORY=${CUDA_MPS_LOG_DIRECTORY:-/tmp/mps-log}
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
nvidia-cuda-mps-control -d
trap 'echo quit | nvidia-cuda-mps-control' EXIT
ls "$CUDA_MPS_PIPE_DIRECTORY" > "$out/mps-pipes.txt"
timeout 400 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_device_lane.py \
    tests/gpu/test_gpu_engine.py tests/gpu/test_gpu_step_trace.py tests/gpu/test_gpu_cluster.py \
    > "$out/tests.txt" 2>&1; tail -25 "$out/tests.txt"
timeout 150 python3 bench/transport.py --device cuda --only lane --iters 2000 \
    > "$out/transport.txt" 2>&1; tail -10 "$out/transport.txt"
timeout 400 python3 bench/decode.py --layers 48 --batches "$batches" --skip-hf --skip-eager \
    --disaggregated 1,2 --lanes device --json-out "$out/decode.json" "$@" 2>&1 | tail -14
