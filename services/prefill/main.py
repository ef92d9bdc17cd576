"""`tandem prefill`: a prefill worker (gRPC PrefillWorker + a UCX listener serving its KV).

    tandem prefill --port 50061 --kv-host 10.0.0.5 [engine flags: --model, --block-size, ...]

Health is NOT_SERVING while the model loads, then SERVING. Flags fall back to TANDEM_* variables.
gRPC and /metrics bind --host; the UCX listener listens on every interface whatever --host says
(ucxx's create_listener takes a port, no address): --kv-host is only the address decode workers dial.
"""

from __future__ import annotations

import argparse
import contextlib

from services.common.observability import Observability
from services.common.worker_cli import StartWorker, WorkerParts, WorkerRole, build_worker_parser, env, run_worker
from services.common.worker_setup import create_sender
from services.prefill.servicer import PrefillServicer
from services.prefill.worker import DEFAULT_KV_LEASE_SECONDS, DEFAULT_MAX_NUM_WAITING, PrefillWorker


def _add_prefill_args(parser: argparse.ArgumentParser) -> None:
    # The pool holds prompts in flight and hand-offs awaiting their pull, not whole generations.
    parser.set_defaults(kv_role="kv_producer")
    parser.add_argument("--kv-port", type=int, default=int(env("KV_PORT", "0")),
                        help="UCX listener port (0 = any free port)")
    parser.add_argument("--kv-lease-seconds", type=float,
                        default=float(env("KV_LEASE_SECONDS", DEFAULT_KV_LEASE_SECONDS)),
                        help="free a prompt's KV if no decode worker pulled it within this time")
    parser.add_argument("--max-num-waiting", type=int, default=int(env("MAX_NUM_WAITING", DEFAULT_MAX_NUM_WAITING)),
                        help="queued prompts before RESOURCE_EXHAUSTED")


def _prepare(args: argparse.Namespace) -> StartWorker:
    if not args.kv_lease_seconds > 0:
        raise ValueError(f"--kv-lease-seconds must be > 0, got {args.kv_lease_seconds:g}")
    if args.max_num_waiting < 1:
        raise ValueError(f"--max-num-waiting must be >= 1, got {args.max_num_waiting}")
    if not 0 <= args.kv_port <= 65535:
        raise ValueError(f"--kv-port must be in [0, 65535], got {args.kv_port}")

    def start(engine, obs: Observability, cleanup: contextlib.ExitStack) -> WorkerParts:
        worker = PrefillWorker(engine, args.kv_lease_seconds, args.max_num_waiting, obs)
        sender = create_sender(args.kv_transfer_backend, worker.layout, engine.kv_pool.start_gather,
                               worker.on_release, args.kv_host, args.kv_port)
        cleanup.callback(sender.close)
        worker.attach_sender(sender)
        return WorkerParts(worker, {"kv_address": sender.address}, f", KV listener {sender.address}")

    return start


ROLE = WorkerRole(
    name="prefill",
    description=__doc__.split("\n")[0],
    default_port=50061,
    service_name="tandem.worker.v1.PrefillWorker",
    servicer_type=PrefillServicer,
    add_args=_add_prefill_args,
    prepare=_prepare,
)


def build_parser() -> argparse.ArgumentParser:
    return build_worker_parser(ROLE)


def main(argv: list[str]) -> int:
    return run_worker(ROLE, argv)
