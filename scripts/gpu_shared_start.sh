#!/usr/bin/env bash
# Starts a prefill and a decode worker on one GPU, each with --gpu-memory-utilization $UTIL, in
# alternating orders (the second starts once the first serves), $ATTEMPTS times; one line per attempt
# (pool sizes, each process's memory by nvidia-smi against its share), then a summary. Exit 1 when an
# attempt failed or a role's pool size depended on the order.
#
#   scripts/gpu_shared_start.sh                      # 20 attempts, prefill-first / decode-first
#   ORDERS="prefill-first decode-first together" ATTEMPTS=30 scripts/gpu_shared_start.sh
#
# Env: PYTHON (default python3; the repo goes first on PYTHONPATH), DEVICE (cuda:0), UTIL (0.3),
# MODEL (dummy:smollm2-135m: random weights, no download), ENGINE_ARGS (--max-model-len 2048
# --cuda-graph-max-batch-size 32: fewer graphs to capture), KV_BACKEND (ucx if importable, else fake),
# START_TIMEOUT (120 s a worker), OUT (logs; default a temporary folder).
# About 10-20 s an attempt on an H200 once Triton's cache is warm: 20 attempts fit in ~8 minutes.
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
python=${PYTHON:-python3}
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
device=${DEVICE:-cuda:0}
util=${UTIL:-0.3}
model=${MODEL:-dummy:smollm2-135m}
read -r -a engine_args <<<"${ENGINE_ARGS:---max-model-len 2048 --cuda-graph-max-batch-size 32}"
read -r -a orders <<<"${ORDERS:-prefill-first decode-first}"
attempts=${ATTEMPTS:-20}
start_timeout=${START_TIMEOUT:-120}
kv_backend=${KV_BACKEND:-$("$python" -c 'import ucxx' 2>/dev/null && echo ucx || echo fake)}
log_dir=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-shared-start.XXXXXX")}
mkdir -p "$log_dir"
gpu_index=${device#cuda:}; [ "$gpu_index" = cuda ] && gpu_index=0

total_mib=$(nvidia-smi -i "$gpu_index" --query-gpu=memory.total --format=csv,noheader,nounits) || exit 1
echo "gpu_shared_start: $(date -u +%FT%TZ) $(nvidia-smi -i "$gpu_index" --query-gpu=name --format=csv,noheader)" \
     "$device, ${total_mib} MiB; $model, --gpu-memory-utilization $util each, kv backend $kv_backend; logs $log_dir"
share_mib=$("$python" -c "print(int($total_mib * $util))")

declare -A pids
start_worker() {  # start_worker ROLE ATTEMPT_DIR
    rm -f "$2/$1.ready.json"
    "$python" -m services.cli "$1" --port 0 --device "$device" --gpu-memory-utilization "$util" --model "$model" \
        --kv-transfer-backend "$kv_backend" --ready-file "$2/$1.ready.json" "${engine_args[@]}" \
        >"$2/$1.log" 2>&1 &
    pids[$1]=$!
}

wait_ready() {  # wait_ready ROLE ATTEMPT_DIR -> 0 once serving, 1 if it died or timed out
    local deadline=$((SECONDS + start_timeout))
    while [ ! -f "$2/$1.ready.json" ]; do
        kill -0 "${pids[$1]}" 2>/dev/null || return 1
        [ "$SECONDS" -ge "$deadline" ] && return 1
        sleep 0.2
    done
}

stop_workers() {  # only the processes this script started, by id
    for role in "${!pids[@]}"; do kill -TERM "${pids[$role]}" 2>/dev/null; done
    for role in "${!pids[@]}"; do
        for _ in $(seq 1 75); do kill -0 "${pids[$role]}" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "${pids[$role]}" 2>/dev/null
        wait "${pids[$role]}" 2>/dev/null
    done
    pids=()
}
trap 'stop_workers; exit 130' INT TERM

pool_of() {  # "2816 blocks (0.98 GiB)" from the engine's log line
    sed -n 's/.*KV pool: \([0-9]*\) blocks of [0-9]* tokens (\([0-9.]*\) GiB).*/\1 blocks (\2 GiB)/p' "$1" | tail -1
}

used_mib() {  # memory nvidia-smi reports for one process on the GPU ("?" when it cannot see it)
    nvidia-smi -i "$gpu_index" --query-compute-apps=pid,used_memory --format=csv,noheader,nounits \
        | awk -F', ' -v pid="$1" '$1 == pid {print $2; found=1} END {if (!found) print "?"}'
}

failures=0
over_share=0
declare -A pools_seen
for attempt in $(seq 1 "$attempts"); do
    order=${orders[$(((attempt - 1) % ${#orders[@]}))]}
    dir="$log_dir/attempt-$attempt"; mkdir -p "$dir"
    begin=$SECONDS
    status=ok
    case $order in
        prefill-first) roles=(prefill decode) ;;
        decode-first) roles=(decode prefill) ;;
        together) roles=(prefill decode) ;;
        *) echo "unknown order $order (prefill-first, decode-first, together)"; exit 2 ;;
    esac
    if [ "$order" = together ]; then
        start_worker prefill "$dir"; start_worker decode "$dir"
        for role in prefill decode; do wait_ready "$role" "$dir" || { status="FAILED: $role"; break; }; done
    else
        for role in "${roles[@]}"; do
            start_worker "$role" "$dir"
            wait_ready "$role" "$dir" || { status="FAILED: $role"; break; }
        done
    fi
    if [ "$status" = ok ]; then
        details=""
        for role in prefill decode; do
            pool=$(pool_of "$dir/$role.log")
            used=$(used_mib "${pids[$role]}")
            pools_seen[$role]+="${pool%% *} "
            if [ "$used" != "?" ] && [ "$used" -gt "$share_mib" ]; then over_share=$((over_share + 1)); fi
            details+="  $role $pool, uses ${used}/${share_mib} MiB"
        done
        line="ok$details"
    else
        failures=$((failures + 1))
        role=${status#FAILED: }
        line="$status: $(grep -v '^\s*$' "$dir/$role.log" | tail -1 | cut -c1-220)"
    fi
    stop_workers
    printf 'attempt %2d/%d %-13s %s (%ds)\n' "$attempt" "$attempts" "$order" "$line" $((SECONDS - begin))
done

distinct() { tr ' ' '\n' <<<"$1" | sed '/^$/d' | sort -u | tr '\n' ' '; }
echo "summary: $attempts attempts, $((attempts - failures)) ok, $failures failed; pool blocks seen:" \
     "prefill [ $(distinct "${pools_seen[prefill]:-}")] decode [ $(distinct "${pools_seen[decode]:-}")];" \
     "processes above their share: $over_share"
same_pools=1
for role in prefill decode; do
    [ "$(distinct "${pools_seen[$role]:-}" | wc -w)" -le 1 ] || same_pools=0
done
[ "$failures" -eq 0 ] && [ "$same_pools" -eq 1 ] && [ "$over_share" -eq 0 ]
