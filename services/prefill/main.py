"""`tandem prefill`: a prefill worker (gRPC PrefillWorker + a UCX listener serving its KV).

    tandem prefill --port 50061 --kv-host 10.0.0.5 [engine flags: --model, --block-size, ...]

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
from services.common.worker_setup import add_worker_args, create_sender, env, load_engine
from services.prefill.servicer import PrefillServicer
from services.prefill.worker import PrefillWorker

logger = logging.getLogger("tandem.prefill")

SERVICE_NAME = "tandem.worker.v1.PrefillWorker"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem prefill", description=__doc__.split("\n")[0])
    add_worker_args(parser, default_port=50061)
    parser.add_argument("--kv-port", type=int, default=int(env("KV_PORT", "0")),
                        help="UCX listener port (0 = any free port)")
    parser.add_argument("--kv-lease-seconds", type=float, default=float(env("KV_LEASE_SECONDS", "60")),
                        help="free a prompt's KV if no decode worker pulled it within this time")
    parser.add_argument("--max-num-waiting", type=int, default=int(env("MAX_NUM_WAITING", "1024")),
                        help="queued prompts before RESOURCE_EXHAUSTED")
    add_observability_args(parser)
    add_engine_args(parser)
    return parser


async def serve(args: argparse.Namespace, engine_config: EngineConfig) -> None:
    servicer = PrefillServicer()
    tracing_handle = tracing.init_tracing("prefill", args.otlp_traces_endpoint)
    running = await start_server(
        lambda server: worker_pb2_grpc.add_PrefillWorkerServicer_to_server(servicer, server),
        [SERVICE_NAME], args.host, args.port, interceptors=tracing_handle.server_interceptors(),
    )
    shutdown = asyncio.ensure_future(wait_for_shutdown())
    worker = sender = obs = None
    try:
        engine = await load_engine(engine_config)
        obs = Observability.start(tracing_handle, "prefill", engine.model_name, args.metrics_port)
        worker = PrefillWorker(engine, args.kv_lease_seconds, args.max_num_waiting, obs)
        sender = create_sender(args.kv_transfer_backend, worker.layout, engine.kv_pool.gather_blocks,
                               worker.on_release, args.kv_host, args.kv_port)
        worker.attach_sender(sender)
        worker.start()
        servicer.worker = worker
        await running.mark_serving()
        write_ready_file(args.ready_file, port=running.port, kv_address=sender.address,
                         metrics_port=obs.metrics_server.port if obs.metrics_server else None,
                         otlp_traces_endpoint=tracing_handle.endpoint)
        logger.info("prefill worker serving %s on port %d, KV listener %s", engine.model_name, running.port,
                    sender.address)
        logger.info("%s received, stopping", await shutdown)
    finally:
        await running.stop()
        if worker is not None:
            worker.stop()
        if sender is not None:
            sender.close()
        if obs is not None:
            obs.close()

def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        engine_config = engine_config_from_args(args)
    except ValueError as exc:
        print(f"tandem prefill: {exc}")
        return 2
    asyncio.run(serve(args, engine_config))
    return 0
