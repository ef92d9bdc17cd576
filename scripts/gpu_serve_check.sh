#!/usr/bin/env bash
# `tandem serve` on GPUs as a user starts it, from flags alone: every worker on one GPU
# (`--device cuda`), then prefill and decode on different GPUs (`--prefill-devices 0 --decode-devices 1`,
# skipped with fewer than two GPUs). Each run: wait until it serves, generate over gRPC, print the
# placement and memory split `tandem serve` printed, every worker's KV pool line and which GPU
# nvidia-smi sees each worker process on; then stop it. Exit 1 when a run failed.
#
#   scripts/gpu_serve_check.sh
#
# Env: RUNS (one-gpu two-gpus), PYTHON (default python3; the repo goes first on PYTHONPATH), SHAPE (smollm2-135m: a model folder
# of that Llama shape with random weights, --load-format dummy), TOKENIZER (a folder of tokenizer files
# for it, e.g. SmolLM2's; default: a synthetic word-level one), ENGINE_ARGS (--max-model-len 2048
# --cuda-graph-max-batch-size 32), READY_TIMEOUT (240 s), OUT (logs; default a temporary folder).
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
python=${PYTHON:-python3}
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
shape=${SHAPE:-smollm2-135m}
read -r -a engine_args <<<"${ENGINE_ARGS:---max-model-len 2048 --cuda-graph-max-batch-size 32}"
ready_timeout=${READY_TIMEOUT:-240}
log_root=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-serve-check.XXXXXX")}
num_gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
model="$log_root/model"  # config.json + tokenizer files: the frontend tokenizes, the workers load random weights
"$python" - "$shape" "$model" "${TOKENIZER:-synthetic}" <<'EOF' || exit 1
import argparse, pathlib, sys
from bench._disagg_services import prepare_model
shape, folder, tokenizer = sys.argv[1:]
prepare_model(argparse.Namespace(model=f"dummy:{shape}", tokenizer=tokenizer, vocab_size=49152), pathlib.Path(folder))
EOF
echo "gpu_serve_check: $(date -u +%FT%TZ) ${num_gpus}x $(nvidia-smi -i 0 --query-gpu=name --format=csv,noheader); $shape"

failures=0
run() {  # run NAME SERVE_FLAGS...
    local name=$1; shift
    local dir="$log_root/$name"
    mkdir -p "$dir"
    rm -f "$dir/ready.json"
    echo "== $name: tandem serve $* --model <$shape folder> --load-format dummy ${engine_args[*]}"
    "$python" -m services.cli serve "$@" --model "$model" --load-format dummy --port 0 --http-port 0 --log-dir "$dir" \
        --ready-file "$dir/ready.json" --ready-timeout "$ready_timeout" "${engine_args[@]}" >"$dir/serve.out" 2>&1 &
    local pid=$! started=$SECONDS
    while [ ! -f "$dir/ready.json" ]; do
        if ! kill -0 "$pid" 2>/dev/null || [ $((SECONDS - started)) -gt "$ready_timeout" ]; then
            echo "FAIL $name: not serving after $((SECONDS - started)) s"; tail -20 "$dir/serve.out"
            kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; failures=$((failures + 1)); return
        fi
        sleep 0.5
    done
    sleep 0.5  # the ready file is written whole, but give the writer its close
    local address
    address=$("$python" -c "import json,sys; print(json.load(open(sys.argv[1]))['frontend'])" "$dir/ready.json")
    echo "serving after $((SECONDS - started)) s on $address"
    sed -n '1,/^starting/p' "$dir/serve.out"  # the placement and memory split tandem serve printed
    local answer
    if answer=$("$python" -m services.cli generate --address "$address" --raw --max-tokens 8 "The capital of France is" 2>&1); then
        echo "generate: ok ($(echo "$answer" | tr '\n' ' ' | cut -c1-120))"
    else
        echo "FAIL $name: generate: $answer"; failures=$((failures + 1))
    fi
    grep -h "KV pool" "$dir"/*.log 2>/dev/null | sed 's/^/  /'
    nvidia-smi --query-compute-apps=pid,used_memory,gpu_uuid --format=csv,noheader | while IFS=, read -r app_pid used uuid; do
        index=$(nvidia-smi --query-gpu=index,uuid --format=csv,noheader | grep "${uuid// /}" | cut -d, -f1)
        echo "  pid $app_pid on GPU $index:$used ($(tr '\0' ' ' </proc/"$app_pid"/cmdline 2>/dev/null | grep -oE 'services.cli (prefill|decode)' | cut -d' ' -f2))"
    done
    kill -INT "$pid"; wait "$pid" 2>/dev/null
    echo "stopped"
}

[[ " ${RUNS:-one-gpu two-gpus} " == *" one-gpu "* ]] && run one-gpu --device cuda
if [[ " ${RUNS:-one-gpu two-gpus} " != *" two-gpus "* ]]; then
    :
elif [ "$num_gpus" -ge 2 ]; then
    run two-gpus --prefill-devices 0 --decode-devices 1
else
    echo "two-gpus: skipped (one GPU)"
fi
echo "gpu_serve_check: $failures failed"
[ "$failures" -eq 0 ]
