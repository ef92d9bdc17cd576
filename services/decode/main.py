"""`tandem decode`: a decode worker (gRPC DecodeWorker; pulls KV from prefill workers over UCX).

    tandem decode --port 50062 [--allowed-kv-senders 10.0.0.5:7000,...] [engine flags: --model, ...]

It also prefills the requests that come with `prefill_here` instead of a KV handle (the short prompts
of conditional disaggregation; `tandem worker`, services/decode/colocated.py, takes every prompt so).

Health is NOT_SERVING while the model loads, then SERVING. Flags fall back to TANDEM_* variables.
A Decode request names the prefill worker to pull its KV from; with --allowed-kv-senders this worker
dials only those addresses (as the prefill workers advertise them: their --kv-host:--kv-port).
"""

from __future__ import annotations

import argparse
import contextlib

from common.engine.args import parse_memory_size
from common.transfer.handle import TRANSFER_TIMEOUT_SECONDS, split_address
from services.common.observability import Observability
from services.common.worker_cli import StartWorker, WorkerParts, WorkerRole, build_worker_parser, env, run_worker
from services.common.worker_setup import create_receiver, kv_layout
from services.decode.servicer import DecodeServicer
from services.decode.worker import DecodeLimits, DecodeWorker

NO_KV_SENDERS = "none"  # --allowed-kv-senders value that refuses every hand-off


def _add_decode_args(parser: argparse.ArgumentParser) -> None:
    # Decode steps are all this worker runs: a larger batch than a mixed engine's fills its GPU, and
    # hand-offs beyond it wait for a slot (their token #1 already streamed) instead of decoding.
    parser.set_defaults(max_num_seqs=512)
    add_handoff_args(parser)


def add_handoff_args(parser: argparse.ArgumentParser) -> None:
    """The flags of a worker that takes KV hand-offs (`tandem decode` and `tandem worker`)."""
    defaults = DecodeLimits()
    parser.add_argument("--kv-transfer-timeout-seconds", type=float,
                        default=float(env("KV_TRANSFER_TIMEOUT_SECONDS", TRANSFER_TIMEOUT_SECONDS)),
                        help="fail a KV pull that takes longer")
    parser.add_argument("--max-num-admitting", type=int,
                        default=int(env("MAX_NUM_ADMITTING", defaults.max_num_admitting)),
                        help="hand-offs waiting for free KV blocks before RESOURCE_EXHAUSTED")
    parser.add_argument("--kv-admission-timeout-seconds", type=float,
                        default=float(env("KV_ADMISSION_TIMEOUT_SECONDS", defaults.admission_timeout_seconds)),
                        help="longest wait for free KV blocks before RESOURCE_EXHAUSTED")
    parser.add_argument("--max-kv-receiving-bytes", type=parse_memory_size,
                        default=parse_memory_size(env("MAX_KV_RECEIVING_BYTES", str(defaults.max_receiving_bytes))),
                        help="KV bytes pulled at once (receive buffers live outside the KV pool's budget)")
    parser.add_argument("--allowed-kv-senders", default=env("ALLOWED_KV_SENDERS"), metavar="HOST:PORT,...",
                        help="pull KV only from these prefill KV addresses; 'none' refuses every hand-off "
                             "(a colocated worker without prefill workers); default: any, logged once")


def parse_kv_senders(text: str | None) -> frozenset[str] | None:
    """'h1:7000,h2:7000' -> those addresses; 'none' -> no address (every hand-off is refused); None (any
    sender) when the flag is not given."""
    if text is None:
        return None
    if text.strip() == NO_KV_SENDERS:
        return frozenset()
    addresses = [address.strip() for address in text.split(",") if address.strip()]
    if not addresses:
        raise ValueError("--allowed-kv-senders needs at least one host:port")
    for address in addresses:
        try:
            split_address(address)
        except ValueError:
            raise ValueError(f"--allowed-kv-senders: expected host:port, got {address!r}") from None
    return frozenset(addresses)


def prepare_worker(args: argparse.Namespace) -> StartWorker:
    if not args.kv_transfer_timeout_seconds > 0:
        raise ValueError(f"--kv-transfer-timeout-seconds must be > 0, got {args.kv_transfer_timeout_seconds:g}")
    limits = DecodeLimits(args.max_num_admitting, args.kv_admission_timeout_seconds, args.max_kv_receiving_bytes)
    allowed_kv_senders = parse_kv_senders(args.allowed_kv_senders)

    def start(engine, obs: Observability, cleanup: contextlib.ExitStack) -> WorkerParts:
        receiver = create_receiver(args.kv_transfer_backend, kv_layout(engine), args.kv_transfer_timeout_seconds)
        cleanup.callback(receiver.close)
        return WorkerParts(DecodeWorker(engine, receiver, limits, obs, allowed_kv_senders))

    return start


ROLE = WorkerRole(
    name="decode",
    description=__doc__.split("\n")[0],
    default_port=50062,
    service_name="tandem.worker.v1.DecodeWorker",
    servicer_type=DecodeServicer,
    add_args=_add_decode_args,
    prepare=prepare_worker,
)


def build_parser() -> argparse.ArgumentParser:
    return build_worker_parser(ROLE)


def main(argv: list[str]) -> int:
    return run_worker(ROLE, argv)
