"""`tandem frontend`: the public gRPC service (tokenize, route, relay, detokenize).

    tandem frontend --prefill-addresses h1:50061,h2:50061 --decode-addresses h3:50062 [--port 50051]
    tandem frontend --decode-addresses h1:50063,h2:50063          # colocated workers only (tandem worker)
    tandem frontend --prefill-discovery dns:tandem-prefill:50061 --decode-discovery dns:tandem-decode:50071

Workers found while running (services/frontend/discovery.py): --prefill-discovery / --decode-discovery
take dns:HOST:PORT (every address of a headless Service) or file:PATH (host:port lines), read again every
--discovery-refresh-seconds; a worker that disappears is drained, not failed.

Every flag falls back to a TANDEM_* environment variable (e.g. TANDEM_PREFILL_ADDRESSES), which is
what compose files set. Health turns SERVING once a decode-side worker answers, and a prefill worker
too when any is given. Which prompts skip the prefill workers: --max-local-prefill-length
(services/frontend/request_path.py).

TLS: --ssl-certfile/--ssl-keyfile serve gRPC and HTTP over TLS (--ssl-cert-reqs 2 + --ssl-ca-certs:
mutual TLS), and the frontend then dials its workers over TLS too, trusting --ssl-ca-certs and
presenting its own certificate to workers that require one; --worker-ssl-* override those two.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os

from common.model.registry import resolve_model
from common.heap import freeze_startup_heap
from common.tokenizer import load_tokenizer
from common import tracing
from common.tls import ClientTLS, add_server_tls_args, server_tls_from_args, with_flag_names
from services.common.observability import Observability, add_observability_args
from services.common.server import configure_process, start_server, wait_for_shutdown, write_ready_file
from services.frontend.api_servers import add_api_server_args, is_api_server_parent, run_api_servers
from services.frontend.app import FrontendApp, FrontendConfig
from services.frontend.discovery import DEFAULT_REFRESH_SECONDS
from services.frontend.openai.server import start_http_server
from services.frontend.routing_policy import RouterMode
from services.frontend.servicer import GenerationServicer, add_generation_servicer

logger = logging.getLogger("tandem.frontend")

SERVICE_NAME = "tandem.v1.Generation"


def _env(name: str, default=None):
    return os.environ.get(f"TANDEM_{name}", default)


def _addresses(text: str | None) -> list[str]:
    return [a.strip() for a in (text or "").split(",") if a.strip()]


def _config_defaults() -> dict:
    """FrontendConfig's defaults, which the flags fall back to."""
    return {field.name: field.default for field in dataclasses.fields(FrontendConfig)
            if field.default is not dataclasses.MISSING}


def build_parser() -> argparse.ArgumentParser:
    defaults = _config_defaults()
    parser = argparse.ArgumentParser(prog="tandem frontend", description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--prefill-addresses", default=_env("PREFILL_ADDRESSES"),
                        help="comma-separated host:port of prefill workers (env TANDEM_PREFILL_ADDRESSES)")
    parser.add_argument("--decode-addresses", default=_env("DECODE_ADDRESSES"),
                        help="comma-separated host:port of decode workers and colocated `tandem worker`s (env "
                             "TANDEM_DECODE_ADDRESSES); without --prefill-addresses they prefill every prompt")
    parser.add_argument("--prefill-discovery", default=_env("PREFILL_DISCOVERY"), metavar="dns:HOST:PORT|file:PATH",
                        help="find prefill workers while running: every A/AAAA record of HOST (a headless "
                             "Service), or the host:port lines of a file; added to --prefill-addresses "
                             "(env TANDEM_PREFILL_DISCOVERY)")
    parser.add_argument("--decode-discovery", default=_env("DECODE_DISCOVERY"), metavar="dns:HOST:PORT|file:PATH",
                        help="the same for decode workers and colocated `tandem worker`s (env "
                             "TANDEM_DECODE_DISCOVERY)")
    parser.add_argument("--discovery-refresh-seconds", type=float,
                        default=float(_env("DISCOVERY_REFRESH_SECONDS", str(DEFAULT_REFRESH_SECONDS))),
                        help="how often discovery resolves or re-reads its sources (env "
                             "TANDEM_DISCOVERY_REFRESH_SECONDS)")
    parser.add_argument("--max-local-prefill-length", type=int,
                        default=int(_env("MAX_LOCAL_PREFILL_LENGTH", defaults["max_local_prefill_length"])),
                        help="conditional disaggregation: a prompt of at most this many tokens skips the prefill "
                             "workers when a decode worker has room for it, and that worker prefills it "
                             "(env TANDEM_MAX_LOCAL_PREFILL_LENGTH; 0 = never while prefill workers exist)")
    parser.add_argument("--host", default=_env("HOST", defaults["host"]))
    parser.add_argument("--port", type=int, default=int(_env("PORT", defaults["port"])))
    parser.add_argument("--model", default=_env("MODEL"), help="model whose tokenizer to use; default: embedded SmolLM2")
    parser.add_argument("--load-format", default=_env("LOAD_FORMAT", "auto"))
    parser.add_argument("--max-num-requests", type=int,
                        default=int(_env("MAX_NUM_REQUESTS", defaults["max_num_requests"])))
    parser.add_argument("--stats-refresh-seconds", type=float,
                        default=float(_env("STATS_REFRESH_SECONDS", defaults["stats_refresh_seconds"])))
    parser.add_argument("--router-mode", choices=[m.value for m in RouterMode],
                        default=_env("ROUTER_MODE", RouterMode(defaults["router_mode"]).value),
                        help="how workers are picked (env TANDEM_ROUTER_MODE): kv (default) = the least expected "
                             "work counting each worker's cached prefix, load = the least loaded, round-robin, "
                             "random")
    parser.add_argument("--kv-overlap-score-weight", type=float,
                        default=float(_env("KV_OVERLAP_SCORE_WEIGHT", defaults["kv_overlap_score_weight"])),
                        help="kv router: how much one cached prompt token (decode: block) counts against one "
                             "queued on the worker (env TANDEM_KV_OVERLAP_SCORE_WEIGHT; 0 = load only)")
    parser.add_argument("--migration-limit", type=int,
                        default=int(_env("MIGRATION_LIMIT", defaults["migration_limit"])),
                        help="times a request may move to other workers when its decode worker is lost "
                             "mid-stream (env TANDEM_MIGRATION_LIMIT; 0 = off)")
    parser.add_argument("--http-port", type=int, default=int(_env("HTTP_PORT", "8000")),
                        help="OpenAI-compatible HTTP API port (env TANDEM_HTTP_PORT; 0 = any free port, -1 = off)")
    parser.add_argument("--no-http", action="store_true", help="do not serve the OpenAI-compatible HTTP API")
    parser.add_argument("--api-key", default=_env("API_KEY"),
                        help="require 'Authorization: Bearer <key>' on HTTP and gRPC (env TANDEM_API_KEY); "
                             "health checks stay open")
    parser.add_argument("--max-request-bytes", type=int,
                        default=int(_env("MAX_REQUEST_BYTES", defaults["max_request_bytes"])),
                        help="largest HTTP request body; larger ones get 413 (env TANDEM_MAX_REQUEST_BYTES)")
    parser.add_argument("--max-prompt-chars", type=int,
                        default=int(_env("MAX_PROMPT_CHARS", defaults["max_prompt_chars"])),
                        help="longest prompt in characters (or token ids), refused before tokenization")
    parser.add_argument("--max-n", type=int,
                        default=int(_env("MAX_N", defaults["max_n"])), help="most choices per prompt (HTTP n)")
    parser.add_argument("--max-output-tokens", type=int, default=_env("MAX_OUTPUT_TOKENS"),
                        help="largest max_tokens a request may ask for (default: max_model_len)")
    add_server_tls_args(parser, "gRPC and HTTP")
    parser.add_argument("--worker-ssl-ca-certs", default=_env("WORKER_SSL_CA_CERTS"), metavar="PEM",
                        help="CA bundle the workers' certificates must chain to (default: --ssl-ca-certs; "
                             "env TANDEM_WORKER_SSL_CA_CERTS)")
    parser.add_argument("--worker-ssl-certfile", default=_env("WORKER_SSL_CERTFILE"), metavar="PEM",
                        help="client certificate for workers that require one (default: --ssl-certfile; "
                             "env TANDEM_WORKER_SSL_CERTFILE)")
    parser.add_argument("--worker-ssl-keyfile", default=_env("WORKER_SSL_KEYFILE"), metavar="PEM",
                        help="its private key (default: --ssl-keyfile; env TANDEM_WORKER_SSL_KEYFILE)")
    add_observability_args(parser)
    add_api_server_args(parser)
    parser.add_argument("--ready-file", default=None, help="write {port, http_port} as JSON here once serving")
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"))
    return parser


def worker_tls_from_args(args: argparse.Namespace) -> ClientTLS | None:
    """How the frontend dials its workers: over TLS when it serves TLS (--ssl-certfile) or any --worker-ssl-*
    flag is given, else plaintext. Each --worker-ssl-* flag defaults to its --ssl-* twin (one CA and one
    certificate for the whole system); ValueError (one line, naming the flag) on a bad value."""
    has_own_identity = bool(args.worker_ssl_certfile or args.worker_ssl_keyfile)
    if not (args.ssl_certfile or args.worker_ssl_ca_certs or has_own_identity):
        return None
    certfile, keyfile = ((args.worker_ssl_certfile, args.worker_ssl_keyfile) if has_own_identity
                         else (args.ssl_certfile, args.ssl_keyfile))
    return with_flag_names("--worker-ssl-", lambda: ClientTLS(args.worker_ssl_ca_certs or args.ssl_ca_certs or None,
                                                              certfile or None, keyfile or None))


async def serve(config: FrontendConfig, args: argparse.Namespace, http_port: int = -1) -> None:
    resolved = await asyncio.to_thread(resolve_model, config.model, args.load_format)
    tokenizer = await asyncio.to_thread(load_tokenizer, resolved.folder)
    tracing_handle = tracing.init_tracing("frontend", args.otlp_traces_endpoint)
    obs = Observability.start(tracing_handle, "frontend", resolved.name, args.metrics_port)
    app = FrontendApp(config, tokenizer, resolved.name, obs)
    running = await start_server(
        lambda server: add_generation_servicer(GenerationServicer(app), server),
        [SERVICE_NAME], config.host, config.port, tls=config.tls, reuse_port=config.api_server_count > 1,
    )
    http = None
    try:
        if http_port >= 0:
            http = await start_http_server(app, config.host, http_port, config.tls, config.api_server_count > 1)
        await app.start()
        shutdown = asyncio.ensure_future(wait_for_shutdown())
        while not app.router.is_ready() and not shutdown.done():
            await asyncio.sleep(0.1)
        if not shutdown.done():
            freeze_startup_heap()  # the tokenizer and loaded code stay out of every later collection
            await running.mark_serving()
            if http is not None:
                http.mark_ready()
            write_ready_file(args.ready_file, port=running.port, http_port=http.port if http is not None else None,
                             metrics_port=obs.metrics_server.port if obs.metrics_server else None,
                             otlp_traces_endpoint=tracing_handle.endpoint)
            logger.info("frontend serving %s on port %d", resolved.name, running.port)
        logger.info("%s received, stopping", await shutdown)
    finally:
        if http is not None:
            await http.stop()
        await running.stop()
        await app.close()
        obs.close()


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    configure_process(args.log_level)
    try:
        config = FrontendConfig(
            prefill_addresses=_addresses(args.prefill_addresses),
            decode_addresses=_addresses(args.decode_addresses),
            host=args.host, port=args.port, model=args.model,
            max_num_requests=args.max_num_requests, stats_refresh_seconds=args.stats_refresh_seconds,
            migration_limit=args.migration_limit, max_local_prefill_length=args.max_local_prefill_length,
            router_mode=args.router_mode, kv_overlap_score_weight=args.kv_overlap_score_weight,
            api_key=args.api_key or None, max_request_bytes=args.max_request_bytes,
            max_prompt_chars=args.max_prompt_chars, max_n=args.max_n,
            max_output_tokens=int(args.max_output_tokens) if args.max_output_tokens else None,
            tls=server_tls_from_args(args), worker_tls=worker_tls_from_args(args),
            prefill_discovery=args.prefill_discovery or None, decode_discovery=args.decode_discovery or None,
            discovery_refresh_seconds=args.discovery_refresh_seconds,
            api_server_count=args.api_server_count, api_server_index=args.api_server_index or 0,
        )
    except ValueError as exc:
        print(f"tandem frontend: {exc}")
        return 2
    http_port = -1 if args.no_http else args.http_port
    if not -1 <= http_port <= 65535:
        print(f"tandem frontend: --http-port must be in [-1, 65535], got {http_port}")
        return 2
    if is_api_server_parent(args):
        return run_api_servers(argv, args, config.host, config.port, http_port)
    asyncio.run(serve(config, args, http_port))
    return 0
