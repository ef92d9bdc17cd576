"""`tandem decode`: a decode worker (gRPC DecodeWorker; pulls KV from prefill workers over UCX).

    tandem decode --port 50062 [engine flags: --model, --block-size, --max-num-seqs, ...]

Health is NOT_SERVING while the model loads, then SERVING. Flags fall back to TANDEM_* variables.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from common.engine.args import add_engine_args, engine_config_from_args
from common.engine.config import EngineConfig
from common import tracing
from protos import worker_pb2_grpc
from services.common.observability import Observability, add_observability_args
from services.common.server import configure_logging, start_server, wait_for_shutdown, write_ready_file
from services.common.worker_setup import add_worker_args, create_receiver, env, kv_layout, load_engine
from services.decode.servicer import DecodeServicer
from services.decode.worker import DecodeLimits, DecodeWorker

logger = logging.getLogger("tandem.decode")

SERVICE_NAME = "tandem.worker.v1.DecodeWorker"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem decode", description=__doc__.split("\n")[0])
    add_worker_args(parser, default_port=50062)
    parser.add_argument("--kv-transfer-timeout-seconds", type=float, default=float(env("KV_TRANSFER_TIMEOUT_SECONDS", "30")),
                        help="fail a KV pull that takes longer")
    parser.add_argument("--max-num-admitting", type=int, default=int(env("MAX_NUM_ADMITTING", "256")),
                        help="hand-offs waiting for free KV blocks before RESOURCE_EXHAUSTED")
    parser.add_argument("--kv-admission-timeout-seconds", type=float,
                        default=float(env("KV_ADMISSION_TIMEOUT_SECONDS", "30")),
                        help="longest wait for free KV blocks before RESOURCE_EXHAUSTED")
    add_observability_args(parser)
    add_engine_args(parser)
    return parser


async def serve(args: argparse.Namespace, engine_config: EngineConfig, limits: DecodeLimits) -> None:
    servicer = DecodeServicer()
    tracing_handle = tracing.init_tracing("decode", args.otlp_traces_endpoint)
    running = await start_server(
        lambda server: worker_pb2_grpc.add_DecodeWorkerServicer_to_server(servicer, server),
        [SERVICE_NAME], args.host, args.port, interceptors=tracing_handle.server_interceptors(),
    )
    shutdown = asyncio.ensure_future(wait_for_shutdown())
    worker = receiver = obs = None
    try:
        engine = await load_engine(engine_config)
        obs = Observability.start(tracing_handle, "decode", engine.model_name, args.metrics_port)
        receiver = create_receiver(args.kv_transfer_backend, kv_layout(engine), args.kv_transfer_timeout_seconds)
        worker = DecodeWorker(engine, receiver, limits, obs)
        worker.start()
        servicer.worker = worker
        await running.mark_serving()
        write_ready_file(args.ready_file, port=running.port,
                         metrics_port=obs.metrics_server.port if obs.metrics_server else None,
                         otlp_traces_endpoint=tracing_handle.endpoint)
        logger.info("decode worker serving %s on port %d", engine.model_name, running.port)
        logger.info("%s received, stopping", await shutdown)
    finally:
        await running.stop()
        if worker is not None:
            worker.stop()
        if receiver is not None:
            receiver.close()
        if obs is not None:
            obs.close()


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        engine_config = engine_config_from_args(args)
        limits = DecodeLimits(args.max_num_admitting, args.kv_admission_timeout_seconds)
    except ValueError as exc:
        print(f"tandem decode: {exc}")
        return 2
    asyncio.run(serve(args, engine_config, limits))
    return 0
