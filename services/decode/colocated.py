"""`tandem worker`: a colocated worker, one engine that serves whole requests (prefill and decode).

    tandem worker --port 50063 [--allowed-kv-senders none] [engine flags: --model, ...]

It is the decode worker (the same gRPC DecodeWorker service, the same DecodeStream the frontend keeps to
it) with the engine defaults of a worker that also prefills: the frontend sends each request with
`prefill_here` (prompt only, no KV handle) and token #1 streams back like every later token. It can
still take KV hand-offs from prefill workers in a mixed cluster (`--allowed-kv-senders` as for
`tandem decode`; `none` refuses them). Its GetStats role is "decode", the service it serves; traces
and metrics name it "worker".
"""

from __future__ import annotations

import argparse

from services.common.worker_cli import WorkerRole, build_worker_parser, run_worker
from services.decode.main import add_handoff_args, prepare_worker
from services.decode.servicer import DecodeServicer


def _add_colocated_args(parser: argparse.ArgumentParser) -> None:
    # Prefill and decode share its steps: the engine's own --max-num-seqs default (not the 512 of a
    # worker that only decodes), so a prompt's step is not held up behind a huge decode batch.
    add_handoff_args(parser)


ROLE = WorkerRole(
    name="worker",
    description=__doc__.split("\n")[0],
    default_port=50063,
    service_name="tandem.worker.v1.DecodeWorker",
    servicer_type=DecodeServicer,
    add_args=_add_colocated_args,
    prepare=prepare_worker,
)


def build_parser() -> argparse.ArgumentParser:
    return build_worker_parser(ROLE)


def main(argv: list[str]) -> int:
    return run_worker(ROLE, argv)
