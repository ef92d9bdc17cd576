"""The frontend process never imports torch (1 s+ of start-up and memory it has no use for).

Checked in a fresh interpreter, since this test process has torch loaded already: every module of
the frontend package, the CLI that starts it, and what they import.
"""

import json
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

_PROBE = """
import importlib, json, pkgutil, sys
import services.frontend
names = ["services.cli", "services.frontend.main"]
names += [m.name for m in pkgutil.walk_packages(services.frontend.__path__, "services.frontend.")]
for name in names:
    importlib.import_module(name)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "triton"))
print(json.dumps({"imported": names, "heavy": heavy}))
"""


def _probe() -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_frontend_modules_import_without_torch():
    result = _probe()
    assert "services.frontend.app" in result["imported"] and "services.frontend.openai.server" in result["imported"]
    assert result["heavy"] == [], f"the frontend imported {result['heavy'][:5]}"


def test_frontend_help_imports_no_torch():
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "services.cli", "frontend", "--help"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line]
    assert "services.frontend.app" in imported  # the subcommand's module was loaded, not only the CLI's usage
    assert "torch" not in imported
