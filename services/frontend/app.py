"""The frontend's request path, behind the thin gRPC servicer.

    GenerateRequest ─► validate (INVALID_ARGUMENT names the field) ─► chat template + tokenize
      ─► fit to max_model_len ─► Relay (prefill -> decode) ─► TextStream ─► Chunk* ─► Finish

Spans (children of the root `generate {model}`): tokenize, route (x2, in the relay), the worker RPCs,
and one detokenize span recorded when the stream ends.

Active requests are kept by id so `Abort(request_id)` can cancel them; the cancelled stream ends with
CANCELLED and the relay frees the request on every worker. Ids stay unique across callers (they are the
workers' ids too), but each request remembers who started it: `abort(request_id, caller)` only reaches a
request of the same caller (a gRPC connection, `servicer.caller_of`), so one client cannot stop
another's stream by guessing or reading its id. HTTP requests belong to no gRPC caller.

Admission: a request holds a slot (`admission.py`) from before its first await to its end, so at most
`max_num_requests` are open however fast they arrive.

The root span is never the current span across a `yield`: a consumer may close this generator from
another context (gRPC finalizes a cancelled stream's generator in a task of its own), and an OTel
context token must be detached in the context that attached it. It is made current around each step
instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

from common import tracing
from common.tls import ClientTLS, ServerTLS
from common.tokenizer import TokenizerError, apply_chat_template, encode_prompt
from common.tracing import Attr, SpanName
from protos import generation_pb2
from services.common.errors import Cancelled, InvalidRequest, Unavailable
from services.common.observability import Observability
from services.frontend.admission import Admission, Slot
from services.frontend.api_server_metrics import ApiServerMetrics
from services.frontend.convert import Chunk, Finish
from services.frontend.discovery import DEFAULT_REFRESH_SECONDS, DiscoveryConfig, WorkerDiscovery
from services.frontend.relay import Relay, TokenEvent
from services.frontend.request_path import PathPolicy
from services.frontend.router import Router
from services.frontend.router_metrics import RouterMetrics
from services.frontend.routing_policy import DEFAULT_ROUTER_MODE, RouterMode, RoutingConfig, parse_router_mode
from services.frontend.text_stream import TextStream
from services.frontend.validation import (
    DEFAULT_MAX_PROMPT_CHARS,
    GenerateInput,
    fit_to_context,
    parse_generate_request,
)

logger = logging.getLogger(__name__)


@dataclass
class FrontendConfig:
    prefill_addresses: list[str]  # host:port of each prefill worker; none: decode-side workers prefill everything
    decode_addresses: list[str]  # host:port of each decode worker or colocated `tandem worker`
    host: str = "0.0.0.0"
    port: int = 50051
    model: str | None = None  # for the tokenizer; None = the embedded SmolLM2
    max_num_requests: int = 1024  # open requests (an HTTP request: one per choice) before RESOURCE_EXHAUSTED
    stats_refresh_seconds: float = 0.5  # how often workers' GetStats is polled
    migration_limit: int = 3  # times a request may move off a lost decode worker mid-stream; 0 = never
    api_key: str | None = None  # when set, every Generation RPC and /v1 call must carry "Bearer <api_key>"
    max_request_bytes: int = 4 * 1024 * 1024  # HTTP request body, refused with 413 before it is parsed
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS  # text / chat characters (or prompt token ids), before tokenization
    max_n: int = 8  # choices per prompt of an HTTP request (vLLM-like)
    max_output_tokens: int | None = None  # largest max_tokens a request may ask for; None = max_model_len
    tls: ServerTLS | None = None  # the gRPC and HTTP listeners' TLS; None = plaintext
    worker_tls: ClientTLS | None = None  # how worker channels are dialed; None = plaintext
    router_mode: RouterMode | str = DEFAULT_ROUTER_MODE  # which worker gets a request (routing_policy.py)
    kv_overlap_score_weight: float = 1.0  # kv mode: how much a cached prompt token counts against load
    # longest prompt a decode worker prefills itself while there are prefill workers (request_path.py)
    max_local_prefill_length: int = 0
    # dns:HOST:PORT or file:PATH: workers found while running, beside the static addresses (discovery.py)
    prefill_discovery: str | None = None
    decode_discovery: str | None = None
    discovery_refresh_seconds: float = DEFAULT_REFRESH_SECONDS
    api_server_count: int = 1  # processes serving the same ports (api_servers.py); each has all of the above
    api_server_index: int = 0  # which of them this process is (labels its api_server_requests_total)

    def __post_init__(self) -> None:
        if not self.decode_addresses and self.decode_discovery is None:
            raise ValueError("decode_addresses: at least one decode (or colocated) worker is required "
                             "(or decode_discovery)")
        self.discovery  # validates the discovery fields
        PathPolicy(self.max_local_prefill_length)  # ValueError naming the field
        for address in [*self.prefill_addresses, *self.decode_addresses]:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"worker address: expected host:port, got {address!r}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port: must be in [0, 65535], got {self.port}")
        if self.max_num_requests < 1:
            raise ValueError(f"max_num_requests: must be >= 1, got {self.max_num_requests}")
        if self.stats_refresh_seconds <= 0:
            raise ValueError(f"stats_refresh_seconds: must be > 0, got {self.stats_refresh_seconds}")
        if self.migration_limit < 0:
            raise ValueError(f"migration_limit: must be >= 0, got {self.migration_limit}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key: must not be empty (leave it unset for no key)")
        for name in ("max_request_bytes", "max_prompt_chars", "max_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.api_server_count < 1:
            raise ValueError(f"api_server_count: must be >= 1, got {self.api_server_count}")
        if not 0 <= self.api_server_index < self.api_server_count:
            raise ValueError(f"api_server_index: must be in [0, {self.api_server_count - 1}], "
                             f"got {self.api_server_index}")
        if self.max_output_tokens is not None and self.max_output_tokens < 1:
            raise ValueError(f"max_output_tokens: must be >= 1, got {self.max_output_tokens}")
        self.routing  # validates the routing fields

    @property
    def routing(self) -> RoutingConfig:
        return RoutingConfig(parse_router_mode(self.router_mode), self.kv_overlap_score_weight)

    @property
    def discovery(self) -> DiscoveryConfig:
        return DiscoveryConfig(self.prefill_discovery, self.decode_discovery, self.discovery_refresh_seconds)


HTTP_CALLER = "http"  # the caller of HTTP requests: no gRPC Abort reaches them


class _ActiveRequest:
    def __init__(self, task: asyncio.Task, caller: str):
        self.task = task
        self.caller = caller  # who may abort it
        self.is_aborted = False
        # The stream is suspended at its `yield`: the task runs its consumer's code (gRPC sending the
        # last message), which must not be cancelled (see `abort`).
        self.is_with_consumer = False


class _RequestRecord:
    """What one Generate call reports to metrics and its root span."""

    def __init__(self):
        self.start = time.monotonic()
        self.last_token: float | None = None
        self.is_accepted = False  # passed validation; only accepted requests count as finished
        self.active: _ActiveRequest | None = None  # its Abort entry, once registered
        self.finish_reason = "error"  # stop | length | abort | error
        self.num_prompt_tokens = self.num_completion_tokens = 0
        self.request_id: str | None = None  # once validated


class FrontendApp:
    def __init__(self, config: FrontendConfig, tokenizer, model_name: str, observability: Observability | None = None):
        self.config = config
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.obs = observability or Observability.disabled("frontend", model_name)
        self.metrics = self.obs.metrics  # the OpenAI HTTP layer serves this registry and records nothing more
        self.router = Router(config.prefill_addresses, config.decode_addresses, config.stats_refresh_seconds,
                             self.obs.tracing.client_interceptors(), config.worker_tls, config.routing,
                             RouterMetrics(self.metrics.registry, model_name))
        self.relay = Relay(self.router, self.obs.tracing, config.migration_limit,
                           PathPolicy(config.max_local_prefill_length))
        self.router.on_worker_closed.append(self.relay.close_decode_stream)
        discovery = config.discovery
        self.discovery = WorkerDiscovery(
            self.router, discovery.sources(),
            {"prefill": config.prefill_addresses, "decode": config.decode_addresses},
            discovery.refresh_seconds) if discovery.is_enabled else None
        self._active: dict[str, _ActiveRequest] = {}
        self.admission = Admission(config.max_num_requests)
        self.api_server_metrics = ApiServerMetrics(self.metrics.registry, model_name, config.api_server_index)
        self._num_open = 0  # open Generate streams (the num_requests_running gauge)

    async def start(self) -> None:
        if self.discovery is not None:
            await self.discovery.start()
        self.router.start()

    async def close(self) -> None:
        if self.discovery is not None:
            await self.discovery.close()
        for active in list(self._active.values()):
            active.task.cancel()
        await self.relay.drain()
        await self.router.close()

    def tokenize(self, request: GenerateInput) -> list[int]:
        prompt = request.prompt
        if prompt.token_ids is not None:
            return prompt.token_ids
        if prompt.chat is not None:
            messages = [{"role": turn.role, "content": turn.content} for turn in prompt.chat]
            try:
                return apply_chat_template(self.tokenizer, messages)
            except TokenizerError as exc:
                raise InvalidRequest("chat", str(exc)) from exc
        return encode_prompt(self.tokenizer, prompt.text)

    async def prompt_token_ids(self, request: GenerateInput) -> list[int]:
        """The prompt's token ids: as given, or tokenized on a thread (the chat template included)."""
        if request.prompt.token_ids is not None:
            return request.prompt.token_ids
        return await asyncio.to_thread(self.tokenize, request)

    async def generate(
        self,
        request_pb: generation_pb2.GenerateRequest,
        time_remaining: Callable[[], float | None],
        metadata=None,
        to_output: Callable[[str, Chunk | Finish], Any] | None = None,
        caller: str = HTTP_CALLER,
        slot: Slot | None = None,
    ) -> AsyncIterator[Any]:
        """Streams one completion: Chunk* then one Finish, or what `to_output(request_id, item)` makes of
        each (the gRPC servicer makes GenerateResponses). `metadata` (gRPC invocation metadata) may carry
        a caller's traceparent; `caller` is who may abort it; `slot` is the admission slot taken for it
        (None: one is taken here, before the first await). Each Chunk holds every token that arrived
        since the previous one."""
        if slot is None:
            slot = self.admission.take()[0]  # RequestsExhausted, before anything else is done
        self.api_server_metrics.request_admitted()
        record = _RequestRecord()
        parent = tracing.extract_context(metadata) if metadata is not None else None
        root = self.obs.tracing.tracer.start_span(
            tracing.root_span_name(self.model_name), context=parent, kind=trace.SpanKind.SERVER,
            attributes={Attr.REQUEST_MODEL: self.model_name})
        root_context = trace.set_span_in_context(root, parent)
        self._num_open += 1
        self.metrics.set_queue_sizes(self._num_open, 0)
        items = self._generate(request_pb, time_remaining, record, caller)
        try:
            while True:
                token = otel_context.attach(root_context)  # current for this step only (see the docstring)
                try:
                    item = await anext(items)
                except StopAsyncIteration:
                    break
                finally:
                    otel_context.detach(token)
                self._observe(record, item, root)
                active = record.active  # registered: items come only after validation
                active.is_with_consumer = True
                try:
                    yield item if to_output is None else to_output(record.request_id, item)
                finally:
                    active.is_with_consumer = False
                if active.is_aborted:  # an Abort while the consumer had the task
                    raise Cancelled(f"request {record.request_id} was aborted")
        except (asyncio.CancelledError, GeneratorExit, Cancelled):  # client gone, or Abort
            if record.finish_reason == "error":  # not yet finished (a Finish already sent stands)
                record.finish_reason = "abort"
            raise
        except Exception as exc:
            tracing.set_error(root, exc)
            raise
        finally:
            token = otel_context.attach(root_context)
            try:
                await self._close_quietly(items)
            finally:
                otel_context.detach(token)
            slot.release()
            self._num_open -= 1
            self.metrics.set_queue_sizes(self._num_open, 0)
            if record.request_id is not None:
                root.set_attribute(Attr.REQUEST_ID, record.request_id)
            if record.is_accepted:
                self.metrics.observe_request_finished(record.finish_reason, time.monotonic() - record.start)
                tracing.set_usage(root, record.num_prompt_tokens, record.num_completion_tokens,
                                  [record.finish_reason])
            root.end()

    @staticmethod
    async def _close_quietly(items: AsyncIterator) -> None:
        """Closes the inner generator (aborting the request on its workers) wherever this one ends."""
        try:
            await items.aclose()
        except (asyncio.CancelledError, Cancelled):
            pass

    def _observe(self, record: _RequestRecord, item: Chunk | Finish, root) -> None:
        if type(item) is Finish:
            record.finish_reason = item.finish_reason
            record.num_completion_tokens = item.num_completion_tokens
            return
        if not item.token_ids:
            return
        now = time.monotonic()
        if record.last_token is None:
            self.metrics.observe_time_to_first_token(now - record.start)
            root.set_attribute(Attr.TIME_TO_FIRST_TOKEN, now - record.start)
        else:
            self.metrics.observe_inter_token_latency((now - record.last_token) / len(item.token_ids))
        record.last_token = now

    async def _accept(self, request_pb: generation_pb2.GenerateRequest, record: _RequestRecord,
                      caller: str) -> tuple[GenerateInput, list[int], _ActiveRequest]:
        """Validates, registers (for Abort) and tokenizes; raises InvalidRequest / Unavailable."""
        limits = self.router.model_limits()  # Unavailable until workers answered
        request = parse_generate_request(request_pb, limits.vocab_size, self.config.max_prompt_chars,
                                         self.config.max_output_tokens or limits.max_model_len)
        record.request_id = request.request_id
        if request.request_id in self._active:
            raise InvalidRequest("request_id", f"{request.request_id!r} is already running")
        active = self._active[request.request_id] = _ActiveRequest(asyncio.current_task(), caller)  # no await yet
        record.active = active
        try:
            with self.obs.tracing.start_span(SpanName.TOKENIZE, attributes={Attr.REQUEST_ID: request.request_id}):
                prompt_token_ids = await self.prompt_token_ids(request)
            fit_to_context(request, len(prompt_token_ids), limits.max_model_len)
        except asyncio.CancelledError:
            self._forget(request.request_id, active)
            if active.is_aborted:  # an Abort while tokenizing: the caller gets CANCELLED, as later on
                raise Cancelled(f"request {request.request_id} was aborted") from None
            raise
        except BaseException:
            self._forget(request.request_id, active)
            raise
        record.is_accepted, record.num_prompt_tokens = True, len(prompt_token_ids)
        return request, prompt_token_ids, active

    async def _generate(
        self, request_pb: generation_pb2.GenerateRequest, time_remaining: Callable[[], float | None],
        record: _RequestRecord, caller: str,
    ) -> AsyncIterator[Chunk | Finish]:
        request, prompt_token_ids, active = await self._accept(request_pb, record, caller)
        text_stream = TextStream(self.tokenizer, prompt_token_ids, request.sampling, request.stop)
        events = self.relay.run(request.request_id, prompt_token_ids, request.sampling, time_remaining)
        try:
            async with contextlib.aclosing(events):  # closing it early aborts the request on its workers
                async for event in events:
                    if type(event) is TokenEvent:
                        chunk, finish = text_stream.on_tokens(event)
                    else:
                        chunk, finish = text_stream.on_finish(event)
                    if chunk is not None and (chunk.token_ids or chunk.text):
                        yield chunk
                    if finish is not None:
                        yield finish
                        return
        except asyncio.CancelledError:
            if active.is_aborted:
                raise Cancelled(f"request {request.request_id} was aborted") from None
            raise
        finally:
            self._forget(request.request_id, active)
            self._record_detokenize(request.request_id, text_stream)

    def _forget(self, request_id: str, active: _ActiveRequest) -> None:
        """Drops this request's Abort entry (never another's: a duplicate id is refused, not registered)."""
        if self._active.get(request_id) is active:
            del self._active[request_id]

    def _record_detokenize(self, request_id: str, text_stream: TextStream) -> None:
        """One `detokenize` span per request: first to last detokenization, busy time as an attribute."""
        if text_stream.detokenize_started_ns is None:
            return  # nothing came back to detokenize
        self.obs.tracing.record_span(
            SpanName.DETOKENIZE, text_stream.detokenize_started_ns, text_stream.detokenize_ended_ns,
            attributes={Attr.REQUEST_ID: request_id, Attr.OUTPUT_TOKENS: text_stream.num_completion_tokens,
                        Attr.DETOKENIZE_BUSY_SECONDS: text_stream.detokenize_busy_ns / 1e9},
        )

    def abort(self, request_id: str, caller: str) -> bool:
        """Cancels a running Generate started by `caller`; its stream ends with CANCELLED. False when no
        request of that caller runs under this id (another caller's request is left alone, unnamed).

        The task is cancelled only while the stream's own code awaits (tokenizing, waiting for tokens).
        While the stream is suspended at its `yield` the task runs the consumer (gRPC sending the last
        message), and a cancel landing there would end the RPC with no status at all (grpc.aio takes a
        CancelledError in its own code for the client's cancel), leaving the caller waiting until its
        deadline; the stream raises Cancelled instead when the consumer asks for its next item."""
        active = self._active.get(request_id)
        if active is None or active.caller != caller:
            return False
        active.is_aborted = True
        if not active.is_with_consumer:
            active.task.cancel()
        return True

    def model_info(self) -> generation_pb2.ModelInfo:
        if not self.router.is_ready():
            raise Unavailable("no ready prefill and decode workers yet")
        limits = self.router.model_limits()
        return generation_pb2.ModelInfo(
            model_name=self.model_name,
            max_model_len=limits.max_model_len,
            vocab_size=limits.vocab_size,
            eos_token_ids=limits.eos_token_ids,
            has_chat_template=bool(getattr(self.tokenizer, "chat_template", None)),
            num_prefill_workers=sum(w.is_healthy for w in self.router.prefill_workers),
            num_decode_workers=sum(w.is_healthy for w in self.router.decode_workers),
        )
