"""The services a disaggregated-serving run measures: the model folder every process loads, the
prefill/decode workers and the frontend as processes (ready files, logs), and what is read from them
afterwards (GetStats, /metrics, log tails).

    prepare_model ─► log_dir/model/ (config.json + tokenizer files)
    start_services ─► prefill-0, decode-0..N-1 (waves: one worker per GPU at a time) ─► frontend
                      each: `python -m services.cli <role> --port 0 --ready-file <name>.ready.json`,
                      its own process group, output in <name>.log, SIGTERM when the bench dies
    Services.stop ─► SIGTERM frontend first, SIGKILL whatever outlives the grace period
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from common.model.architectures import hf_architecture_name
from common.model.config import ModelConfig
from protos import worker_pb2, worker_pb2_grpc
from services.supervisor import stop_processes

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt")
COMPILES_FIELD = "num_kernel_compiles_after_ready"
# Spans leave each service in batches; a bigger queue than the SDK's 2,048 keeps a burst of 500
# requests (~8 spans each on the frontend) from being dropped, a short delay gets them here sooner.
SPAN_EXPORT_ENV = {"OTEL_BSP_MAX_QUEUE_SIZE": "65536", "OTEL_BSP_SCHEDULE_DELAY": "1000",
                   "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "2048"}


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
        "architectures": [hf_architecture_name(config.architecture)], "model_type": config.architecture,
        "vocab_size": vocab_size,
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


def add_model_args(parser) -> None:
    """The flags every services bench shares for the model it serves (`prepare_model` reads them)."""
    add = parser.add_argument
    add("--model", default="dummy:llama-3-8b", help="dummy:<preset>, an HF folder or a .gguf file")
    add("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    add("--vocab-size", type=int, default=49152, help="dummy models: vocabulary size (the tokenizer's)")
    add("--tokenizer", default="auto", help="dummy models: auto (embedded if installed, else synthetic), "
                                            "embedded, synthetic, or a folder with tokenizer files")


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


# ---- the services as processes ------------------------------------------------------------------


class ServiceFailure(RuntimeError):
    """A service died or did not become ready; the message carries the end of its log."""


def die_with_parent() -> None:
    """In a child process: SIGTERM when the bench dies (an outer timeout), so no service or client
    process outlives it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Service:
    name: str  # prefill-0, decode-1, frontend
    role: str  # prefill | decode | worker (colocated) | frontend
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


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process, from /proc (Linux); None elsewhere or once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


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
                                     start_new_session=True, preexec_fn=die_with_parent)
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
        return [s for s in self.started if s.role in ("prefill", "decode", "worker")]

    def cpu_seconds(self) -> dict[str, float | None]:
        """CPU time each service has used so far, all its threads (None where unreadable); a frontend run
        with --api-server-count N: its own and its N API server processes' together."""
        totals = {}
        for service in self.started:
            seconds = [process_cpu_seconds(pid)
                       for pid in [service.popen.pid, *service.info.get("api_server_pids", [])]]
            totals[service.name] = None if None in seconds else sum(seconds)
        return totals

    def stop(self, grace_seconds: float = 20.0) -> None:
        """SIGTERM, frontend first; SIGKILL whatever outlives the grace period."""
        stop_processes([service.popen for service in reversed(self.started)], grace_seconds)


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
    prefill_devices = getattr(args, "prefill_devices", None) or [args.prefill_device]  # one per prefill worker
    specs = [(f"prefill-{i}", "prefill", device, shlex.split(args.prefill_args))
             for i, device in enumerate(prefill_devices)]
    specs += [(f"decode-{i}", "decode", device, shlex.split(args.decode_args))
              for i, device in enumerate(args.decode_devices)]
    print(f"starting {len(prefill_devices)} prefill and {len(args.decode_devices)} decode workers "
          f"(logs in {services.log_dir})", flush=True)
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
    prefills = [s for s in services.workers() if s.role == "prefill"]
    decodes = [s for s in services.workers() if s.role == "decode"]
    frontend = services.start("frontend", "frontend", None, [
        "--model", model["path"], "--load-format", model["load_format"], "--http-port", "0",
        "--prefill-addresses", ",".join(p.address for p in prefills),
        "--decode-addresses", ",".join(d.address for d in decodes),
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


def stats_dict(stats: worker_pb2.WorkerStats) -> dict:
    """The scalar and list fields of a worker's GetStats, defaults included (the layout left out; the
    cache summary as its number of keys)."""
    values = {f.name: getattr(stats, f.name) for f in stats.DESCRIPTOR.fields if f.message_type is None}
    values["cached_block_keys"] = len(stats.cached_block_keys)  # the cache summary: its size, not its keys
    return {k: v if isinstance(v, (int, float, str, bool)) else list(v) for k, v in values.items()}


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


@contextlib.contextmanager
def stopped_after(services: Services, report: dict, label: str = "") -> Iterator[None]:
    """Runs a measurement on started services and stops them whatever happens; a failure is kept in
    `report["failure"]` (prefixed with `label`), so what was measured before it stays in the report."""
    prefix = f"{label}: " if label else ""
    try:
        yield
    except ServiceFailure as exc:
        report["failure"] = f"{prefix}{exc}"
        print(f"service failure: {exc}", flush=True)
    except Exception as exc:  # noqa: BLE001 - keep what was measured, stop the services, say why
        report["failure"] = f"{prefix}{type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        services.stop()
        save_service_logs_tail(services, report)


def save_service_logs_tail(services: Services, report: dict) -> None:
    """Any service that ended with an error code: its log tail goes to stdout and the report."""
    for service in services.started:
        code = service.popen.returncode
        if code not in (0, -signal.SIGTERM, None):
            tail = service.log_tail()
            report.setdefault("service_exits", {})[service.name] = {"code": code, "log_tail": tail}
            print(f"{service.name} exited with {code}; {service.log_path} ends with:\n{tail}", flush=True)
