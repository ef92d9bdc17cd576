"""`tandem serve`: the whole system on one machine, each service its own process.

    tandem serve [--num-prefill 1] [--num-decode 1] [--port 50051] [--api-server-count 1]
                 [engine flags, e.g. --model, --block-size]
                 [--device cuda:0 | --prefill-devices 0 --decode-devices 1]
    tandem serve --colocated [--num-workers 1] [--device cuda:0 | --worker-devices 0 1]
                 [--worker-gpu-memory-utilization X]
                 [--prefill-gpu-memory-utilization X] [--decode-gpu-memory-utilization Y]
                 [--worker-host 127.0.0.1] [--otlp-traces-endpoint URL] [--log-dir DIR]
                 [--ssl-certfile C --ssl-keyfile K [--ssl-ca-certs CA] [--ssl-cert-reqs 2]]

Checks every flag before it starts anything: its own, the placement (`services.placement`: which GPU,
what share of it), and each worker's whole command line, parsed by the worker's own parser and built
into its configs as a dry run; a bad one is a one-line error and exit code 2. Then it starts P prefill
and D decode workers (gRPC on free ports, each prefill's KV listener on a port picked here so that the
decode workers can be told which KV senders to trust), waits until they are SERVING, starts the
frontend pointed at them, waits for it, and prints where to connect.

With --colocated it starts colocated workers instead (`tandem worker`: one engine serves whole requests,
prefill and decode; no prefill worker and no KV hand-off, `--allowed-kv-senders none`), by default one
on the --device, and the frontend sends them every prompt. `--worker-devices 0 1` puts one on each GPU.

While it runs, a worker that dies is restarted on its port after a back-off and the others keep
serving (`services.supervisor`). The frontend is not restarted: if it dies, everything stops and
`tandem serve` exits 1, for whatever runs it (systemd, a container runtime) to restart; with
--api-server-count N its N processes fail as one (services/frontend/api_servers.py). Ctrl-C or
SIGTERM stops every service, frontend first. Services log to files under --log-dir; without it, to a
temporary folder removed at exit.

With --ssl-certfile and --ssl-keyfile every service serves TLS only and gets the same four --ssl-*
flags: the frontend's gRPC and HTTP APIs, and the workers' gRPC, which the frontend dials over TLS
presenting that same certificate (so with --ssl-cert-reqs 2 it needs both the serverAuth and the
clientAuth extended key usage, or none). Health checks here dial over TLS too. The certificate must
name `localhost` and the --worker-host address (127.0.0.1 by default). KV still moves over UCX,
without TLS, between these workers only (--allowed-kv-senders).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from common.tls import ClientTLS, ServerTLS, add_server_tls_args, server_tls_from_args
from services.placement import PlacementFlags, WorkerPlacement, describe, place_colocated_workers, place_workers
from services.supervisor import Launcher, Service, dial_address

__all__ = ["Launcher", "Service", "build_parser", "main"]

# Set by `tandem serve` for each worker, so not accepted among the flags passed through to them.
_PER_WORKER_FLAGS = ("--kv-host", "--kv-port", "--allowed-kv-senders")


class _OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message: str):  # a ValueError for `main` to print in one line, not the usage text
        raise ValueError(message)


def build_parser() -> argparse.ArgumentParser:
    epilog = ("Unrecognized flags (engine and worker flags) are passed to every worker, so each must be one "
              "that both `tandem prefill` and `tandem decode` take.")
    parser = _OneLineErrorParser(prog="tandem serve", description=__doc__.split("\n")[0], allow_abbrev=False,
                                 epilog=epilog)
    parser.add_argument("--num-prefill", type=int, default=1, help="prefill workers to start")
    parser.add_argument("--num-decode", type=int, default=1, help="decode workers to start")
    parser.add_argument("--device", default="auto",
                        help="auto, cpu, cuda or cuda:N: every worker there, sharing the GPU's memory by role")
    parser.add_argument("--prefill-devices", nargs="+", default=[], metavar="GPU",
                        help="GPU indices for prefill workers (round-robin), e.g. 0 or 0,1; with --decode-devices")
    parser.add_argument("--decode-devices", nargs="+", default=[], metavar="GPU",
                        help="GPU indices for decode workers (round-robin), e.g. 1 or 1 2 3")
    parser.add_argument("--prefill-gpu-memory-utilization", type=float, default=None, metavar="SHARE",
                        help="each prefill worker's share of its GPU (default 0.25 beside decode workers)")
    parser.add_argument("--decode-gpu-memory-utilization", type=float, default=None, metavar="SHARE",
                        help="each decode worker's share of its GPU (default: what is left of 0.9, split evenly)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--colocated", action="store_true",
                        help="colocated workers (tandem worker: prefill and decode in one engine) instead of "
                             "prefill and decode workers")
    parser.add_argument("--num-workers", type=int, default=1, help="--colocated: workers to start")
    parser.add_argument("--worker-devices", nargs="+", default=[], metavar="GPU",
                        help="--colocated: GPU indices for the workers (round-robin), e.g. 0 1: one per GPU")
    parser.add_argument("--worker-gpu-memory-utilization", type=float, default=None, metavar="SHARE",
                        help="--colocated: each worker's share of its GPU (default: 0.9 split evenly)")
    parser.add_argument("--host", default="0.0.0.0", help="frontend bind address")
    parser.add_argument("--port", type=int, default=50051, help="frontend port (0 = any free port)")
    parser.add_argument("--http-port", type=int, default=8000,
                        help="frontend's OpenAI-compatible HTTP port (0 = any free port, -1 = off)")
    parser.add_argument("--api-server-count", type=int, default=1,
                        help="frontend processes serving its gRPC and HTTP ports (tandem frontend --api-server-count)")
    parser.add_argument("--worker-host", default="127.0.0.1",
                        help="workers' gRPC and /metrics bind address, and the address their KV is pulled from")
    parser.add_argument("--model", default=None, help="model for every service; default: the embedded SmolLM2")
    parser.add_argument("--kv-lease-seconds", type=float, default=None, help="prefill workers' KV lease")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on the frontend's gRPC and HTTP APIs (handed to "
                             "the frontend in TANDEM_API_KEY, never on a command line)")
    add_server_tls_args(parser, "every service's gRPC and the HTTP API")
    parser.add_argument("--otlp-traces-endpoint", default=None,
                        help="OTLP/gRPC collector for every service, frontend included (one trace per request)")
    parser.add_argument("--threads-per-service", type=int, default=1, help="torch threads in each service")
    parser.add_argument("--ready-timeout", type=float, default=600.0,
                        help="seconds to wait for every service (and for a restarted worker)")
    parser.add_argument("--log-dir", default=None, help="where services log (default: a temporary folder, "
                                                        "removed at exit)")
    parser.add_argument("--ready-file", default=None, help="write every service's address here as JSON once up")
    return parser


def plan_workers(args: argparse.Namespace, num_gpus: int | None) -> list[WorkerPlacement]:
    """Checks the placement flags (ValueError: one line naming the flag) before anything starts."""
    if args.gpu_memory_utilization is not None:
        raise ValueError("--gpu-memory-utilization is per worker here: use --prefill-gpu-memory-utilization "
                         "and --decode-gpu-memory-utilization (--worker-gpu-memory-utilization with --colocated)")
    if args.colocated:
        _check_no_disaggregation_flags(args)
        return place_colocated_workers(args.num_workers, args.device, tuple(args.worker_devices),
                                       args.worker_gpu_memory_utilization, num_gpus)
    for flag in ("num_workers", "worker_devices", "worker_gpu_memory_utilization"):
        if getattr(args, flag) != build_parser().get_default(flag):
            raise ValueError(f"--{flag.replace('_', '-')} goes with --colocated")
    flags = PlacementFlags(args.num_prefill, args.num_decode, args.device, tuple(args.prefill_devices),
                           tuple(args.decode_devices), args.prefill_gpu_memory_utilization,
                           args.decode_gpu_memory_utilization)
    return place_workers(flags, num_gpus)


def _check_no_disaggregation_flags(args: argparse.Namespace) -> None:
    """--colocated starts no prefill or decode worker: their flags would be silently ignored."""
    defaults = build_parser()
    for flag in ("num_prefill", "num_decode", "prefill_devices", "decode_devices", "prefill_gpu_memory_utilization",
                 "decode_gpu_memory_utilization", "kv_lease_seconds"):
        if getattr(args, flag) != defaults.get_default(flag):
            raise ValueError(f"--{flag.replace('_', '-')} does not go with --colocated (no prefill or decode "
                             f"workers; --num-workers, --worker-devices)")


def kv_host(args: argparse.Namespace) -> str:
    """The address prefill workers advertise for their KV (their listener listens on every interface)."""
    return "127.0.0.1" if args.worker_host in ("", "0.0.0.0", "::") else args.worker_host


def tls_argv(args: argparse.Namespace) -> list[str]:
    """The --ssl-* flags every service gets, as given to tandem serve (absolute paths)."""
    argv = []
    for flag in ("--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certs"):
        path = getattr(args, flag[2:].replace("-", "_"))
        if path:
            argv += [flag, os.path.abspath(path)]
    return [*argv, "--ssl-cert-reqs", str(args.ssl_cert_reqs)] if argv else []


def worker_argv(placement: WorkerPlacement, args: argparse.Namespace, engine_argv: list[str],
                kv_ports: dict[str, int]) -> list[str]:
    """The `tandem prefill|decode` command line of one worker; `kv_ports`: prefill worker name -> KV port."""
    argv = [placement.role, "--host", args.worker_host, "--port", "0"]
    if args.model:
        argv += ["--model", args.model]
    if placement.role == "prefill":
        argv += ["--kv-host", kv_host(args), "--kv-port", str(kv_ports[placement.name])]
        if args.kv_lease_seconds is not None:
            argv += ["--kv-lease-seconds", str(args.kv_lease_seconds)]
    elif kv_ports:
        argv += ["--allowed-kv-senders", ",".join(f"{kv_host(args)}:{port}" for port in kv_ports.values())]
    else:  # colocated: no prefill worker, so no hand-off is ever legitimate
        argv += ["--allowed-kv-senders", "none"]
    if args.otlp_traces_endpoint:
        argv += ["--otlp-traces-endpoint", args.otlp_traces_endpoint]
    return [*argv, *tls_argv(args), *placement.argv(), *engine_argv]


def frontend_argv(args: argparse.Namespace, prefill_addresses: list[str], decode_addresses: list[str]) -> list[str]:
    argv = ["frontend", "--host", args.host, "--port", str(args.port), "--http-port", str(args.http_port)]
    if args.api_server_count != 1:
        argv += ["--api-server-count", str(args.api_server_count)]
    if args.model:
        argv += ["--model", args.model]
    if args.otlp_traces_endpoint:
        argv += ["--otlp-traces-endpoint", args.otlp_traces_endpoint]
    argv += tls_argv(args)
    if prefill_addresses:
        argv += ["--prefill-addresses", ",".join(prefill_addresses)]
    return [*argv, "--decode-addresses", ",".join(decode_addresses)]


def _check_own_flags(args: argparse.Namespace, engine_argv: list[str]) -> None:
    for arg in engine_argv:
        if arg.partition("=")[0] in _PER_WORKER_FLAGS:
            raise ValueError(f"{arg.partition('=')[0]} is set by tandem serve for each worker")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if not -1 <= args.http_port <= 65535:
        raise ValueError(f"--http-port must be in [-1, 65535], got {args.http_port}")
    if args.api_server_count < 1:
        raise ValueError(f"--api-server-count must be >= 1, got {args.api_server_count}")
    if args.threads_per_service < 1:
        raise ValueError(f"--threads-per-service must be >= 1, got {args.threads_per_service}")
    if not args.ready_timeout > 0:
        raise ValueError(f"--ready-timeout must be > 0, got {args.ready_timeout:g}")
    server_tls_from_args(args)  # ValueError naming the --ssl-* flag


def check_flags(args: argparse.Namespace, engine_argv: list[str], placements: list[WorkerPlacement],
                kv_ports: dict[str, int]) -> dict[str, list[str]]:
    """Every worker's command line by name, each parsed and built into its configs by the worker's own
    code without starting anything; ValueError (one line) for the first flag that would fail."""
    from services.common.worker_cli import check_worker_argv
    from services.decode.colocated import ROLE as WORKER
    from services.decode.main import ROLE as DECODE
    from services.prefill.main import ROLE as PREFILL

    _check_own_flags(args, engine_argv)
    argvs = {p.name: worker_argv(p, args, engine_argv, kv_ports) for p in placements}
    parsed = {}
    for placement in placements:
        try:
            role = {"prefill": PREFILL, "decode": DECODE, "worker": WORKER}[placement.role]
            parsed[placement.name] = check_worker_argv(role, argvs[placement.name][1:])
        except ValueError as exc:
            raise ValueError(f"{placement.name}: {exc}") from None
    worker_args = next(iter(parsed.values()))
    if worker_args.metrics_port > 0 and len(placements) > 1:
        raise ValueError(f"--metrics-port {worker_args.metrics_port} would be every worker's: use 0 (free ports)")
    check_model(args.model, worker_args.load_format)
    return argvs


def check_model(model: str | None, load_format: str) -> None:
    """`--model` names something loadable (ValueError otherwise); reads no weights and converts nothing."""
    from common.model.registry import embedded_gguf_path, resolve_model

    try:
        if model is None:
            embedded_gguf_path()
            return
        path = Path(model).expanduser()
        needs_conversion = (path.is_file() and path.suffix == ".gguf") or (
            path.is_dir() and not (path / "config.json").is_file() and len(list(path.glob("*.gguf"))) == 1)
        if not needs_conversion:  # resolved at once: an HF folder, dummy:<preset>, a cached hub repo, or an error
            resolve_model(model, load_format)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--model: {exc}") from None


def free_port() -> int:
    """A TCP port free on every interface now (for a listener started later by a worker)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def visible_gpu_count() -> int | None:
    """GPUs the workers will see (CUDA_VISIBLE_DEVICES, else NVML; no CUDA context); None if unknown."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [entry.strip() for entry in visible.split(",")]  # CUDA stops at the first invalid entry
        return next((i for i, entry in enumerate(entries) if not entry or entry.startswith("-")), len(entries))
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return 0  # no driver: no GPU
    try:
        return pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()


def _start_system(launcher: Launcher, args: argparse.Namespace, placements: list[WorkerPlacement],
                  argvs: dict[str, list[str]]) -> tuple[Service, list[Service], list[Service]]:
    workers = [launcher.start(p.name, argvs[p.name], is_restartable=True) for p in placements]
    prefills = [w for w, p in zip(workers, placements) if p.role == "prefill"]
    decodes = [w for w, p in zip(workers, placements) if p.role != "prefill"]  # decode or colocated workers
    for line in describe(placements):
        print(line, flush=True)
    where = "" if args.log_dir else ", removed at exit"
    kinds = (f"{len(decodes)} colocated" if args.colocated else
             f"{len(prefills)} prefill and {len(decodes)} decode")
    print(f"starting {kinds} workers (logs in {launcher.log_dir}{where})", flush=True)
    launcher.wait_ready([*prefills, *decodes], args.ready_timeout)
    frontend = launcher.start("frontend", frontend_argv(args, [s.address for s in prefills],
                                                        [s.address for s in decodes]))
    launcher.wait_ready([frontend], args.ready_timeout)
    http_port = json.loads(frontend.ready_file.read_text()).get("http_port")
    scheme = "https" if args.ssl_certfile else "http"
    frontend.http_url = f"{scheme}://{dial_address(args.host, http_port)}/v1" if http_port is not None else ""
    return frontend, prefills, decodes


def _write_ready_file(path: str | None, launcher: Launcher, frontend: Service, prefills: list[Service],
                      decodes: list[Service]) -> None:
    """Every service's address, and its pid (updated when a worker restarts)."""
    if path:
        Path(path).write_text(json.dumps({
            "frontend": frontend.address,
            "http": frontend.http_url,
            "prefill": [s.address for s in prefills],
            "decode": [s.address for s in decodes],
            "pids": {s.name: s.process.pid for s in launcher.services},
        }))


def health_tls(tls: ServerTLS | None) -> ClientTLS | None:
    """How this launcher dials services that serve `tls`: trusting its CA, presenting its certificate."""
    return None if tls is None else ClientTLS(tls.ca_certs, tls.certfile, tls.keyfile)


def _client_tls_hint(tls: ServerTLS | None) -> str:
    """The TLS flags `tandem generate` needs to reach the frontend, e.g. " --ssl-ca-certs ca.pem"."""
    if tls is None:
        return ""
    hint = f" --ssl-ca-certs {tls.ca_certs}" if tls.ca_certs else " --tls"
    return hint + (" --ssl-certfile CERT --ssl-keyfile KEY" if tls.is_mutual else "")


def main(argv: list[str]) -> int:
    try:
        args, engine_argv = build_parser().parse_known_args(argv)
        placements = plan_workers(args, visible_gpu_count())
        kv_ports = {p.name: free_port() for p in placements if p.role == "prefill"}
        argvs = check_flags(args, engine_argv, placements, kv_ports)
    except ValueError as exc:
        print(f"tandem serve: {exc}", file=sys.stderr)
        return 2
    if args.api_key is not None:
        if not args.api_key:
            print("tandem serve: --api-key must not be empty", file=sys.stderr)
            return 2
        os.environ["TANDEM_API_KEY"] = args.api_key  # the services inherit it; only the frontend reads it
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="tandem-serve-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    launcher = Launcher(log_dir, args.threads_per_service, ready_timeout_seconds=args.ready_timeout)
    tls = server_tls_from_args(args)
    launcher.health_tls = health_tls(tls)
    stop_requested: list[str] = []

    def request_stop(signum, _frame) -> None:
        stop_requested.append(signal.Signals(signum).name)
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: it may arrive ignored from a parent shell
        signal.signal(sig, request_stop)
    try:
        frontend, prefills, decodes = _start_system(launcher, args, placements, argvs)
        _write_ready_file(args.ready_file, launcher, frontend, prefills, decodes)
        print(f"Tandem is serving on {frontend.address} (tandem.v1.Generation; Ctrl-C stops it)")
        print(f"try:  tandem generate --address {frontend.address}{_client_tls_hint(tls)} "
              '"What is the capital of France?"', flush=True)
        if frontend.http_url:
            print(f"OpenAI-compatible HTTP API: {frontend.http_url} (curl {frontend.http_url}/models)", flush=True)
        while True:
            if launcher.supervise():  # workers came back: their new pids
                _write_ready_file(args.ready_file, launcher, frontend, prefills, decodes)
            time.sleep(0.5)
    except KeyboardInterrupt:
        print(f"\nstopping ({stop_requested[0] if stop_requested else 'SIGINT'})", flush=True)
        return 0
    except RuntimeError as exc:
        print(f"tandem serve: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal must not cut the shutdown short
            signal.signal(sig, signal.SIG_IGN)
        launcher.stop_all()
        if not args.log_dir:
            shutil.rmtree(log_dir, ignore_errors=True)
