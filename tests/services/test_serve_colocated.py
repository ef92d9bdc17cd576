"""`tandem serve --colocated`: where its colocated workers go, what each is told, and what the frontend
is pointed at; flags of the disaggregated layout are refused with it. No process is started here."""

import pytest

from services.placement import WorkerPlacement, place_colocated_workers
from tests.services.test_launcher import serve  # noqa: F401 - the fixture, recording each service's argv
from tests.services.test_serve_checks import FakeLauncher, serve as serve_to_frontend  # noqa: F401


def test_colocated_workers_on_one_gpu_split_0_9_and_one_per_gpu_gets_it_all():
    assert place_colocated_workers(2, "cuda:0", (), None, 1) == [
        WorkerPlacement("worker-0", "worker", "cuda:0", 0.45), WorkerPlacement("worker-1", "worker", "cuda:0", 0.45)]
    assert place_colocated_workers(3, "auto", ("0", "1"), None, 2) == [
        WorkerPlacement("worker-0", "worker", "cuda:0", 0.45), WorkerPlacement("worker-1", "worker", "cuda:1", 0.9),
        WorkerPlacement("worker-2", "worker", "cuda:0", 0.45)]
    assert place_colocated_workers(1, "cpu", (), None, 0) == [WorkerPlacement("worker-0", "worker", "cpu", None)]
    assert place_colocated_workers(2, "auto", ("1",), 0.4, 2)[1].gpu_memory_utilization == 0.4


@pytest.mark.parametrize("args, message", [
    ((0, "cuda", (), None, 1), "--num-workers must be >= 1"),
    ((1, "cuda", (), 1.5, 1), "--worker-gpu-memory-utilization must be in (0, 1]"),
    ((3, "cuda:0", (), 0.5, 1), "would use 1.5 of it"),
    ((1, "cpu", ("0",), None, 1), "--device cpu cannot be combined with --worker-devices"),
    ((2, "auto", ("0", "2"), None, 2), "--worker-devices: GPU 2 is not visible"),
    ((1, "cuda:3", (), None, 1), "--device: GPU 3 is not visible"),
])
def test_bad_colocated_placements_are_one_line_errors(args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        place_colocated_workers(*args)


def test_serve_colocated_starts_workers_that_refuse_hand_offs(serve, capsys):  # noqa: F811
    code, argvs = serve("--colocated", "--num-workers", "2", "--device", "cuda:0", "--model", "dummy:tiny",
                        "--block-size", "32")
    assert code == 1  # the recording launcher stops it at the first wait
    worker_argv = ["worker", "--host", "127.0.0.1", "--port", "0", "--model", "dummy:tiny", "--allowed-kv-senders",
                   "none", "--device", "cuda:0", "--gpu-memory-utilization", "0.45", "--block-size", "32"]
    assert argvs == {"worker-0": worker_argv, "worker-1": worker_argv}
    out = capsys.readouterr().out
    assert "GPU memory on cuda:0: worker-0 0.45 + worker-1 0.45 = 0.9 of it" in out
    assert "starting 2 colocated workers" in out


def test_serve_colocated_points_the_frontend_at_its_workers_only(serve_to_frontend):  # noqa: F811
    code, argvs = serve_to_frontend("--colocated", "--num-workers", "2")
    assert code == 1 and set(argvs) == {"worker-0", "worker-1", "frontend"}
    frontend = argvs["frontend"]
    assert "--prefill-addresses" not in frontend
    assert frontend[frontend.index("--decode-addresses") + 1] == "127.0.0.1:60002,127.0.0.1:60003"  # as FakeLauncher numbers them


@pytest.mark.parametrize("argv, message", [
    (["--colocated", "--num-prefill", "2"], "--num-prefill does not go with --colocated"),
    (["--colocated", "--decode-devices", "1"], "--decode-devices does not go with --colocated"),
    (["--colocated", "--kv-lease-seconds", "3"], "--kv-lease-seconds does not go with --colocated"),
    (["--num-workers", "2"], "--num-workers goes with --colocated"),
    (["--worker-devices", "0"], "--worker-devices goes with --colocated"),
    (["--colocated", "--max-num-waiting", "5"], "worker-0: unrecognized arguments: --max-num-waiting 5"),
])
def test_serve_colocated_rejects_flags_it_cannot_honour(serve, capsys, argv, message):  # noqa: F811
    code, argvs = serve(*argv, num_gpus=1)
    assert (code, argvs) == (2, {})
    err = capsys.readouterr().err
    assert err.startswith("tandem serve: ") and message in err and err.count("\n") == 1
