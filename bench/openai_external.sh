#!/usr/bin/env bash
# Benchmarks Tandem's OpenAI-compatible HTTP API with an outside client (GuideLLM), on this machine.
#
#   bash bench/openai_external.sh [NUM_REQUESTS] [CONCURRENCY] [PROMPT_TOKENS] [OUTPUT_TOKENS]
#
# Starts `tandem serve` (embedded SmolLM2, one prefill and one decode worker, free ports), installs
# GuideLLM into its own venv (BENCH_VENV, default /tmp/benchvenv) so its dependencies never touch .venv,
# runs a bounded concurrent benchmark of /v1/completions (synthetic prompts, ignore_eos outputs) with the
# model folder's own tokenizer (no hub access), prints GuideLLM's report and stops the system.
# Results: $OUT_DIR/guidellm.json and $OUT_DIR/guidellm.log (default: a new temporary folder).
set -euo pipefail
cd "$(dirname "$0")/.."
num_requests=${1:-20}
concurrency=${2:-4}
prompt_tokens=${3:-64}
output_tokens=${4:-16}
bench_venv=${BENCH_VENV:-/tmp/benchvenv}
out_dir=${OUT_DIR:-$(mktemp -d -t tandem-openai-bench-XXXX)}
mkdir -p "$out_dir"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

if [ ! -x "$bench_venv/bin/guidellm" ]; then
    python3 -m venv "$bench_venv"
    "$bench_venv/bin/pip" install -q guidellm
fi
model_folder=$(.venv/bin/python -c "from common.model.registry import resolve_model; print(resolve_model(None).folder)")

.venv/bin/python -m services.cli serve --port 0 --http-port 0 --log-dir "$out_dir/logs" \
    --ready-file "$out_dir/ready.json" > "$out_dir/serve.log" 2>&1 &
serve_pid=$!
trap 'kill -TERM $serve_pid 2>/dev/null; wait $serve_pid 2>/dev/null || true' EXIT
for _ in $(seq 300); do
    [ -f "$out_dir/ready.json" ] && break
    kill -0 $serve_pid 2>/dev/null || { cat "$out_dir/serve.log"; exit 1; }
    sleep 1
done
http_url=$(.venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))['http'])" "$out_dir/ready.json")
target=${http_url%/v1}
model=$(curl -sf "$http_url/models" | .venv/bin/python -c "import json,sys; print(json.load(sys.stdin)['data'][0]['id'])")
echo "Tandem at $http_url serving $model; GuideLLM: $num_requests requests, concurrency $concurrency," \
     "$prompt_tokens prompt / $output_tokens output tokens"

"$bench_venv/bin/guidellm" run \
    --backend "kind=openai_http,target=$target,model=$model,request_format=/v1/completions" \
    --profile "kind=concurrent,streams=$concurrency" \
    --constraint "kind=max_requests,count=$num_requests" \
    --data "kind=synthetic_text,prompt_tokens=$prompt_tokens,output_tokens=$output_tokens" \
    --tokenizer "kind=huggingface_auto,model=$model_folder" \
    --output "kind=json,path=$out_dir/guidellm.json" \
    --disable-progress 2>&1 | tee "$out_dir/guidellm.log"
echo "report: $out_dir/guidellm.json"
