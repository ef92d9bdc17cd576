"""The command line and lifecycle `tandem prefill` and `tandem decode` share; a WorkerRole says what differs.

    parse and validate flags (bad flag: print it, exit 2) ─► configure logging
    ─► gRPC server up, NOT_SERVING (port taken: print it, exit 1) ─► load the model ─► kernel warm-up
    ─► observability ─► role.prepare's start builds the worker and its KV transport ─► worker.start()
    ─► SERVING, ready file
    ─► SIGINT/SIGTERM ─► stop the server, the worker, the transport, observability (in that order)

Flags fall back to TANDEM_* environment variables, read here only when the parser is built.
--ssl-certfile/--ssl-keyfile serve gRPC over TLS only (--ssl-cert-reqs 2 + --ssl-ca-certs: mutual TLS,
the frontend must present a certificate); the KV hand-off over UCX is not TLS (docs/architecture.md).
`check_worker_argv` runs the same parsing and validation without starting anything (`tandem serve`
checks every worker's flags with it before it starts one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from common import tracing
from common.engine.args import add_engine_args, engine_config_from_args
from common.engine.config import EngineConfig
from common.heap import freeze_startup_heap
from common.tls import ServerTLS, add_server_tls_args, server_tls_from_args
from services.common.observability import Observability, add_observability_args
from services.common.server import configure_process, start_server, wait_for_shutdown, write_ready_file
from services.common.tolerant_decoding import add_tolerant_servicer, service_descriptor
from services.common.worker_setup import TRANSFER_BACKENDS, load_engine, warm_up_kernels


def env(name: str, default=None):
    """TANDEM_<name> from the environment (flags win; read only in `main`)."""
    return os.environ.get(f"TANDEM_{name}", default)


def add_worker_args(parser: argparse.ArgumentParser, default_port: int) -> None:
    parser.add_argument("--host", default=env("HOST", "0.0.0.0"), help="gRPC and /metrics bind address")
    parser.add_argument("--port", type=int, default=int(env("PORT", str(default_port))),
                        help="gRPC port (0 = any free port; see --ready-file)")
    parser.add_argument("--kv-transfer-backend", choices=TRANSFER_BACKENDS, default=env("KV_TRANSFER_BACKEND", "ucx"),
                        help="ucx (real); fake works only with both workers in one process (tests)")
    parser.add_argument("--kv-host", default=env("KV_HOST", "127.0.0.1"),
                        help="host other workers use to reach this worker's UCX listener")
    parser.add_argument("--ready-file", default=None, help="write {port, kv_address} as JSON here once serving")
    parser.add_argument("--log-level", default=env("LOG_LEVEL", "INFO"))
    add_server_tls_args(parser, "gRPC")


@dataclass(frozen=True)
class WorkerParts:
    """What a role's start builds once the model is loaded (its KV transport is closed via `cleanup`)."""

    worker: Any  # PrefillWorker | DecodeWorker: start(), stop(); handed to the servicer
    ready_fields: dict[str, Any] = field(default_factory=dict)  # ready-file fields after `port`
    log_detail: str = ""  # appended to the "serving" log line, e.g. ", KV listener host:port"


# start(engine, observability, cleanup) -> WorkerParts; pushes the close of what it opens onto `cleanup`.
StartWorker = Callable[[Any, Observability, contextlib.ExitStack], WorkerParts]


@dataclass(frozen=True)
class WorkerRole:
    """What differs between the prefill and the decode worker commands."""

    name: str  # "prefill" | "decode": the subcommand, the tracing/metrics role, the logger suffix
    description: str  # one line for --help
    default_port: int  # gRPC port without --port or TANDEM_PORT
    service_name: str  # full gRPC service name, served with health and reflection
    servicer_type: type  # its `.worker` is set once the model is loaded
    add_args: Callable[[argparse.ArgumentParser], None]  # the role's own flags
    prepare: Callable[[argparse.Namespace], StartWorker]  # validates the role's flags (ValueError names one)


def build_worker_parser(role: WorkerRole) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"tandem {role.name}", description=role.description, allow_abbrev=False)
    add_worker_args(parser, default_port=role.default_port)
    role.add_args(parser)
    add_observability_args(parser)
    add_engine_args(parser)
    return parser


def _raise_flag_error(message: str) -> None:
    raise ValueError(message)


@dataclass(frozen=True)
class WorkerCommand:
    """A worker's parsed and validated command line."""

    args: argparse.Namespace
    engine_config: EngineConfig
    tls: ServerTLS | None  # the gRPC listener's TLS; None = plaintext
    start: StartWorker


def parse_worker_argv(role: WorkerRole, argv: list[str], is_dry_run: bool = False) -> WorkerCommand:
    """The worker's flags, its engine config, its TLS and its start; ValueError (one line) on a bad value.
    `is_dry_run`: a bad or unknown flag raises ValueError too, instead of printing usage and exiting."""
    parser = build_worker_parser(role)
    if is_dry_run:
        parser.error = _raise_flag_error  # argparse would print the worker's usage and exit
    args = parser.parse_args(argv)
    return WorkerCommand(args, engine_config_from_args(args), server_tls_from_args(args), role.prepare(args))


def check_worker_argv(role: WorkerRole, argv: list[str]) -> argparse.Namespace:
    """Parses and validates a worker's command line as `run_worker` would, starting nothing;
    ValueError (one line, naming the flag) if the worker would refuse it."""
    return parse_worker_argv(role, argv, is_dry_run=True).args


async def serve_worker(role: WorkerRole, command: WorkerCommand) -> int:
    """Serves until SIGINT/SIGTERM (0), or 1 when the gRPC port cannot be bound."""
    args = command.args
    logger = logging.getLogger(f"tandem.{role.name}")
    servicer = role.servicer_type()
    tracing_handle = tracing.init_tracing(role.name, args.otlp_traces_endpoint)
    try:
        running = await start_server(
            lambda server: add_tolerant_servicer(servicer, server, service_descriptor(role.service_name)),
            [role.service_name], args.host, args.port, interceptors=tracing_handle.server_interceptors(),
            tls=command.tls,
        )
    except OSError as exc:  # the port is taken: one line, no traceback
        print(f"tandem {role.name}: {exc}", file=sys.stderr)
        tracing_handle.shutdown()
        return 1
    shutdown = asyncio.ensure_future(wait_for_shutdown())
    with contextlib.ExitStack() as cleanup:  # closes after the server stops, last opened first
        try:
            engine = await load_engine(command.engine_config)
            await asyncio.to_thread(warm_up_kernels, engine)  # no Triton compile once SERVING
            obs = Observability.start(tracing_handle, role.name, engine.model_name, args.metrics_port,
                                      metrics_host=args.host)
            cleanup.callback(obs.close)
            parts = command.start(engine, obs, cleanup)
            cleanup.callback(parts.worker.stop)
            parts.worker.start()
            servicer.worker = parts.worker
            freeze_startup_heap()  # the loaded model and code stay out of every later collection
            await running.mark_serving()
            write_ready_file(args.ready_file, port=running.port, **parts.ready_fields,
                             metrics_port=obs.metrics_server.port if obs.metrics_server else None,
                             otlp_traces_endpoint=tracing_handle.endpoint)
            logger.info("%s worker serving %s on port %d%s", role.name, engine.model_name, running.port,
                        parts.log_detail)
            logger.info("%s received, stopping", await shutdown)
        finally:
            await running.stop()
    return 0


def run_worker(role: WorkerRole, argv: list[str]) -> int:
    """`main` of a worker subcommand: 0 after a clean shutdown, 2 on a bad flag, 1 on a taken port."""
    try:
        command = parse_worker_argv(role, argv)
    except ValueError as exc:
        print(f"tandem {role.name}: {exc}", file=sys.stderr)
        return 2
    configure_process(command.args.log_level)
    return asyncio.run(serve_worker(role, command))
