#!/usr/bin/env bash
# The served path on one GPU, in one run: the engine in-process (bench/decode.py, graph rows)
# and then `afd serve` (colocated, Ray) under bench/serve.py at concurrency 1, 16, 64 and 128
# over gRPC, and 1 and 64 over OpenAI HTTP,
# on the same model shape with dummy weights.
# Usage: bench/gpu_serve.sh OUT_DIR [LAYERS [QUANT [DECODE_ARGS...]]]
# (QUANT: none or fp8, the deployment's model.quantization; DECODE_ARGS go to bench/decode.py).
set -euo pipefail
out=${1:?output folder}; layers=${2:-48}; quant=${3:-none}; shift $(( $# < 3 ? $# : 3 ))
mkdir -p "$out"
model=$(mktemp -d)/qwen3-30b-a3b
python3 -c "from afd.models.presets import write_preset; write_preset('qwen3-30b-a3b', '$model', $layers, 4096)"
fp8=$([ "$quant" = fp8 ] && echo --fp8 || true)
python3 bench/decode.py --layers "$layers" --batches 1,16,64,128 --skip-hf --skip-eager $fp8 \
    --json-out "$out/in-process.json" "$@" | tail -12
cat > "$out/deployment.yaml" <<EOF
model: {path: $model, dtype: bfloat16, load_format: dummy, quantization: $quant}
attention: {nodes: 1, num_gpus: 1, kv_blocks: 2048, block_size: 16, max_batch_tokens: 4096, max_running: 128}
experts: {nodes: 0}
serve: {grpc_port: 50051, http_port: 8000, max_requests: 512}
EOF
python3 -m afd.orchestrator.cli serve "$out/deployment.yaml" > "$out/serve.log" 2>&1 &
server=$!
for _ in $(seq 600); do grep -q "serving" "$out/serve.log" && break; sleep 1; done
grep -q "serving" "$out/serve.log" || { tail -30 "$out/serve.log"; kill $server; exit 1; }
python3 bench/serve.py --target 127.0.0.1:50051 --concurrency 1 --requests 2 \
    --output-tokens 8 8 --baseline-requests 0 --json > /dev/null  # one warm-up
for c in 1 16 64 128; do
    n=$((c == 1 ? 8 : 2 * c))
    for api in grpc http; do
        [ "$api" = http ] && [ $c != 1 ] && [ $c != 64 ] && continue
        where=$([ "$api" = grpc ] && echo "--target 127.0.0.1:50051" || echo "--http http://127.0.0.1:8000")
        python3 bench/serve.py $where --concurrency $c --requests $n --output-tokens 64 64 \
            --baseline-requests 0 --json > "$out/serve-$api-c$c.json"
        python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['rows'][0]; print(sys.argv[2], r['run'], 'ttft', round(r['ttft_ms_p50'],1), 'tpot', round(r['tpot_ms_p50'],2), 'itl p99', round(r['itl_ms_p99'],1), 'tok/s', round(r['output_tokens_per_s']), 'errors', r['errors'], r['wrong_token_count'])" "$out/serve-$api-c$c.json" $api
    done
done
kill -TERM $server; wait $server || true
tail -3 "$out/serve.log"
