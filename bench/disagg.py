"""Disaggregated serving end to end, against the single-GPU engine on the same requests, in one command.

    # 1P1D: prefill on GPU 0, decode on GPU 1 (expected about 6 minutes on 2 H200s)
    python bench/disagg.py --prefill-device cuda:0 --decode-device cuda:1 --budget 540 --output disagg.json
    # P and D on one GPU: explicit KV pools (2 MiB a block for Llama-3-8B in bf16)
    python bench/disagg.py --device cuda:0 --prefill-args "--num-kv-blocks 8000" \\
        --decode-args "--num-kv-blocks 16000" --budget 540 --output disagg-1gpu.json
    # 1P2D: the second decode worker beside the prefill worker
    python bench/disagg.py --prefill-device cuda:0 --num-decode 2 --decode-device cuda:1,cuda:0 \\
        --prefill-args "--num-kv-blocks 8000" --decode-args "--num-kv-blocks 16000" --budget 540 --output d.json
    # CPU functional run
    python bench/disagg.py --device cpu --model dummy:tiny --num-requests 6 --max-input-len 40 \\
        --max-output-len 10 --rates 4 --requests-per-rate 6 --warmup-requests 2

Phases, in order (--phases picks some; the JSON is rewritten after each run, so a killed run keeps them):
    engine  `LLMEngine` alone on --baseline-device in a subprocess of its own (its memory is gone before
            the services start), through bench/sharegpt.py's runner: all N requests at once
    grpc    the services, all N at once over gRPC (`Generate` with token-id prompts)
    http    the services, all N at once over the OpenAI API (streamed /v1/completions, token-id prompts)
    rates   the services over gRPC at each of --rates requests/s (Poisson arrivals, seeded), the first
            --requests-per-rate requests
Before the first service phase: an OTLP collector (in this process), the workers and the frontend
(`python -m services.cli prefill|decode|frontend`, free ports, logs in --log-dir), then
--warmup-requests through gRPC, which no figure counts.

Workload: bench/sharegpt.py's ShareGPT shape (token-id prompts, greedy, EOS ignored, max_tokens = each
request's output length). `--model dummy:<preset>` is served as random weights of that shape with a
--vocab-size vocabulary (default 49,152: the embedded SmolLM2 tokenizer's): the bench writes a model
folder (config.json + tokenizer files) and the workers, the frontend and the baseline all load it with
`--load-format dummy`, so the frontend detokenizes with a real tokenizer and checks ids against the
workers' vocabulary. --tokenizer synthetic writes a word-level tokenizer instead (no files needed).

Figures, per run, from this client:
    output tok/s  tokens received / wall time (first request sent -> last stream ended)
    TTFT          request sent -> first chunk carrying a token
    ITL           gap between consecutive chunks of one stream (vLLM's benchmark_serving)
    TPOT          (e2e - TTFT) / (output tokens - 1), per request
and from the services: `kv.send` spans (the prefill side of each hand-off): duration, GB/s = kv.bytes /
duration / 1e9, kv.transport (the UCX transport that carried the data); kv share = kv.send seconds / the
request's time to its second token (TTFT + the gap to token #2, which the hand-off delays), i.e. how
much of the wait for the first decoded token is the transfer itself; and Triton compiles during the run
from each worker's GetStats (`num_kernel_compiles_after_ready`; None where the worker does not report it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The services are started with a preexec_fn (fork): grpc's fork handlers would only log that they skip.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
import grpc  # noqa: E402

from bench._common import HttpError, format_table, percentiles, poisson_arrivals, post_sse, write_json  # noqa: E402
from bench.sharegpt import sharegpt_workload, workload_summary  # noqa: E402
from common.model.config import ModelConfig  # noqa: E402
from common.otlp_collector import CollectedSpan, OtlpCollector, save_spans  # noqa: E402
from common.tracing import Attr, SpanName  # noqa: E402
from protos import generation_pb2, generation_pb2_grpc, worker_pb2, worker_pb2_grpc  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
PHASES = ("engine", "grpc", "http", "rates")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt")
COMPILES_FIELD = "num_kernel_compiles_after_ready"
# Spans leave each service in batches; a bigger queue than the SDK's 2,048 keeps a burst of 500
# requests (~8 spans each on the frontend) from being dropped, a short delay gets them here sooner.
SPAN_EXPORT_ENV = {"OTEL_BSP_MAX_QUEUE_SIZE": "65536", "OTEL_BSP_SCHEDULE_DELAY": "1000",
                   "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "2048"}
SHUTDOWN_RESERVE_SECONDS = 25.0  # of --budget, kept for stopping the services


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model", default="dummy:llama-3-8b", help="dummy:<preset>, an HF folder or a .gguf file")
    add("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    add("--vocab-size", type=int, default=49152, help="dummy models: vocabulary size (the tokenizer's)")
    add("--tokenizer", default="auto", help="dummy models: auto (embedded if installed, else synthetic), "
                                            "embedded, synthetic, or a folder with tokenizer files")
    add("--device", default=None, help="default for the three devices below (cuda:0, cpu, ...)")
    add("--prefill-device", default=None, help="default: --device, else cuda:0")
    add("--decode-device", default=None, help="one, or one per decode worker (comma separated); default: "
                                              "--device, else cuda:1")
    add("--baseline-device", default=None, help="the engine baseline's device; default: the prefill device")
    add("--num-decode", type=int, default=1, help="decode workers")
    add("--prefill-args", default="", help='extra flags for the prefill worker, e.g. "--num-kv-blocks 8000" '
                                           '(one flag alone: --prefill-args=--enforce-eager)')
    add("--decode-args", default="", help="extra flags for every decode worker")
    add("--frontend-args", default="", help="extra flags for the frontend")
    add("--max-num-seqs", type=int, default=256, help="workers and baseline")
    add("--max-num-batched-tokens", type=int, default=8192, help="workers and baseline")
    add("--num-requests", type=int, default=500)
    add("--max-input-len", type=int, default=1024, help="the workload's input clip")
    add("--max-output-len", type=int, default=512, help="the workload's output clip")
    add("--phases", default=",".join(PHASES), help=f"comma-separated subset of {PHASES}")
    add("--rates", default="4,8,16,24,32", help="requests/s of the rates phase (inf allowed)")
    add("--requests-per-rate", type=int, default=160, help="requests sent at each rate (at most N)")
    add("--warmup-requests", type=int, default=32, help="sent at once through the services before measuring")
    add("--seed", type=int, default=0, help="the rates' arrival times")
    add("--time-limit", type=float, default=150.0, help="seconds per run (then unfinished requests are cut)")
    add("--budget", type=float, default=0.0, help="seconds for the whole command: runs that no longer fit "
                                                  "are skipped (0 = no limit)")
    add("--start-timeout", type=float, default=300.0, help="seconds for the services to become ready")
    add("--span-wait", type=float, default=10.0, help="seconds to wait for a run's kv.send spans")
    add("--log-dir", default=None, help="service logs, ready files, model folder (default: a new temp folder)")
    add("--previous", default=None, help="JSON of an earlier run of the same workload: its runs are kept "
                                         "(e.g. the engine baseline when phases run in separate commands)")
    add("--output", default=None, help="write everything as JSON here")
    add("--baseline-output", default=None, help=argparse.SUPPRESS)  # internal: run only the baseline, here
    add("--load-format", default=None, help=argparse.SUPPRESS)  # internal: the baseline's model format
    args = parser.parse_args(argv)
    args.phases = [p for p in args.phases.split(",") if p]
    if any(p not in PHASES for p in args.phases):
        parser.error(f"--phases takes a subset of {PHASES}, got {args.phases}")
    args.rates = [float(r) for r in args.rates.split(",") if r]
    args.prefill_device = args.prefill_device or args.device or "cuda:0"
    decode_devices = (args.decode_device or args.device or "cuda:1").split(",")
    if len(decode_devices) not in (1, args.num_decode):
        parser.error(f"--decode-device: one device or {args.num_decode}, got {decode_devices}")
    args.decode_devices = decode_devices * args.num_decode if len(decode_devices) == 1 else decode_devices
    args.baseline_device = args.baseline_device or args.prefill_device
    args.dtype = args.dtype or ("float32" if args.prefill_device == "cpu" else "bfloat16")
    args.max_model_len = args.max_input_len + args.max_output_len
    return args


# ---- the served model: a folder every process loads ---------------------------------------------


def hf_config(config: ModelConfig, vocab_size: int) -> dict:
    """An HF config.json for `config` with `vocab_size` (bos/eos moved to 1/2 when they fall outside)."""
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        scaling = config.rope_scaling
        rope = {"rope_type": scaling.rope_type, "rope_theta": config.rope_theta, "factor": scaling.factor}
        if scaling.rope_type == "llama3":
            rope.update(low_freq_factor=scaling.low_freq_factor, high_freq_factor=scaling.high_freq_factor,
                        original_max_position_embeddings=scaling.original_max_position_embeddings)
    eos_ids = [i for i in config.eos_token_ids if i < vocab_size] or [2]
    bos_id = config.bos_token_id if config.bos_token_id is not None and config.bos_token_id < vocab_size else 1
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": config.architecture, "vocab_size": vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads, "head_dim": config.head_dim, "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": rope, "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_output_bias, "bos_token_id": bos_id,
        "eos_token_id": eos_ids if len(eos_ids) > 1 else eos_ids[0], "dtype": config.torch_dtype or "bfloat16",
    }


def write_synthetic_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer of exactly `vocab_size` tokens ("t<id>"), for machines without the embedded one."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}))


def _tokenizer_source(choice: str) -> Path | None:
    """The folder to copy tokenizer files from; None = write a synthetic one."""
    if choice == "synthetic":
        return None
    if choice not in ("auto", "embedded"):
        return Path(choice)
    from common.model.registry import resolve_model

    try:
        return resolve_model(None).folder
    except (FileNotFoundError, ImportError, OSError) as exc:
        if choice == "embedded":
            raise SystemExit(f"--tokenizer embedded: {exc}")
        print(f"embedded tokenizer unavailable ({exc}); using a synthetic one", flush=True)
        return None


def prepare_model(args, folder: Path) -> dict:
    """{"path", "load_format", "vocab_size", "tokenizer", "shape"} of what every process serves."""
    from common.model.registry import resolve_model

    if not args.model.startswith("dummy:"):
        resolved = resolve_model(args.model)
        config = resolved.model_config or ModelConfig.from_folder(resolved.folder)
        return {"path": args.model, "load_format": "auto", "vocab_size": config.vocab_size, "tokenizer": "model's",
                "shape": args.model}
    shape = args.model.removeprefix("dummy:")
    source = _tokenizer_source(args.tokenizer)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config(ModelConfig.llama_shape(shape), args.vocab_size)))
    if source is None:
        write_synthetic_tokenizer(folder, args.vocab_size)
    else:
        copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
        if not copied:
            raise SystemExit(f"--tokenizer: no tokenizer files in {source}")
        for name in copied:
            shutil.copy(source / name, folder / name)
    return {"path": str(folder), "load_format": "dummy", "vocab_size": args.vocab_size,
            "tokenizer": "synthetic" if source is None else str(source), "shape": shape}


# ---- the engine baseline, in a subprocess -------------------------------------------------------


def baseline_child(args) -> int:
    """Internal mode: the engine alone on the workload, result to --baseline-output."""
    import torch

    from bench._common import environment, require_device
    from bench.sharegpt import free_device_memory, run_tandem
    from common.engine.config import EngineConfig
    from common.engine.llm_engine import LLMEngine

    device = require_device(args.baseline_device)
    config = EngineConfig(
        model=args.model, load_format=args.load_format or "auto", dtype=args.dtype, device=args.baseline_device,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=max(args.max_num_batched_tokens, args.max_num_seqs),
        max_model_len=args.max_model_len, kv_cache_memory_bytes=None if device.type == "cuda" else 1 << 28,
    )
    engine = LLMEngine(config)
    prompts, output_lens = sharegpt_workload(args.num_requests, engine.model_config.vocab_size,
                                             args.max_input_len, args.max_output_len)
    result = run_tandem(engine, prompts, output_lens, args.time_limit)
    result.update(workload=workload_summary(prompts, output_lens), environment=environment(device),
                  device=args.baseline_device, num_kv_blocks=engine.allocator.num_blocks,
                  torch_threads=torch.get_num_threads())
    del engine
    free_device_memory(device)
    write_json(args.baseline_output, result)
    return 0


def run_baseline(args, model: dict, log_dir: Path, time_limit: float) -> dict:
    """The engine baseline in a subprocess (so its GPU memory is gone before the services start)."""
    output = log_dir / "engine-baseline.json"
    output.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--baseline-output", str(output),
               "--model", model["path"], "--load-format", model["load_format"], "--dtype", args.dtype,
               "--baseline-device", args.baseline_device, "--device", args.baseline_device,
               "--num-requests", str(args.num_requests), "--max-input-len", str(args.max_input_len),
               "--max-output-len", str(args.max_output_len), "--max-num-seqs", str(args.max_num_seqs),
               "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--time-limit", str(time_limit)]
    log_path = log_dir / "engine-baseline.log"
    with open(log_path, "w") as log, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                                      env=dict(os.environ, PYTHONUNBUFFERED="1")) as child:
        try:
            code = child.wait(time_limit + args.start_timeout)
        except BaseException:  # a timeout, or SIGTERM from an outer one: never leave it holding the GPU
            child.kill()
            raise
    if code != 0 or not output.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"engine baseline exited with {code}; {log_path} ends with:\n{tail}")
    return json.loads(output.read_text())


# ---- the services as processes ------------------------------------------------------------------


class ServiceFailure(RuntimeError):
    """A service died or did not become ready; the message carries the end of its log."""


def _die_with_parent() -> None:
    """Child side of fork: SIGTERM when the bench dies (an outer timeout), so no service outlives it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Service:
    name: str  # prefill-0, decode-1, frontend
    role: str  # prefill | decode | frontend
    device: str | None
    popen: subprocess.Popen
    log_path: Path
    ready_file: Path
    info: dict = field(default_factory=dict)  # its ready file once up: port, metrics_port, ...

    @property
    def address(self) -> str:
        return f"localhost:{self.info['port']}"

    def log_tail(self, num_lines: int = 40) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []
        return "\n".join(f"  {line}" for line in lines[-num_lines:])

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise ServiceFailure(f"{self.name} exited with code {self.popen.returncode}; {self.log_path} ends "
                                 f"with:\n{self.log_tail()}")


class Services:
    """Starts the services (each its own process group, logs to files) and stops every one of them."""

    def __init__(self, log_dir: Path, otlp_endpoint: str):
        self.log_dir = log_dir
        self.otlp_endpoint = otlp_endpoint
        self.started: list[Service] = []
        self.env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **SPAN_EXPORT_ENV)

    def start(self, name: str, role: str, device: str | None, argv: list[str]) -> Service:
        ready_file, log_path = self.log_dir / f"{name}.ready.json", self.log_dir / f"{name}.log"
        ready_file.unlink(missing_ok=True)  # a warm machine may keep one from an earlier run
        command = [sys.executable, "-m", "services.cli", role, "--port", "0", "--ready-file", str(ready_file),
                   "--otlp-traces-endpoint", self.otlp_endpoint, "--metrics-port", "0", *argv]
        with open(log_path, "w") as log:
            log.write(" ".join(map(shlex.quote, command)) + "\n")
            log.flush()
            popen = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=self.env,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        service = Service(name, role, device, popen, log_path, ready_file)
        self.started.append(service)
        return service

    def wait_ready(self, services: list[Service], timeout_seconds: float) -> None:
        deadline = time.monotonic() + timeout_seconds
        pending = list(services)
        while pending:
            for service in list(pending):
                service.check_alive()
                if service.ready_file.exists():
                    service.info = json.loads(service.ready_file.read_text())
                    pending.remove(service)
            if pending and time.monotonic() > deadline:
                tails = "\n".join(f"{s.name} ({s.log_path}):\n{s.log_tail()}" for s in pending)
                raise ServiceFailure(f"not ready after {timeout_seconds:.0f}s: {[s.name for s in pending]}\n{tails}")
            time.sleep(0.25)

    def check_alive(self) -> None:
        for service in self.started:
            service.check_alive()

    def workers(self) -> list[Service]:
        return [s for s in self.started if s.role in ("prefill", "decode")]

    def stop(self, grace_seconds: float = 20.0) -> None:
        """SIGTERM, frontend first; SIGKILL whatever outlives the grace period."""
        for service in reversed(self.started):
            if service.popen.poll() is None:
                service.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        for service in reversed(self.started):
            try:
                service.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                service.popen.kill()
                service.popen.wait()


def engine_argv(args, model: dict, device: str) -> list[str]:
    argv = ["--model", model["path"], "--load-format", model["load_format"], "--dtype", args.dtype,
            "--device", device, "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
            "--max-num-batched-tokens", str(max(args.max_num_batched_tokens, args.max_num_seqs))]
    return argv + (["--kv-cache-memory", "64MiB"] if device == "cpu" else [])


def start_services(args, model: dict, services: Services) -> Service:
    """Workers first, then the frontend pointed at them; returns the frontend once ready.

    Workers on different GPUs start together; a second worker on a GPU starts once the first there is
    ready, so sizing its KV pool from free memory never races the other's loading.
    """
    specs = [("prefill-0", "prefill", args.prefill_device, shlex.split(args.prefill_args))]
    specs += [(f"decode-{i}", "decode", device, shlex.split(args.decode_args))
              for i, device in enumerate(args.decode_devices)]
    print(f"starting 1 prefill and {len(specs) - 1} decode workers (logs in {services.log_dir})", flush=True)
    waves: list[list[tuple]] = []  # wave i: the (i+1)-th worker of each GPU
    num_on_device: Counter = Counter()
    for spec in specs:
        index = num_on_device[spec[2]] if spec[2] != "cpu" else 0
        num_on_device[spec[2]] += 1
        waves += [[] for _ in range(index + 1 - len(waves))]
        waves[index].append(spec)
    for wave in waves:
        started = [services.start(name, role, device, engine_argv(args, model, device) + extra)
                   for name, role, device, extra in wave]
        services.wait_ready(started, args.start_timeout)
    prefill, *decodes = sorted(services.workers(), key=lambda s: (s.role != "prefill", s.name))
    frontend = services.start("frontend", "frontend", None, [
        "--model", model["path"], "--load-format", model["load_format"], "--http-port", "0",
        "--prefill-addresses", prefill.address, "--decode-addresses", ",".join(d.address for d in decodes),
        *shlex.split(args.frontend_args)])
    services.wait_ready([frontend], args.start_timeout)
    return frontend


def worker_stats(service: Service) -> worker_pb2.WorkerStats:
    stub_type = worker_pb2_grpc.PrefillWorkerStub if service.role == "prefill" else worker_pb2_grpc.DecodeWorkerStub
    with grpc.insecure_channel(service.address) as channel:
        return stub_type(channel).GetStats(worker_pb2.GetStatsRequest(), timeout=10)


def all_worker_stats(services: Services) -> dict[str, worker_pb2.WorkerStats]:
    """GetStats of every worker; a worker that stopped answering raises ServiceFailure with its log."""
    try:
        return {s.name: worker_stats(s) for s in services.workers()}
    except grpc.RpcError:
        services.check_alive()
        raise


def compile_counts(stats: dict[str, worker_pb2.WorkerStats]) -> dict[str, int | None]:
    """Triton compiles since each worker said SERVING (None: the worker does not report them)."""
    return {name: getattr(s, COMPILES_FIELD, None) for name, s in stats.items()}


# ---- the client -------------------------------------------------------------------------------


@dataclass
class RequestRecord:
    request_id: str  # ours; HTTP: the server's (response id + "-0"), known once the stream starts
    num_prompt_tokens: int
    max_tokens: int
    sent: float = 0.0  # time.perf_counter()
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk carrying tokens
    num_chunk_tokens: list[int] = field(default_factory=list)  # tokens in each of those chunks
    end: float | None = None
    num_usage_tokens: int | None = None  # completion tokens the server reported at the end
    error: str | None = None

    def add_chunk(self, now: float, num_tokens: int) -> None:
        self.chunk_times.append(now)
        self.num_chunk_tokens.append(num_tokens)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_chunk_tokens)

    @property
    def is_complete(self) -> bool:
        return self.error is None and self.end is not None and self.num_tokens == self.max_tokens

    def second_token_seconds(self) -> float | None:
        """Sent -> the chunk that brought the total to 2 tokens (TTFT + the hand-off + a decode step)."""
        total = 0
        for now, num_tokens in zip(self.chunk_times, self.num_chunk_tokens):
            total += num_tokens
            if total >= 2:
                return now - self.sent
        return None

    def summary(self) -> dict:
        ttft = self.chunk_times[0] - self.sent if self.chunk_times else None
        return {"request_id": self.request_id, "prompt_tokens": self.num_prompt_tokens,
                "max_tokens": self.max_tokens, "num_tokens": self.num_tokens, "usage_tokens": self.num_usage_tokens,
                "num_chunks": len(self.chunk_times), "ttft_s": ttft, "second_token_s": self.second_token_seconds(),
                "e2e_s": None if self.end is None else self.end - self.sent, "error": self.error}


async def send_grpc(stub, record: RequestRecord, prompt: list[int]) -> None:
    request = generation_pb2.GenerateRequest(
        request_id=record.request_id, token_ids=generation_pb2.TokenIds(ids=prompt),
        sampling=generation_pb2.SamplingParams(max_tokens=record.max_tokens, temperature=0.0, ignore_eos=True))
    record.sent = time.perf_counter()
    try:
        async for response in stub.Generate(request, timeout=3600):
            if response.HasField("chunk"):
                if response.chunk.token_ids:
                    record.add_chunk(time.perf_counter(), len(response.chunk.token_ids))
            elif response.HasField("final"):
                record.num_usage_tokens = response.final.usage.completion_tokens
    except grpc.aio.AioRpcError as exc:
        record.error = f"{exc.code().name}: {exc.details()}"
    record.end = time.perf_counter()
    _check_length(record)


async def send_http(host: str, port: int, model_name: str, record: RequestRecord, prompt: list[int]) -> None:
    """Streamed /v1/completions; every chunk carries the usage so far (vLLM's continuous_usage_stats),
    which counts the tokens of each chunk exactly, text or not."""
    body = {"model": model_name, "prompt": prompt, "max_tokens": record.max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    record.sent = time.perf_counter()
    seen = 0
    try:
        async for now, event in post_sse(host, port, "/v1/completions", body):
            if "error" in event:
                record.error = f"in-band error: {event['error'].get('message', event['error'])}"
                break
            record.request_id = f"{event.get('id')}-0"
            usage = event.get("usage") or {}
            total = usage.get("completion_tokens", seen)
            if total > seen:
                record.add_chunk(now, total - seen)
                seen = total
            if event.get("choices") == [] and usage:  # the last chunk: usage only
                record.num_usage_tokens = total
    except (HttpError, OSError, ValueError, asyncio.IncompleteReadError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    record.end = time.perf_counter()
    _check_length(record)


def _check_length(record: RequestRecord) -> None:
    if record.error is None and record.num_tokens != record.max_tokens:
        record.error = (f"{record.num_tokens} tokens streamed, {record.max_tokens} asked "
                        f"(usage {record.num_usage_tokens})")


async def run_load(send, records: list[RequestRecord], prompts: list[list[int]], rate: float, seed: int,
                   time_limit: float) -> float:
    """Sends each request at its arrival time; returns the wall seconds (first send -> last end, or the cut)."""
    offsets = poisson_arrivals(len(records), rate, seed)
    start = time.perf_counter()

    async def at_arrival(offset: float, record: RequestRecord, prompt: list[int]) -> None:
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        await send(record, prompt)

    tasks = [asyncio.create_task(at_arrival(*item)) for item in zip(offsets, records, prompts)]
    _, pending = await asyncio.wait(tasks, timeout=time_limit)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for record in records:
        if record.end is None:
            record.error = record.error or f"cut at the {time_limit:.0f} s time limit"
    ends = [r.end for r in records if r.end is not None]
    return (max(ends) if ends and not pending else time.perf_counter()) - start


# ---- figures ----------------------------------------------------------------------------------


def _ms(values) -> dict[str, float | None]:
    return {k: None if v is None else v * 1e3 for k, v in percentiles(values).items()}


def client_figures(records: list[RequestRecord], wall_seconds: float) -> dict:
    """What this client saw: throughput, TTFT, ITL, TPOT, errors."""
    sent = [r for r in records if r.chunk_times]
    ttfts = [r.chunk_times[0] - r.sent for r in sent]
    gaps = [b - a for r in sent for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    tpots = [(r.end - r.chunk_times[0]) / (r.num_tokens - 1) for r in sent if r.end is not None and r.num_tokens > 1]
    errors = [r for r in records if not r.is_complete]
    num_tokens = sum(r.num_tokens for r in records)
    return {
        "num_requests": len(records), "num_completed": len(records) - len(errors), "output_tokens": num_tokens,
        "asked_tokens": sum(r.max_tokens for r in records), "wall_seconds": wall_seconds,
        "output_tokens_per_s": num_tokens / wall_seconds if wall_seconds > 0 else 0.0,
        "ttft_ms": _ms(ttfts), "itl_ms": _ms(gaps), "tpot_ms": _ms(tpots),
        "e2e_ms": _ms([r.end - r.sent for r in records if r.end is not None]),
        "num_errors": len(errors), "error_messages": list(dict.fromkeys(r.error for r in errors))[:5],
    }


def _kv_spans(spans: list[CollectedSpan], request_ids) -> tuple[dict[str, str], list, list]:
    """(trace id -> request id, kv.send spans, kv.recv spans) of the requests in `request_ids`, joined by
    trace: the request id is an attribute of the frontend's and the prefill worker's spans."""
    trace_request = {s.trace_id: s.attributes[Attr.REQUEST_ID] for s in spans
                     if s.attributes.get(Attr.REQUEST_ID) in request_ids}
    sends = [s for s in spans if s.name == SpanName.KV_SEND and s.trace_id in trace_request]
    recvs = [s for s in spans if s.name == SpanName.KV_RECV and s.trace_id in trace_request]
    return trace_request, sends, recvs


def kv_figures(spans: list[CollectedSpan], records: list[RequestRecord]) -> dict:
    """The run's hand-offs, from its `kv.send` (prefill side) and `kv.recv` (decode side) spans."""
    by_id = {r.request_id: r for r in records}
    trace_request, sends, recvs = _kv_spans(spans, by_id)
    seconds = [s.duration_ns / 1e9 for s in sends]
    gbps = [s.attributes.get(Attr.KV_BYTES, 0) / (s.duration_ns / 1e9) / 1e9 for s in sends if s.duration_ns > 0]
    shares = []
    for span in sends:
        second_token = by_id[trace_request[span.trace_id]].second_token_seconds()
        if second_token:
            shares.append(span.duration_ns / 1e9 / second_token)
    return {
        "num_sends": len(sends), "num_recvs": len(recvs), "send_ms": _ms(seconds),
        "recv_ms": _ms([s.duration_ns / 1e9 for s in recvs]), "gb_per_s": percentiles(gbps),
        "bytes": percentiles([s.attributes.get(Attr.KV_BYTES, 0) for s in sends]),
        "total_bytes": sum(s.attributes.get(Attr.KV_BYTES, 0) for s in sends),
        "transports": {"send": dict(Counter(str(s.attributes.get(Attr.KV_TRANSPORT)) for s in sends)),
                       "recv": dict(Counter(str(s.attributes.get(Attr.KV_TRANSPORT)) for s in recvs))},
        "ttft_share": percentiles(shares),
        "num_failed_spans": sum(s.status == "ERROR" for s in sends + recvs),
    }


def wait_for_kv_spans(collector: OtlpCollector, records: list[RequestRecord], timeout: float) -> list[CollectedSpan]:
    """Spans once both ends of every completed request's hand-off have arrived (or `timeout` seconds passed)."""
    num_expected = sum(r.is_complete for r in records)
    request_ids = {r.request_id for r in records}

    def is_complete(spans: list[CollectedSpan]) -> bool:
        _, sends, recvs = _kv_spans(spans, request_ids)
        return min(len(sends), len(recvs)) >= num_expected

    try:
        return collector.wait_for_spans(is_complete, timeout)
    except TimeoutError:
        return collector.spans()


# ---- one measured run over the services -------------------------------------------------------


@dataclass
class Target:
    """Where the clients send: the frontend's gRPC address and HTTP port, the served model's name."""

    grpc_address: str
    http_port: int
    model_name: str


async def _measure(target: Target, api: str, records, prompts, rate: float, seed: int, time_limit: float) -> float:
    if api == "http":
        return await run_load(lambda r, p: send_http("127.0.0.1", target.http_port, target.model_name, r, p),
                              records, prompts, rate, seed, time_limit)
    options = [("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(target.grpc_address, options=options) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        return await run_load(lambda r, p: send_grpc(stub, r, p), records, prompts, rate, seed, time_limit)


def serving_run(name: str, api: str, rate: float, target: Target, services: Services, collector: OtlpCollector,
                prompts: list[list[int]], output_lens: list[int], args, time_limit: float) -> dict:
    records = [RequestRecord(f"{name}-{i}", len(p), n) for i, (p, n) in enumerate(zip(prompts, output_lens))]
    compiles_before = compile_counts(all_worker_stats(services))
    cpu_before = time.process_time()
    wall = asyncio.run(_measure(target, api, records, prompts, rate, args.seed, time_limit))
    cpu_seconds = time.process_time() - cpu_before
    services.check_alive()
    stats = all_worker_stats(services)
    compiles_after = compile_counts(stats)
    spans = wait_for_kv_spans(collector, records, args.span_wait)
    save_spans(spans, services.log_dir / f"spans-{name}.json")  # for scripts/trace_waterfall.py
    collector.clear()
    compiles = {k: None if v is None or compiles_before[k] is None else v - compiles_before[k]
                for k, v in compiles_after.items()}
    known = [v for v in compiles.values() if v is not None]
    return {
        "name": name, "api": api, "rate": rate if rate != float("inf") else "inf", **client_figures(records, wall),
        "truncated": any(r.end is None for r in records), "kv": kv_figures(spans, records),
        "compiles": compiles, "compiles_total": sum(known) if known else None,
        "compiles_after_ready": compiles_after, "bench_process_cpu_fraction": cpu_seconds / wall if wall else None,
        "worker_stats": {worker: _stats_dict(values) for worker, values in stats.items()},
        "requests": [r.summary() for r in records],
    }


def _stats_dict(stats: worker_pb2.WorkerStats) -> dict:
    """The scalar and list fields of a worker's GetStats, defaults included (the layout left out)."""
    values = {f.name: getattr(stats, f.name) for f in stats.DESCRIPTOR.fields if f.message_type is None}
    return {k: v if isinstance(v, (int, float, str, bool)) else list(v) for k, v in values.items()}


def warm_up(target: Target, args, vocab_size: int, phases: list[str]) -> dict:
    """--warmup-requests at once over gRPC (and 2 over HTTP when measured), from another seed's workload."""
    prompts, output_lens = sharegpt_workload(args.warmup_requests, vocab_size, args.max_input_len,
                                             args.max_output_len, seed=1)
    result = {}
    for api, count in (("grpc", args.warmup_requests), ("http", 2 if "http" in phases else 0)):
        if count == 0:
            continue
        records = [RequestRecord(f"warmup-{api}-{i}", len(p), n)
                   for i, (p, n) in enumerate(zip(prompts[:count], output_lens[:count]))]
        wall = asyncio.run(_measure(target, api, records, prompts[:count], float("inf"), 0, args.time_limit))
        result[api] = {"num_requests": count, "num_errors": sum(not r.is_complete for r in records),
                       "wall_seconds": wall, "errors": list(dict.fromkeys(r.error for r in records if r.error))[:3]}
    return result


# ---- report -------------------------------------------------------------------------------------


def add_ratios(report: dict) -> None:
    engine = report["runs"].get("engine")
    for name, run in report["runs"].items():
        if name != "engine":
            run["ratio_to_engine"] = (run["output_tokens_per_s"] / engine["useful_output_tokens_per_s"]
                                      if engine and engine["useful_output_tokens_per_s"] else None)


def table(report: dict) -> str:
    def number(value, digits: int = 1) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    headers = ["run", "requests", "tok/s", "vs engine", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "TPOT p50",
               "kv p50 ms", "kv GB/s p50", "kv share p50", "compiles", "errors"]
    rows = []
    engine = report["runs"].get("engine")
    if engine:
        rows.append([f"engine 1 GPU ({engine.get('device', '')})", engine["num_requests"],
                     number(engine["useful_output_tokens_per_s"]), "1.00x", *["-"] * 9,
                     "cut" if engine.get("truncated") else 0])
    for name, run in report["runs"].items():
        if name == "engine":
            continue
        kv = run["kv"]
        compiles = "n/a" if run["compiles_total"] is None else run["compiles_total"]
        rows.append([f"{report['topology']} {name}", run["num_requests"], number(run["output_tokens_per_s"]),
                     "-" if run.get("ratio_to_engine") is None else f"{run['ratio_to_engine']:.2f}x",
                     *(f"{number(run[key][p], digits=0 if key == 'ttft_ms' else 1)} ms"
                       for key, p in (("ttft_ms", "p50"), ("ttft_ms", "p99"), ("itl_ms", "p50"), ("itl_ms", "p99"),
                                      ("tpot_ms", "p50"))),
                     number(kv["send_ms"]["p50"], digits=2), number(kv["gb_per_s"]["p50"], digits=2),
                     number(kv["ttft_share"]["p50"], digits=3), compiles,
                     run["num_errors"] if not run["truncated"] else f"{run['num_errors']} (cut)"])
    workload = report["workload"]
    devices = report["devices"]
    title = (f"{report['model']['shape']} {report['dtype']}, vocab {report['model']['vocab_size']}, prefill on "
             f"{devices['prefill']}, decode on {','.join(devices['decode'])}: ShareGPT-shaped, "
             f"{workload['num_requests']} requests, {workload['output_tokens']} output tokens; "
             f"kv share = kv.send / time to token #2")
    return title + "\n" + format_table(headers, rows)


def new_report(args, model: dict, prompts, output_lens) -> dict:
    return {
        "settings": {**{k: v for k, v in vars(args).items() if k not in ("baseline_output", "load_format")},
                     "rates": [f"{rate:g}" for rate in args.rates]},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "model": model, "dtype": args.dtype, "workload": workload_summary(prompts, output_lens),
        "topology": f"1P{args.num_decode}D",
        "devices": {"prefill": args.prefill_device, "decode": args.decode_devices, "baseline": args.baseline_device},
        "runs": {}, "phases_done": [], "skipped": [], "failure": None,
    }


def merge_previous(report: dict, path: str) -> None:
    previous = json.loads(Path(path).read_text())
    if previous.get("workload") != report["workload"]:
        raise SystemExit(f"--previous {path}: a different workload, not merging")
    for name, run in previous.get("runs", {}).items():
        report["runs"].setdefault(name, run)


class Clock:
    """Seconds left of --budget (inf without one), less what stopping the services needs."""

    def __init__(self, budget: float):
        self.end = time.monotonic() + budget if budget > 0 else float("inf")

    def limit(self, wanted: float, reserve: float = SHUTDOWN_RESERVE_SECONDS) -> float:
        return min(wanted, self.end - reserve - time.monotonic())


def serving_plan(args, prompts, output_lens) -> list[tuple[str, str, float, list, list]]:
    """(name, api, rate, prompts, output_lens) of each measured run, in order."""
    plan = []
    if "grpc" in args.phases:
        plan.append(("grpc-inf", "grpc", float("inf"), prompts, output_lens))
    if "http" in args.phases:
        plan.append(("http-inf", "http", float("inf"), prompts, output_lens))
    if "rates" in args.phases:
        count = min(args.requests_per_rate, len(prompts))
        for rate in args.rates:
            plan.append((f"grpc-rate-{rate:g}", "grpc", rate, prompts[:count], output_lens[:count]))
    return plan


def run_services(args, model: dict, report: dict, log_dir: Path, prompts, output_lens, clock: Clock) -> None:
    plan = serving_plan(args, prompts, output_lens)
    if not plan:
        return
    with OtlpCollector() as collector:
        services = Services(log_dir, collector.endpoint)
        try:
            frontend = start_services(args, model, services)
            report["services"] = {s.name: {"device": s.device, "log": str(s.log_path), **s.info}
                                  for s in services.started}
            with grpc.insecure_channel(frontend.address) as channel:
                info = generation_pb2_grpc.GenerationStub(channel).GetModelInfo(
                    generation_pb2.GetModelInfoRequest(), timeout=30)
            target = Target(frontend.address, frontend.info["http_port"], info.model_name)
            print(f"services ready ({info.model_name}, vocab {info.vocab_size}); warming up", flush=True)
            report["warmup"] = warm_up(target, args, model["vocab_size"], args.phases)
            services.check_alive()
            report["compiles_after_warmup"] = compile_counts(all_worker_stats(services))
            collector.clear()
            for name, api, rate, run_prompts, run_lens in plan:
                limit = clock.limit(args.time_limit)
                if limit < 10:
                    report["skipped"].append(name)
                    print(f"{name}: skipped, {limit:.0f} s left of --budget", flush=True)
                    continue
                run = serving_run(name, api, rate, target, services, collector, run_prompts, run_lens, args, limit)
                report["runs"][name] = run
                print(f"{name}: {run['output_tokens_per_s']:.1f} tok/s, {run['num_errors']} errors, "
                      f"kv.send {run['kv']['num_sends']} ({run['kv']['transports']})", flush=True)
                add_ratios(report)
                write_json(args.output, report)
            report["phases_done"] += [p for p in args.phases if p != "engine"]
            report["metrics_files"] = save_metrics(services)
        except ServiceFailure as exc:
            report["failure"] = str(exc)
            print(f"service failure: {exc}", flush=True)
        except Exception as exc:  # noqa: BLE001 - keep what was measured, stop the services, say why
            report["failure"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        finally:
            services.stop()
            save_service_logs_tail(services, report)


def save_metrics(services: Services) -> dict[str, str]:
    """Each service's Prometheus /metrics text, written next to its log; returns the files by service."""
    files = {}
    for service in services.started:
        port = service.info.get("metrics_port")
        if port is None:
            continue
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                text = response.read().decode()
        except OSError as exc:
            print(f"{service.name}: /metrics unreadable ({exc})", flush=True)
            continue
        path = services.log_dir / f"metrics-{service.name}.txt"
        path.write_text(text)
        files[service.name] = str(path)
    return files


def save_service_logs_tail(services: Services, report: dict) -> None:
    """Any service that ended with an error code: its log tail goes to stdout and the report."""
    for service in services.started:
        code = service.popen.returncode
        if code not in (0, -signal.SIGTERM, None):
            tail = service.log_tail()
            report.setdefault("service_exits", {})[service.name] = {"code": code, "log_tail": tail}
            print(f"{service.name} exited with {code}; {service.log_path} ends with:\n{tail}", flush=True)


def run_engine_phase(args, model: dict, report: dict, log_dir: Path, clock: Clock) -> None:
    print(f"engine baseline on {args.baseline_device} (log {log_dir / 'engine-baseline.log'})", flush=True)
    try:
        report["runs"]["engine"] = run_baseline(args, model, log_dir, max(10.0, clock.limit(args.time_limit, 0)))
        report["phases_done"].append("engine")
        print(f"engine: {report['runs']['engine']['useful_output_tokens_per_s']:.1f} tok/s", flush=True)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        report["failure"] = f"engine baseline: {exc}"
        print(exc, flush=True)
    write_json(args.output, report)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.baseline_output:
        return baseline_child(args)
    clock = Clock(args.budget)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # one socket per HTTP request in flight
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    signal.signal(signal.SIGTERM, _interrupt)  # an outer timeout: stop the services, keep what was measured
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="tandem-bench-disagg-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    model = prepare_model(args, log_dir / "model")
    prompts, output_lens = sharegpt_workload(args.num_requests, model["vocab_size"], args.max_input_len,
                                             args.max_output_len)
    report = new_report(args, model, prompts, output_lens)
    report["log_dir"] = str(log_dir)
    if args.previous:
        merge_previous(report, args.previous)
    try:
        if "engine" in args.phases:
            run_engine_phase(args, model, report, log_dir, clock)
        run_services(args, model, report, log_dir, prompts, output_lens, clock)
    except KeyboardInterrupt:
        report["failure"] = report["failure"] or "interrupted (SIGINT/SIGTERM)"
    add_ratios(report)
    report["table"] = table(report)
    write_json(args.output, report)
    transports = sorted({t for run in report["runs"].values()
                         for side in run.get("kv", {}).get("transports", {}).values() for t in side})
    print(f"logs: {log_dir}; KV transports seen: {', '.join(transports) or 'none'}")
    print(report["table"])
    return 1 if report["failure"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
