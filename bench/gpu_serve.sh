#!/usr/bin/env bash
# The served path on one GPU, in one run: the engine in-process (bench/decode.py, graph rows)
# and then `afd serve` (colocated, Ray, gRPC) under bench/serve.py at concurrency 1 and 64,
# on the same model shape with dummy weights. Usage: bench/gpu_serve.sh OUT_DIR [LAYERS]
set -euo pipefail
out=${1:?output folder}; layers=${2:-48}
mkdir -p "$out"
model=$(mktemp -d)/qwen3-30b-a3b
python3 -c "from afd.models.presets import write_preset; write_preset('qwen3-30b-a3b', '$model', $layers, 4096)"
python3 bench/decode.py --layers "$layers" --batches 1,64 --skip-hf --skip-eager \
    --json-out "$out/in-process.json" | tail -4
cat > "$out/deployment.yaml" <<EOF
model: {path: $model, dtype: bfloat16, load_format: dummy}
attention: {nodes: 1, num_gpus: 1, kv_blocks: 2048, block_size: 16, max_batch_tokens: 4096, max_running: 128}
experts: {nodes: 0}
serve: {grpc_port: 50051, http_port: 8000, max_requests: 512}
EOF
python3 -m afd.orchestrator.cli serve "$out/deployment.yaml" > "$out/serve.log" 2>&1 &
server=$!
for _ in $(seq 600); do grep -q "serving" "$out/serve.log" && break; sleep 1; done
grep -q "serving" "$out/serve.log" || { tail -30 "$out/serve.log"; kill $server; exit 1; }
for c in 1 64; do  # the first pass captures the graphs its shapes need; the second is measured
    n=$((c == 1 ? 8 : 128))
    python3 bench/serve.py --target 127.0.0.1:50051 --concurrency $c --requests $n \
        --output-tokens 64 64 --baseline-requests 0 --json > /dev/null
    python3 bench/serve.py --target 127.0.0.1:50051 --concurrency $c --requests $n \
        --output-tokens 64 64 --baseline-requests 0 --json > "$out/serve-c$c.json"
    tail -c 600 "$out/serve-c$c.json"; echo
done
kill -TERM $server; wait $server || true
tail -3 "$out/serve.log"
