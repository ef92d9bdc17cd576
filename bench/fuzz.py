"""The long fuzz run: tests/e2e/test_fuzz.py with many examples and a seed, reported as JSON.

    nice -n 19 .venv/bin/python bench/fuzz.py --examples 10000 --seed 1 --output docs/results/fuzz-cpu.json
    nice -n 19 .venv/bin/python bench/fuzz.py --examples 10000 --seconds 2400 ...   # at most ~40 min of fuzzing

Runs the fuzz tests in a pytest subprocess (one real `tandem serve` on a tiny model, started once) with
TANDEM_FUZZ_EXAMPLES / TANDEM_FUZZ_SEED, and TANDEM_FUZZ_KEEP_GOING=1 so that a violation is recorded and
the run goes on. The report: every (target, call kind, status) count, each violation with its input, the
wall time, and whether the checks after the fuzzing passed (pools free, services SERVING, a greedy request
unchanged). Exits 1 when anything failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0]).resolve() == REPO_ROOT / "bench":
    sys.path[0] = str(REPO_ROOT)  # run as a script: import the repository's packages, not bench/*

from bench._common import write_json  # noqa: E402

TEST_FILE = "tests/e2e/test_fuzz.py"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=10_000, help="hypothesis examples over all targets")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=None,
                        help="time budget for the fuzzing (split over the targets like the examples); default none")
    parser.add_argument("--timeout", type=float, default=3 * 3600, help="seconds before the run is stopped")
    parser.add_argument("--output", default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    if args.examples < 1:
        parser.error("--examples must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tandem-fuzz-") as folder:
        report_path = Path(folder) / "report.json"
        env = dict(os.environ, TANDEM_FUZZ_EXAMPLES=str(args.examples), TANDEM_FUZZ_SEED=str(args.seed),
                   TANDEM_FUZZ_KEEP_GOING="1", TANDEM_FUZZ_REPORT=str(report_path), OMP_NUM_THREADS="1")
        if args.seconds is not None:
            env["TANDEM_FUZZ_SECONDS"] = str(args.seconds)
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST_FILE]
        started = time.monotonic()
        result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
        wall_seconds = time.monotonic() - started
        report = json.loads(report_path.read_text()) if report_path.exists() else {}
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "wall_seconds": wall_seconds, "pytest_exit_code": result.returncode, "pytest_summary": summary, **report,
    }
    if result.returncode != 0:  # where the first failure is told, and the summary
        first = result.stdout.find("___")
        report["pytest_output_first_failure"] = result.stdout[max(first, 0):][:6000]
        report["pytest_output_tail"] = result.stdout[-6000:]
    for key, count in report.get("counts", {}).items():
        print(f"{count:7d}  {key}")
    num_examples = sum(report.get("num_examples", {}).values())
    print(f"{report.get('num_calls', 0)} calls from {num_examples} examples (seed {args.seed}) in {wall_seconds:.0f}s; "
          f"{len(report.get('violations', []))} violations; pytest: {summary}")
    write_json(args.output, report)
    return 0 if result.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
