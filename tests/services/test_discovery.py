"""Worker discovery: DNS and file sources, and the router's add / retire (drain) hook they drive."""

import asyncio
import socket

import pytest

from services.common.worker_messages import WorkerStatsData
from services.frontend.app import FrontendConfig
from services.frontend.discovery import (
    DiscoveryError,
    DnsSource,
    FileSource,
    WorkerDiscovery,
    parse_source,
)
from services.frontend.router import Router
from services.frontend.routing_policy import RouterMode, RoutingConfig


class FakeDns:
    """A resolver whose answer the test sets: a list of IPs, or an exception to raise."""

    def __init__(self, answer):
        self.answer = answer
        self.num_queries = 0

    async def __call__(self, host: str, port: int):
        self.num_queries += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return [(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (ip, port) if ":" not in ip else (ip, port, 0, 0)) for ip in self.answer]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _router(decode_addresses=(), clock=None) -> Router:
    asyncio.set_event_loop(asyncio.new_event_loop())  # grpc.aio channels need a current loop
    return Router([], list(decode_addresses), routing=RoutingConfig(RouterMode.ROUND_ROBIN),
                  clock=clock or FakeClock())


def _ready(router: Router) -> None:
    for worker in router.workers:
        worker.is_healthy = True
        worker.stats = WorkerStatsData(role=worker.role, is_ready=True, num_free_blocks=10, num_total_blocks=10)


def test_sources_parse_from_their_flag_and_bad_ones_name_it():
    dns = parse_source("dns:tandem-decode.tandem.svc:50071", "--decode-discovery")
    assert isinstance(dns, DnsSource) and (dns.host, dns.port) == ("tandem-decode.tandem.svc", 50071)
    assert isinstance(parse_source("file:/etc/tandem/decode", "--decode-discovery"), FileSource)
    for bad in ("tandem-decode:50071", "dns:tandem-decode", "dns:host:0", "file:", "http://x:1"):
        with pytest.raises(ValueError, match="--decode-discovery"):
            parse_source(bad, "--decode-discovery")


def test_dns_gives_every_record_ipv6_bracketed_and_no_such_name_is_empty():
    resolver = FakeDns(["10.0.0.7", "10.0.0.8", "fd00::5", "10.0.0.7"])
    source = DnsSource("tandem-decode", 50071, resolver)
    assert asyncio.run(source.addresses()) == {"10.0.0.7:50071", "10.0.0.8:50071", "[fd00::5]:50071"}
    resolver.answer = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert asyncio.run(source.addresses()) == frozenset()  # a headless Service without a ready pod
    resolver.answer = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    with pytest.raises(DiscoveryError, match="tandem-decode"):
        asyncio.run(source.addresses())


def test_file_is_read_again_when_it_changes_and_a_bad_line_is_named(tmp_path):
    path = tmp_path / "decode"
    path.write_text("# decode workers\n10.0.0.1:50071\n\n  10.0.0.2:50071  # second\n")
    source = FileSource(str(path))
    assert asyncio.run(source.addresses()) == {"10.0.0.1:50071", "10.0.0.2:50071"}
    path.write_text("10.0.0.4:50071\n")
    assert asyncio.run(source.addresses()) == {"10.0.0.4:50071"}
    path.write_text("10.0.0.3:50071\n")  # the same size and, on a coarse clock, the same mtime
    assert asyncio.run(source.addresses()) == {"10.0.0.3:50071"}
    path.write_text("10.0.0.3:50071\nnot-an-address\n")
    with pytest.raises(DiscoveryError, match=r"decode:2: expected host:port, got 'not-an-address'"):
        asyncio.run(source.addresses())
    path.write_text("10.0.0.3:50071\n10.0.0.5:50071\n")  # fixed
    assert asyncio.run(source.addresses()) == {"10.0.0.3:50071", "10.0.0.5:50071"}
    path.unlink()
    with pytest.raises(DiscoveryError, match="No such file"):
        asyncio.run(source.addresses())


def test_dns_changes_add_and_retire_workers_and_a_failing_resolver_retires_none():
    async def run():
        router = _router(decode_addresses=["static:50071"])
        resolver = FakeDns(["10.0.0.1", "10.0.0.2"])
        discovery = WorkerDiscovery(router, {"decode": DnsSource("tandem-decode", 50071, resolver)},
                                    {"decode": ["static:50071"]}, refresh_seconds=0.01)
        await discovery.refresh()
        first = {w.address for w in router.decode_workers}
        resolver.answer = ["10.0.0.2", "10.0.0.3"]  # scaled: one pod replaced
        await discovery.refresh()
        second = {w.address for w in router.decode_workers}
        retired = {w.address for w in router.retired_workers}
        resolver.answer = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        await discovery.refresh()
        during_outage = {w.address for w in router.decode_workers}
        resolver.answer = []  # scaled to zero: the static worker stays
        await discovery.refresh()
        after_zero = {w.address for w in router.decode_workers}
        await router.close()
        return first, second, retired, during_outage, after_zero

    first, second, retired, during_outage, after_zero = asyncio.run(run())
    assert first == {"static:50071", "10.0.0.1:50071", "10.0.0.2:50071"}
    assert second == {"static:50071", "10.0.0.2:50071", "10.0.0.3:50071"}
    assert retired == {"10.0.0.1:50071"}
    assert during_outage == second
    assert after_zero == {"static:50071"}


def test_a_retired_worker_gets_no_new_request_and_closes_only_once_drained():
    async def run():
        clock = FakeClock()
        router = _router(decode_addresses=["a:1", "b:1"], clock=clock)
        _ready(router)
        closed = []
        router.on_worker_closed.append(closed.append)
        leaving = router.decode_workers[1]
        with router.track(leaving):  # a request in flight there
            router.retire_worker("decode", "b:1")
            picks = {router.pick_decode().address for _ in range(4)}
            clock.now += 60
            router.close_drained_workers()
            closed_while_busy = list(closed)
        router.close_drained_workers()  # idle from now on
        closed_at_once = list(closed)
        clock.now += 5.0
        router.close_drained_workers()
        await router.close()
        return picks, closed_while_busy, closed_at_once, closed, leaving

    picks, closed_while_busy, closed_at_once, closed, leaving = asyncio.run(run())
    assert picks == {"a:1"}
    assert closed_while_busy == [] and closed_at_once == []
    assert closed == [leaving]


def test_a_worker_back_before_it_drained_is_the_same_worker():
    async def run():
        router = _router(decode_addresses=["a:1"])
        _ready(router)
        worker = router.decode_workers[0]
        router.retire_worker("decode", "a:1")
        is_unroutable = router.decode_workers == []
        again = router.add_worker("decode", "a:1")
        await router.close()
        return is_unroutable, again is worker, router.retired_workers

    is_unroutable, is_same, retired = asyncio.run(run())
    assert is_unroutable and is_same and retired == []


def test_the_frontend_may_start_with_discovery_instead_of_addresses():
    config = FrontendConfig([], [], decode_discovery="dns:tandem-worker:50063")
    assert config.discovery.is_enabled
    with pytest.raises(ValueError, match="decode_addresses"):
        FrontendConfig([], [])
    with pytest.raises(ValueError, match="prefill_discovery"):
        FrontendConfig([], ["h:1"], prefill_discovery="tandem-prefill:50061")
    with pytest.raises(ValueError, match="discovery_refresh_seconds"):
        FrontendConfig([], [], decode_discovery="file:/x", discovery_refresh_seconds=0)


def test_the_frontend_command_line_takes_discovery_flags_or_their_env(monkeypatch, capsys):
    from services.frontend import main as frontend_main

    monkeypatch.setattr(frontend_main, "configure_process", lambda log_level: None)  # leave pytest's logging be
    assert frontend_main.main(["--decode-discovery", "tandem-decode:50071"]) == 2
    assert "decode_discovery: expected dns:HOST:PORT or file:PATH" in capsys.readouterr().out
    monkeypatch.setenv("TANDEM_DECODE_DISCOVERY", "dns:tandem-decode:50071")
    monkeypatch.setenv("TANDEM_DISCOVERY_REFRESH_SECONDS", "2.5")
    args = frontend_main.build_parser().parse_args([])
    assert (args.decode_discovery, args.discovery_refresh_seconds) == ("dns:tandem-decode:50071", 2.5)
