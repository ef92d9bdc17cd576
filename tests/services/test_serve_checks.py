"""`tandem serve` checks every flag (its own and each worker's, with the workers' own parsers) before it
starts anything, takes no abbreviated flags, passes tracing to every service, and removes its
temporary log folder; its restart back-off doubles up to a cap. No process is started here."""

import signal
import sys
import time
from pathlib import Path

import pytest

from services import launcher
from services.decode.main import build_parser as decode_parser
from services.decode.main import parse_kv_senders
from services.prefill.main import build_parser as prefill_parser
from services.supervisor import Backoff, Launcher
from tests.services.test_launcher import RecordingLauncher


class FakeLauncher(RecordingLauncher):
    """Stands in for `launcher.Launcher`: workers are 'ready' at once; the frontend's wait stops `main`."""

    instances: list["FakeLauncher"] = []

    def wait_ready(self, services, timeout_seconds):
        for index, service in enumerate(services):
            if service.name == "frontend":
                raise RuntimeError("stopped at the frontend")
            service.address = f"127.0.0.1:{60000 + len(self.argvs) + index}"


@pytest.fixture
def serve(monkeypatch):
    """serve(*argv) -> (exit code, {service name: argv} or None when nothing was started)."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(launcher, "Launcher", FakeLauncher)
    monkeypatch.setattr(launcher, "visible_gpu_count", lambda: 0)
    FakeLauncher.instances.clear()

    def run(*argv: str):
        code = launcher.main(list(argv))
        return code, FakeLauncher.instances[-1].argvs if FakeLauncher.instances else None

    yield run
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("argv, message", [
    (["--num-pre", "2"], "unrecognized arguments: --num-pre 2"),  # an abbreviation of --num-prefill
    (["--num-prefill", "x"], "argument --num-prefill: invalid int value: 'x'"),
    (["--block-size", "x"], "prefill-0: argument --block-size: invalid int value: 'x'"),
    (["--no-such-flag"], "prefill-0: unrecognized arguments: --no-such-flag"),
    (["--block-si", "32"], "prefill-0: unrecognized arguments: --block-si 32"),  # an abbreviated worker flag
    (["--max-num-waiting", "5"], "decode-0: unrecognized arguments: --max-num-waiting 5"),  # every worker gets it
    (["--kv-lease-seconds", "-1"], "prefill-0: --kv-lease-seconds must be > 0"),
    (["--max-model-len", "0"], "prefill-0: max_model_len must be a positive int"),
    (["--kv-port", "7000"], "--kv-port is set by tandem serve for each worker"),
    (["--port", "70000"], "--port must be in [0, 65535]"),
    (["--model", "/no/such/model"], "--model: model '/no/such/model' is neither a local folder"),
    (["--model", "dummy:no-such-preset"], "--model: unknown model preset 'no-such-preset'"),
    (["--metrics-port", "9400"], "--metrics-port 9400 would be every worker's"),
])
def test_a_bad_flag_is_one_line_and_exit_2_before_anything_starts(serve, capsys, argv, message):
    code, started = serve(*argv)
    err = capsys.readouterr().err
    assert (code, started) == (2, None), err
    assert err.startswith("tandem serve: ") and message in err and err.count("\n") == 1, err


def test_abbreviated_flags_are_refused_by_every_service_parser():
    from services.frontend.main import build_parser as frontend_parser

    parsers = ((prefill_parser(), "--kv-lease"), (decode_parser(), "--max-num-admit"),
               (frontend_parser(), "--max-num-req"))
    for parser, flag in parsers:
        with pytest.raises(SystemExit):
            parser.parse_args([flag, "5"])
    assert launcher.build_parser().allow_abbrev is False


def test_tracing_reaches_the_frontend_and_every_worker(serve, tmp_path):
    code, argvs = serve("--otlp-traces-endpoint", "http://collector:4317", "--log-dir", str(tmp_path))
    assert code == 1  # the fake launcher stops it at the frontend's wait
    for name in ("prefill-0", "decode-0", "frontend"):
        argv = argvs[name]
        assert argv[argv.index("--otlp-traces-endpoint") + 1] == "http://collector:4317", name


def test_workers_bind_the_worker_host_and_decode_trusts_only_the_prefill_kv_listeners(serve, tmp_path):
    code, argvs = serve("--num-prefill", "2", "--log-dir", str(tmp_path))
    prefill_kv = [f"127.0.0.1:{argvs[name][argvs[name].index('--kv-port') + 1]}" for name in ("prefill-0", "prefill-1")]
    decode = argvs["decode-0"]
    assert decode[decode.index("--allowed-kv-senders") + 1] == ",".join(prefill_kv)
    for name in ("prefill-0", "prefill-1", "decode-0"):
        assert argvs[name][argvs[name].index("--host") + 1] == "127.0.0.1", name
    assert argvs["frontend"][argvs["frontend"].index("--host") + 1] == "0.0.0.0"


def test_the_temporary_log_folder_is_removed_at_exit_and_a_given_one_kept(serve, monkeypatch, tmp_path):
    temporary_root = tmp_path / "tmp"
    temporary_root.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(temporary_root))
    serve()
    assert list(temporary_root.iterdir()) == []
    kept = tmp_path / "logs"
    serve("--log-dir", str(kept))
    assert kept.is_dir()


def test_allowed_kv_senders_flag():
    assert parse_kv_senders(None) is None
    assert parse_kv_senders("10.0.0.5:7000, h:1") == frozenset({"10.0.0.5:7000", "h:1"})
    for bad in ("", "10.0.0.5", "h:99999"):
        with pytest.raises(ValueError, match="--allowed-kv-senders"):
            parse_kv_senders(bad)


def test_restart_backoff_doubles_to_its_cap_and_resets_after_staying_up():
    backoff = Backoff(initial_seconds=1, max_seconds=8, reset_after_seconds=60)
    assert [backoff.next_delay(uptime_seconds=2) for _ in range(6)] == [1, 2, 4, 8, 8, 8]
    assert backoff.next_delay(uptime_seconds=60) == 1  # it had stayed up: start over
    assert backoff.next_delay(uptime_seconds=0) == 2


def test_a_dead_worker_is_restarted_after_its_back_off_and_a_dead_frontend_stops_supervision(tmp_path, capsys):
    supervisor = Launcher(tmp_path, threads_per_service=1)
    supervisor.command = [sys.executable, "-c", "import time; time.sleep(60)"]  # stands in for `tandem`
    try:
        worker = supervisor.start("decode-0", ["decode", "--host", "127.0.0.1", "--port", "0"], is_restartable=True)
        frontend = supervisor.start("frontend", ["frontend", "--port", "0"])
        worker.ready_at = frontend.ready_at = time.monotonic()  # as if both had answered SERVING
        worker.address, first_pid, frontend_pid = "127.0.0.1:5000", worker.process.pid, frontend.process.pid
        worker.process.kill()
        worker.process.wait()
        assert supervisor.supervise() == []
        assert "decode-0 (pid %d) was killed by SIGKILL; restarting it in 1s on 127.0.0.1:5000" % first_pid in (
            capsys.readouterr().out)
        time.sleep(1.1)
        supervisor.supervise()
        assert worker.process.pid != first_pid and worker.process.poll() is None
        assert frontend.process.pid == frontend_pid
        frontend.process.kill()
        frontend.process.wait()
        with pytest.raises(RuntimeError, match="frontend was killed by SIGKILL"):
            supervisor.supervise()
    finally:
        supervisor.stop_all()
    assert worker.process.poll() is not None


def test_make_serve_passes_args():
    makefile = (Path(launcher.__file__).parents[1] / "Makefile").read_text()
    assert "$(BIN)/tandem serve $(ARGS)" in makefile
