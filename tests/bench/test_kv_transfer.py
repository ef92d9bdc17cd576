"""bench/kv_transfer.py over real UCX between two processes on CPU (a check of the report, not of its
figures): every configuration and size has a row, the bytes match the layout, both sides timed every
pull, and the table compares each configuration with the first."""

import pytest

from tests.bench.bench_helpers import run_bench

pytest.importorskip("ucxx")


def test_kv_transfer_reports_every_configuration_and_size(tmp_path):
    result, lines = run_bench("kv_transfer.py", [
        "--num-layers", "2", "--num-kv-heads", "2", "--head-dim", "16", "--block-counts", "1,4",
        "--repeats", "4", "--warmup", "1", "--gil-loads", "none,busy", "--switch-intervals", "0.5"],
        tmp_path, timeout=300)
    rows = result["rows"]
    assert [(row["gil_load"], row["num_blocks"]) for row in rows] == [("none", 1), ("none", 4), ("busy", 1), ("busy", 4)]
    block_bytes = 2 * 2 * 16 * 2 * 16 * 2  # K and V, layers, block size, heads, head dim, bfloat16
    for row in rows:
        assert row["mib"] * 2**20 == pytest.approx(row["num_blocks"] * block_bytes)
        assert row["transport"] not in ("", "unknown")
        assert 0 < row["send_ms_p50"] <= row["send_ms_p99"]
        assert 0 < row["recv_ms_p50"] <= row["recv_ms_p99"]
        assert row["send_gb_per_s_p50"] == pytest.approx(row["mib"] * 2**20 / row["send_ms_p50"] / 1e6)
    table = [line for line in lines if line.startswith("| gil=")][-4:]
    assert table[0].endswith("| 1.00x |") and table[1].endswith("| 1.00x |")
