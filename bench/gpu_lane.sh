#!/usr/bin/env bash
# The slot lanes (device, proxy) on one GPU under CUDA MPS (started here, stopped at the end).
# Part "tests": the lanes' GPU tests, the GPU engine's and the Ray cluster's (needs Ray), and the
# transport bench's lane rows. Part "decode": the decode bench's colocated rows beside 1 attention
# node + 1 expert process over each lane of LANES (m = 1, 2). Each part fits one device call.
# Usage: bench/gpu_lane.sh OUT_DIR tests|decode [BATCHES [LANES [DECODE_ARGS...]]]
set -uo pipefail
out=${1:?output folder}; part=${2:?tests or decode}; batches=${3:-1,8,64}; lanes=${4:-device,proxy}
shift $(( $# < 4 ? $# : 4 ))
mkdir -p "$out"
export CUDA_MPS_PIPE_DIRECTORY=${CUDA_MPS_PIPE_DIRECTORY:-/tmp/mps}
export CUDA_MPS_LOG_DIRECTORY=${CUDA_MPS_LOG_DIRECTORY:-/tmp/mps-log}
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
nvidia-cuda-mps-control -d
trap 'echo quit | nvidia-cuda-mps-control' EXIT
ls "$CUDA_MPS_PIPE_DIRECTORY" > "$out/mps-pipes.txt"
if [ "$part" = tests ]; then
    timeout 420 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_device_lane.py \
        tests/gpu/test_gpu_engine.py tests/gpu/test_gpu_step_trace.py tests/gpu/test_gpu_cluster.py \
        > "$out/tests.txt" 2>&1; tail -25 "$out/tests.txt"
    timeout 150 python3 bench/transport.py --device cuda --only lane --iters 1000 --json \
        > "$out/transport.json" 2> "$out/transport.err"; tail -5 "$out/transport.err"
    python3 -c "import json,sys; [print(r) for r in json.load(open(sys.argv[1]))['rows']]" "$out/transport.json"
else
    timeout 560 python3 bench/decode.py --layers 48 --batches "$batches" --skip-hf --skip-eager \
        --disaggregated 1,2 --lanes "$lanes" --json-out "$out/decode.json" "$@" 2>&1 | tail -16
fi
