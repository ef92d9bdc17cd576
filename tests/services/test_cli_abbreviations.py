"""Every command refuses abbreviated flags: `--max-tok` must not silently mean `--max-tokens` (nor, after
a new flag is added, something else)."""

import pytest

from common import healthcheck, otlp_collector
from services import client, offline


@pytest.mark.parametrize("run, argv", [
    (client.main, ["--max-tok", "4", "hello"]),
    (offline.parse_args, ["--inp", "in.jsonl", "--output", "out.jsonl"]),
    (healthcheck.main, ["--addr", "localhost:1"]),
], ids=["generate", "offline", "healthcheck"])
def test_abbreviated_flags_are_refused(run, argv, capsys):
    with pytest.raises(SystemExit) as info:
        run(argv)
    assert info.value.code == 2  # a usage error; taken as the full flag, the command would have run
    error = capsys.readouterr().err
    assert "unrecognized arguments" in error or "arguments are required" in error


def test_the_span_collector_refuses_them_too():
    source = open(otlp_collector.__file__).read()
    assert "allow_abbrev=False" in source
