"""`tandem serve`'s placement: which device and GPU share each worker gets, and the flags it passes."""

import os
import signal
from pathlib import Path

import pytest

from services import launcher
from services.placement import PlacementFlags, WorkerPlacement, describe, parse_gpu_indices, place_workers


def _by_name(placements: list[WorkerPlacement]) -> dict[str, tuple[str, float | None]]:
    return {p.name: (p.device, p.gpu_memory_utilization) for p in placements}


def test_one_gpu_gives_prefill_a_quarter_and_decode_the_rest_of_0_9():
    placements = place_workers(PlacementFlags(device="cuda:0"), num_gpus=1)
    assert _by_name(placements) == {"prefill-0": ("cuda:0", 0.25), "decode-0": ("cuda:0", 0.65)}
    assert describe(placements) == ["GPU memory on cuda:0: prefill-0 0.25 + decode-0 0.65 = 0.9 of it"]
    assert placements[0].argv() == ["--device", "cuda:0", "--gpu-memory-utilization", "0.25"]


def test_decode_workers_split_what_prefill_leaves_and_never_sum_past_it():
    placements = place_workers(PlacementFlags(num_prefill=2, num_decode=3, device="cuda"), num_gpus=8)
    shares = _by_name(placements)
    assert shares["prefill-1"] == ("cuda", 0.25)
    assert shares["decode-0"] == shares["decode-2"] == ("cuda", 0.1333)
    assert sum(share for _, share in shares.values()) <= 0.9


def test_role_overrides_apply_to_every_worker_of_the_role():
    flags = PlacementFlags(num_decode=2, device="cuda:1", prefill_gpu_memory_utilization=0.1)
    assert _by_name(place_workers(flags, num_gpus=2)) == {
        "prefill-0": ("cuda:1", 0.1), "decode-0": ("cuda:1", 0.4), "decode-1": ("cuda:1", 0.4)}
    both = PlacementFlags(device="cuda", prefill_gpu_memory_utilization=0.3, decode_gpu_memory_utilization=0.3)
    assert _by_name(place_workers(both, num_gpus=1)) == {"prefill-0": ("cuda", 0.3), "decode-0": ("cuda", 0.3)}


def test_role_devices_are_round_robin_and_each_gpu_is_split_among_its_own_workers():
    flags = PlacementFlags(num_prefill=3, num_decode=3, prefill_devices=("0",), decode_devices=("1,2",))
    assert _by_name(place_workers(flags, num_gpus=3)) == {
        "prefill-0": ("cuda:0", 0.3), "prefill-1": ("cuda:0", 0.3), "prefill-2": ("cuda:0", 0.3),
        "decode-0": ("cuda:1", 0.45), "decode-1": ("cuda:2", 0.9), "decode-2": ("cuda:1", 0.45)}
    shared = PlacementFlags(num_decode=2, prefill_devices=("0",), decode_devices=("cuda:0", "cuda:1"))
    assert _by_name(place_workers(shared, num_gpus=None)) == {
        "prefill-0": ("cuda:0", 0.25), "decode-0": ("cuda:0", 0.65), "decode-1": ("cuda:1", 0.9)}


def test_cpu_gets_no_gpu_share():
    assert _by_name(place_workers(PlacementFlags(device="cpu"), num_gpus=4)) == {
        "prefill-0": ("cpu", None), "decode-0": ("cpu", None)}
    assert _by_name(place_workers(PlacementFlags(), num_gpus=0)) == {
        "prefill-0": ("auto", None), "decode-0": ("auto", None)}
    assert _by_name(place_workers(PlacementFlags(), num_gpus=None))["decode-0"] == ("auto", 0.65)
    assert WorkerPlacement("decode-0", "decode", "cpu", None).argv() == ["--device", "cpu"]


@pytest.mark.parametrize("flags, num_gpus, message", [
    (PlacementFlags(prefill_devices=("0",)), 2, "--prefill-devices and --decode-devices go together"),
    (PlacementFlags(prefill_devices=("0",), decode_devices=("x",)), 2, "--decode-devices takes GPU indices"),
    (PlacementFlags(prefill_devices=("0",), decode_devices=("2",)), 2, "--decode-devices: GPU 2 is not visible"),
    (PlacementFlags(device="cuda:1"), 1, "--device: GPU 1 is not visible"),
    (PlacementFlags(device="cuda"), 0, "--device: no GPU is visible"),
    (PlacementFlags(device="cpu", prefill_devices=("0",), decode_devices=("1",)), 2, "--device cpu cannot"),
    (PlacementFlags(device="tpu"), 1, "--device must be auto, cpu, cuda or cuda:N"),
    (PlacementFlags(device="cuda", prefill_gpu_memory_utilization=1.5), 1, "--prefill-gpu-memory-utilization must"),
    (PlacementFlags(device="cuda", num_prefill=4), 1, "leave nothing of 0.9 for decode workers"),
    (PlacementFlags(device="cuda", decode_gpu_memory_utilization=0.8), 1, "would use 1.05 of it"),
    (PlacementFlags(num_decode=0), 1, "--num-decode must be >= 1"),
])
def test_bad_flags_are_one_line_errors(flags, num_gpus, message):
    with pytest.raises(ValueError, match=message) as error:
        place_workers(flags, num_gpus)
    assert "\n" not in str(error.value)


def test_gpu_lists():
    assert parse_gpu_indices(["0", "1"], "--x") == parse_gpu_indices(["0,1"], "--x") == [0, 1]
    assert parse_gpu_indices(["cuda:3"], "--x") == [3]


# ---- `tandem serve` end to end, with a launcher that records instead of starting processes -------

class RecordingLauncher:
    """Stands in for `launcher.Launcher`: records each service's argv, then stops `main` at the wait."""

    instances: list["RecordingLauncher"] = []

    def __init__(self, log_dir: Path, threads_per_service: int, ready_timeout_seconds: float = 600.0):
        self.log_dir = log_dir
        self.argvs: dict[str, list[str]] = {}
        type(self).instances.append(self)

    def start(self, name: str, argv: list[str], is_restartable: bool = False):
        self.argvs[name] = argv
        return launcher.Service(name, None, self.log_dir / f"{name}.ready.json", self.log_dir / f"{name}.log")

    def wait_ready(self, services, timeout_seconds):
        raise RuntimeError("recorded")

    def stop_all(self):
        pass


@pytest.fixture
def serve(monkeypatch, tmp_path):
    """serve(*argv, num_gpus=1) -> (exit code, {service name: argv}); no process is started."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(launcher, "Launcher", RecordingLauncher)
    monkeypatch.setattr(launcher, "free_port", iter(range(7001, 7100)).__next__)  # prefill KV ports
    RecordingLauncher.instances.clear()

    def run(*argv: str, num_gpus: int | None = 1):
        monkeypatch.setattr(launcher, "visible_gpu_count", lambda: num_gpus)
        code = launcher.main([*argv, "--log-dir", str(tmp_path)])
        return code, RecordingLauncher.instances[-1].argvs if RecordingLauncher.instances else {}

    yield run
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def test_serve_passes_each_worker_its_device_share_and_the_engine_flags(serve, capsys):
    code, argvs = serve("--num-decode", "2", "--device", "cuda:0", "--model", "dummy:tiny", "--block-size", "32")
    assert code == 1  # the recording launcher stops it at the first wait
    decode_argv = ["decode", "--host", "127.0.0.1", "--port", "0", "--model", "dummy:tiny",
                   "--allowed-kv-senders", "127.0.0.1:7001", "--device", "cuda:0",
                   "--gpu-memory-utilization", "0.325", "--block-size", "32"]
    assert argvs == {
        "prefill-0": ["prefill", "--host", "127.0.0.1", "--port", "0", "--model", "dummy:tiny",
                      "--kv-host", "127.0.0.1", "--kv-port", "7001", "--device", "cuda:0",
                      "--gpu-memory-utilization", "0.25", "--block-size", "32"],
        "decode-0": decode_argv,
        "decode-1": decode_argv,
    }
    assert "GPU memory on cuda:0: prefill-0 0.25 + decode-0 0.325 + decode-1 0.325 = 0.9 of it" in capsys.readouterr().out


def test_serve_places_roles_on_their_gpus(serve):
    code, argvs = serve("--prefill-devices", "0", "--decode-devices", "1", "--kv-lease-seconds", "5",
                        "--decode-gpu-memory-utilization", "0.8", num_gpus=2)
    assert argvs["prefill-0"] == ["prefill", "--host", "127.0.0.1", "--port", "0", "--kv-host", "127.0.0.1",
                                  "--kv-port", "7001", "--kv-lease-seconds", "5.0", "--device", "cuda:0",
                                  "--gpu-memory-utilization", "0.9"]
    assert argvs["decode-0"] == ["decode", "--host", "127.0.0.1", "--port", "0", "--allowed-kv-senders",
                                 "127.0.0.1:7001", "--device", "cuda:1", "--gpu-memory-utilization", "0.8"]


@pytest.mark.parametrize("argv, message", [
    (["--prefill-devices", "0", "--decode-devices", "1"], "--decode-devices: GPU 1 is not visible"),
    (["--gpu-memory-utilization", "0.5"], "--gpu-memory-utilization is per worker here"),
    (["--device", "cuda", "--num-prefill", "4"], "leave nothing of 0.9 for decode workers"),
])
def test_serve_rejects_bad_flags_before_starting_anything(serve, capsys, argv, message):
    code, argvs = serve(*argv, num_gpus=1)
    assert (code, argvs) == (2, {})
    err = capsys.readouterr().err
    assert err.startswith("tandem serve: ") and message in err and err.count("\n") == 1


def test_serve_hands_the_api_key_to_the_services_by_environment_only(serve, monkeypatch):
    monkeypatch.setenv("TANDEM_API_KEY", "")  # so monkeypatch restores the variable after serve sets it
    monkeypatch.delenv("TANDEM_API_KEY")
    code, argvs = serve("--api-key", "s3cret", "--model", "dummy:tiny")
    assert code == 1 and argvs
    assert os.environ["TANDEM_API_KEY"] == "s3cret"  # Launcher copies the environment for each service
    assert not any("s3cret" in arg for argv in argvs.values() for arg in argv)
    assert serve("--api-key", "", "--model", "dummy:tiny")[0] == 2
