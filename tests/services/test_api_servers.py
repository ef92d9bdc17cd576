"""`--api-server-count` without starting a frontend: port reservation, flags, merged metrics, `tandem serve`.

The processes themselves (both serving, Abort, SIGTERM, a killed API server) are in
tests/e2e/test_api_server_processes.py."""

import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from common.metrics import MULTIPROCESS_DIR_VARIABLE, ServiceMetrics, exposition_registry, merged_registry
from services import launcher
from services.frontend import main as frontend_main
from services.frontend.api_servers import reserve_port
from services.frontend.app import FrontendConfig
from tests.e2e.cluster import REPO_ROOT, service_env


def _listening(port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def test_a_reserved_port_takes_reuse_port_listeners_only_and_leaves_them_every_connection():
    holder = reserve_port("127.0.0.1", 0, "--port")
    port = holder.getsockname()[1]
    with holder, socket.socket() as plain:
        with pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))  # another program cannot take it
        listeners = []
        for _ in range(2):  # what each API server does
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listener.bind(("127.0.0.1", port))
            listener.listen()
            listener.settimeout(0)
            listeners.append(listener)
        for _ in range(8):  # the holder never listens, so every connection reaches a listener
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass
        num_accepted = 0
        for listener in listeners:
            while True:
                try:
                    listener.accept()[0].close()
                except BlockingIOError:
                    break
                num_accepted += 1
            listener.close()
        assert num_accepted == 8


def test_a_port_another_program_serves_is_refused_naming_the_flag():
    with _listening(0) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=rf"cannot listen on 127.0.0.1:{port} \(--http-port\)"):
            reserve_port("127.0.0.1", port, "--http-port")


def test_the_frontend_refuses_a_taken_port_in_one_line_before_starting_api_servers(capsys):
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with _listening(0) as taken:
        port = taken.getsockname()[1]
        code = frontend_main.main(["--decode-addresses", "127.0.0.1:1", "--host", "127.0.0.1", "--port", "0",
                                   "--http-port", str(port), "--api-server-count", "2"])
    assert code == 2
    out = capsys.readouterr().out
    assert out == f"tandem frontend: cannot listen on 127.0.0.1:{port} (--http-port): Address already in use\n"
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers  # nothing was started


@pytest.mark.parametrize("fields, message", [
    ({"api_server_count": 0}, "api_server_count: must be >= 1, got 0"),
    ({"api_server_count": 2, "api_server_index": 2}, r"api_server_index: must be in \[0, 1\], got 2"),
    ({"api_server_index": -1}, r"api_server_index: must be in \[0, 0\], got -1"),
])
def test_frontend_config_checks_the_api_server_fields(fields, message):
    with pytest.raises(ValueError, match=message):
        FrontendConfig([], ["127.0.0.1:1"], **fields)


def test_the_api_server_count_comes_from_the_flag_or_the_environment(monkeypatch):
    assert frontend_main.build_parser().parse_args([]).api_server_count == 1
    monkeypatch.setenv("TANDEM_API_SERVER_COUNT", "3")
    args = frontend_main.build_parser().parse_args([])
    assert (args.api_server_count, args.api_server_index) == (3, None)
    assert frontend_main.build_parser().parse_args(["--api-server-count", "2"]).api_server_count == 2


_RECORD = textwrap.dedent("""
    import sys
    from common.metrics import ServiceMetrics
    from services.frontend.api_server_metrics import ApiServerMetrics
    from prometheus_client import CollectorRegistry
    index, num_requests = int(sys.argv[1]), int(sys.argv[2])
    metrics = ServiceMetrics(role="frontend", model_name="m")
    api_server = ApiServerMetrics(metrics.registry, "m", index)
    for _ in range(num_requests):
        api_server.request_admitted()
        metrics.observe_request_finished("length", 0.5)
    metrics.set_queue_sizes(num_running=num_requests, num_waiting=0)
""")


def test_the_api_servers_metrics_merge_into_one_set_of_series(tmp_path, monkeypatch):
    """Two processes as two API servers: counters and histograms summed, the open-request gauge summed
    (no per-process series), and api_server_requests_total kept apart by process."""
    env = service_env() | {MULTIPROCESS_DIR_VARIABLE: str(tmp_path)}
    for index, num_requests in ((0, 3), (1, 5)):
        subprocess.run([sys.executable, "-c", _RECORD, str(index), str(num_requests)], env=env, cwd=REPO_ROOT,
                       check=True, timeout=60)
    merged = merged_registry(str(tmp_path))
    labels = {"model_name": "m", "role": "frontend"}

    def value(name: str, **extra) -> float | None:
        return merged.get_sample_value(name, labels | extra)

    assert value("tandem:request_success_total", finished_reason="length") == 8
    assert value("tandem:e2e_request_latency_seconds_count") == 8
    assert value("tandem:api_server_requests_total", api_server="0") == 3
    assert value("tandem:api_server_requests_total", api_server="1") == 5
    # A live-sum gauge: the written processes are not running any more, but were never marked dead.
    assert value("tandem:num_requests_running") == 8
    running = [s for m in merged.collect() if m.name == "tandem:num_requests_running" for s in m.samples]
    assert len(running) == 1 and "pid" not in running[0].labels

    monkeypatch.setenv(MULTIPROCESS_DIR_VARIABLE, str(tmp_path))
    own = ServiceMetrics(role="frontend", model_name="m").registry
    assert exposition_registry(own).get_sample_value("tandem:api_server_requests_total",
                                                     labels | {"api_server": "1"}) == 5
    monkeypatch.delenv(MULTIPROCESS_DIR_VARIABLE)
    assert exposition_registry(own) is own


def _serve_args(*argv: str):
    return launcher.build_parser().parse_known_args(list(argv))[0]


def test_serve_passes_the_api_server_count_to_the_frontend_only_when_not_one():
    assert "--api-server-count" not in launcher.frontend_argv(_serve_args(), [], ["127.0.0.1:1"])
    argv = launcher.frontend_argv(_serve_args("--api-server-count", "4"), [], ["127.0.0.1:1"])
    assert argv[argv.index("--api-server-count") + 1] == "4"


def test_serve_refuses_an_api_server_count_below_one():
    with pytest.raises(ValueError, match="--api-server-count must be >= 1, got 0"):
        launcher.check_flags(_serve_args("--api-server-count", "0"), [], [], {})
