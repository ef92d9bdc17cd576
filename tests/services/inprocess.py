"""A whole Tandem system in one process for service tests: real gRPC servers on free ports, real
engines on a tiny random Llama (with SmolLM2's tokenizer), the in-process `fake` KV transfer.

    system = InProcessSystem(folder, model, model_config, decode_overrides={"num_kv_blocks": 8})
    system.start()            # prefill + decode workers, then the frontend, on a background event loop
    # a mixed cluster: two colocated workers beside the pair, short prompts kept off the prefill worker
    InProcessSystem(..., num_colocated=2, frontend_overrides={"max_local_prefill_length": 8})
    # colocated serving: the frontend knows no prefill worker (the pair's prefill worker idles)
    InProcessSystem(..., num_colocated=1, routes_to_prefill=False)
    stub = GenerationStub(grpc.insecure_channel(system.frontend_address))
    system.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator

import grpc

from common import tracing
from common.engine.config import EngineConfig
from common.engine.llm_engine import LLMEngine
from common.engine.sampling_params import SamplingParams
from common.tokenizer import load_tokenizer
from protos import worker_pb2, worker_pb2_grpc
from services.common.observability import Observability
from services.common.server import start_server
from services.common.worker_setup import create_receiver, create_sender, kv_layout
from services.decode.servicer import DecodeServicer
from services.decode.worker import DecodeLimits, DecodeWorker
from services.frontend.app import FrontendApp, FrontendConfig
from services.frontend.servicer import GenerationServicer, add_generation_servicer
from services.prefill.servicer import PrefillServicer
from services.prefill.worker import PrefillWorker

ENGINE_SETTINGS = dict(device="cpu", num_kv_blocks=64, max_model_len=128, block_size=4, max_num_seqs=16,
                       max_num_batched_tokens=128, attention_backend="reference")


class InProcessSystem:
    def __init__(self, folder, model, model_config, prefill_overrides=None, decode_overrides=None,
                 lease_seconds: float = 30.0, decode_limits: DecodeLimits | None = None,
                 otlp_endpoint: str | None = None, frontend_overrides: dict | None = None,
                 num_colocated: int = 0, colocated_overrides: dict | None = None, routes_to_prefill: bool = True):
        """`otlp_endpoint`: export every service's spans there (tracing is off without it);
        `frontend_overrides`: FrontendConfig fields (api_key, max_num_requests, ...); `num_colocated`:
        colocated workers the frontend routes to beside the decode worker; `routes_to_prefill`: False gives the frontend no prefill address."""
        self._num_colocated = num_colocated
        self._colocated_overrides = colocated_overrides or {}
        self._routes_to_prefill = routes_to_prefill
        self.colocated_workers: list[DecodeWorker] = []
        self.colocated_addresses: list[str] = []
        self._folder = folder
        self._model, self._model_config = model, model_config
        self._prefill_overrides = prefill_overrides or {}
        self._decode_overrides = decode_overrides or {}
        self._lease_seconds = lease_seconds
        self._decode_limits = decode_limits or DecodeLimits()
        self._frontend_overrides = frontend_overrides or {}
        self._otlp_endpoint = otlp_endpoint or ""  # "" forces tracing off whatever the environment says
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-services", daemon=True)
        self._cleanups = []
        self.prefill_address = self.decode_address = self.frontend_address = ""

    def _engine(self, overrides: dict) -> LLMEngine:
        config = EngineConfig(model=str(self._folder), **{**ENGINE_SETTINGS, **overrides})
        return LLMEngine(config, model=self._model, model_config=self._model_config)

    def start(self) -> "InProcessSystem":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=120)
        return self

    def _observability(self, role: str) -> Observability:
        return Observability.start(tracing.init_tracing(role, self._otlp_endpoint), role, "tiny")

    async def _start(self) -> None:
        self.observability = {role: self._observability(role) for role in ("frontend", "prefill", "decode")}
        prefill = PrefillWorker(self._engine(self._prefill_overrides), self._lease_seconds,
                                observability=self.observability["prefill"])
        sender = create_sender("fake", prefill.layout, prefill.engine.kv_pool.gather_blocks, prefill.on_release,
                               "fake", 0)
        prefill.attach_sender(sender)
        decode_engine = self._engine(self._decode_overrides)
        receiver = create_receiver("fake", kv_layout(decode_engine), 10.0)
        decode = DecodeWorker(decode_engine, receiver, self._decode_limits, self.observability["decode"])
        self.prefill_worker, self.decode_worker, self.sender = prefill, decode, sender
        prefill_servicer, decode_servicer = PrefillServicer(), DecodeServicer()
        prefill_server = await start_server(
            lambda s: worker_pb2_grpc.add_PrefillWorkerServicer_to_server(prefill_servicer, s),
            ["tandem.worker.v1.PrefillWorker"], "127.0.0.1", 0,
            self.observability["prefill"].tracing.server_interceptors())
        decode_server = await start_server(
            lambda s: worker_pb2_grpc.add_DecodeWorkerServicer_to_server(decode_servicer, s),
            ["tandem.worker.v1.DecodeWorker"], "127.0.0.1", 0,
            self.observability["decode"].tracing.server_interceptors())
        for worker, servicer, server in ((prefill, prefill_servicer, prefill_server),
                                         (decode, decode_servicer, decode_server)):
            worker.start()
            servicer.worker = worker
            await server.mark_serving()
            self._cleanups.append((server, worker))
        self.prefill_address = f"127.0.0.1:{prefill_server.port}"
        self.decode_address = f"127.0.0.1:{decode_server.port}"
        for _ in range(self._num_colocated):
            await self._start_colocated()
        config = FrontendConfig([self.prefill_address] if self._routes_to_prefill else [],
                                [self.decode_address, *self.colocated_addresses], stats_refresh_seconds=0.1,
                                **self._frontend_overrides)
        self.app = FrontendApp(config, load_tokenizer(self._folder), "tiny", self.observability["frontend"])
        frontend_server = await start_server(
            lambda s: add_generation_servicer(GenerationServicer(self.app), s),
            ["tandem.v1.Generation"], "127.0.0.1", 0)
        await self.app.start()
        while not self.app.router.is_ready():
            await asyncio.sleep(0.05)
        await frontend_server.mark_serving()
        self._frontend_server = frontend_server
        self.frontend_address = f"127.0.0.1:{frontend_server.port}"

    async def _start_colocated(self) -> None:
        """One colocated worker (`tandem worker`: the decode worker's code; in a mixed cluster it takes
        hand-offs from the prefill worker too)."""
        engine = self._engine(self._colocated_overrides)
        receiver = create_receiver("fake", kv_layout(engine), 10.0)
        name = f"worker-{len(self.colocated_workers)}"
        self.observability[name] = self._observability("worker")
        worker = DecodeWorker(engine, receiver, self._decode_limits, self.observability[name])
        servicer = DecodeServicer()
        server = await start_server(
            lambda s: worker_pb2_grpc.add_DecodeWorkerServicer_to_server(servicer, s),
            ["tandem.worker.v1.DecodeWorker"], "127.0.0.1", 0,
            self.observability[name].tracing.server_interceptors())
        worker.start()
        servicer.worker = worker
        await server.mark_serving()
        self._cleanups.append((server, worker))
        self.colocated_workers.append(worker)
        self.colocated_addresses.append(f"127.0.0.1:{server.port}")

    def stop(self) -> None:
        """Stops every server and worker (idempotent)."""
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            await self._frontend_server.stop(0)
            await self.app.close()
            for server, worker in self._cleanups:
                await server.stop(0)
                worker.stop()
            self.sender.close()
            for observability in self.observability.values():
                observability.close()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    # ---- helpers for tests -------------------------------------------------------------------

    def run(self, coroutine, timeout_seconds: float = 60.0):
        """Runs `coroutine` on the services' event loop (e.g. a servicer method driven by hand)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=timeout_seconds)

    def worker_stats(self) -> tuple[worker_pb2.WorkerStats, worker_pb2.WorkerStats]:
        with grpc.insecure_channel(self.prefill_address) as p, grpc.insecure_channel(self.decode_address) as d:
            request = worker_pb2.GetStatsRequest()
            return (worker_pb2_grpc.PrefillWorkerStub(p).GetStats(request),
                    worker_pb2_grpc.DecodeWorkerStub(d).GetStats(request))

    def wait_until_idle(self, timeout_seconds: float = 10.0) -> tuple[worker_pb2.WorkerStats, worker_pb2.WorkerStats]:
        """Polls every worker until every KV block is free and nothing runs or waits; returns the prefill
        and decode workers' stats."""
        deadline = time.monotonic() + timeout_seconds
        while True:
            prefill, decode = self.worker_stats()
            colocated = [decode_stats(address) for address in self.colocated_addresses]
            is_idle = all(s.num_free_blocks == s.num_total_blocks and s.num_running == 0 and s.num_waiting == 0
                          for s in (prefill, decode, *colocated)) and prefill.num_held_leases == 0
            if is_idle or time.monotonic() > deadline:
                return prefill, decode
            time.sleep(0.05)


def decode_stats(address: str) -> worker_pb2.WorkerStats:
    with grpc.insecure_channel(address) as channel:
        return worker_pb2_grpc.DecodeWorkerStub(channel).GetStats(worker_pb2.GetStatsRequest())


@contextlib.contextmanager
def extra_decode_worker(system: InProcessSystem, servicer) -> Iterator[str]:
    """Another decode worker on the system's loop, served by `servicer` (a DecodeServicer subclass that
    misbehaves as a test needs; its `.worker` is set), with an engine and metrics of its own (each engine
    reports its own running totals); yields its address and stops it afterwards."""

    async def start():
        engine = system._engine({})
        worker = DecodeWorker(engine, create_receiver("fake", kv_layout(engine), 10.0), DecodeLimits(),
                              Observability.disabled("decode", "tiny"))
        server = await start_server(lambda s: worker_pb2_grpc.add_DecodeWorkerServicer_to_server(servicer, s),
                                    ["tandem.worker.v1.DecodeWorker"], "127.0.0.1", 0)
        worker.start()
        servicer.worker = worker
        await server.mark_serving()
        return server, worker

    server, worker = system.run(start())
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        async def stop():
            await server.stop(0)
            worker.stop()

        system.run(stop())


def single_engine_tokens(tiny_folder, tiny_model, prompts, params: SamplingParams) -> list[list[int]]:
    """What one `LLMEngine` with the services' settings generates for `prompts`: the reference that
    output through the services must equal token for token."""
    model, model_config = tiny_model
    engine = LLMEngine(EngineConfig(model=str(tiny_folder), **ENGINE_SETTINGS), model=model, model_config=model_config)
    for index, prompt in enumerate(prompts):
        engine.add_request(str(index), prompt, params)
    tokens = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens[output.request_id].extend(output.new_token_ids)
    return [tokens[str(i)] for i in range(len(prompts))]


def assert_idle(system: InProcessSystem) -> None:
    """Every worker holds nothing: every KV block free, no request running or queued, no lease."""
    prefill, decode = system.wait_until_idle()
    colocated = [decode_stats(address) for address in system.colocated_addresses]
    for stats in (prefill, decode, *colocated):
        assert stats.num_free_blocks == stats.num_total_blocks, stats
        assert stats.num_running == 0 and stats.num_waiting == 0, stats
    assert prefill.num_held_leases == 0
