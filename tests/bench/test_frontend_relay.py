"""bench/frontend_relay.py: the stand-ins continue the text from character boundaries, and a --quick run
through the real frontend relays every token of every request, on both paths (a check, not a speed)."""

import pytest

from bench._relay_standins import make_script
from common.model.registry import resolve_model
from common.tokenizer import load_tokenizer
from tests.bench.bench_helpers import run_bench


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model(None).folder)  # the embedded SmolLM2's, as the frontend loads it


def test_prompts_and_continuations_start_on_character_boundaries(tokenizer):
    script = make_script(tokenizer)
    assert len(script.char_starts) < len(script.token_ids)  # the text has characters split across tokens
    for index in range(len(script.char_starts)):
        prompt = script.prompt(index)
        start = script.continuation_start(prompt)
        output = script.output(start, 0, 12)
        assert not tokenizer.decode(prompt).startswith("\ufffd") and not tokenizer.decode(output).startswith("\ufffd")
        assert "\ufffd" not in tokenizer.decode(prompt)  # it ends on a boundary too


def test_quick_run_relays_every_token_on_both_paths(tmp_path):
    result, lines = run_bench("frontend_relay.py", ["--quick", "--concurrency", "3,8", "--requests-per-client", "2",
                                                    "--max-tokens", "40"], tmp_path, timeout=300)
    levels = {(r["concurrency"], r["path"]): r for r in result["results"]}
    assert set(levels) == {(3, "grpc"), (3, "http"), (8, "grpc"), (8, "http")}
    for (concurrency, _), level in levels.items():
        assert level["errors"] == []
        assert level["num_requests"] == concurrency * 2  # each checked token for token and by text
        assert level["num_tokens"] == concurrency * 2 * 40
        assert level["messages_per_second"] > 0 and level["frontend_cpu_percent"] > 0
    assert "tokens/s" in lines[-6] and lines[-1].split()[-1] == "ok"


def test_quick_run_through_two_api_servers_counts_each_ones_requests(tmp_path):
    result, lines = run_bench("frontend_relay.py", ["--quick", "--concurrency", "6", "--requests-per-client", "2",
                                                    "--max-tokens", "24", "--api-server-count", "2"],
                              tmp_path, timeout=300)
    for level in result["results"]:
        assert level["errors"] == [] and level["num_requests"] == 12 and level["num_tokens"] == 12 * 24
        assert set(level["requests_by_api_server"]) == {"0", "1"}  # both processes report on the one /metrics
        assert sum(level["requests_by_api_server"].values()) == 12  # every request admitted by one of them
    assert "2 frontend process(es)" in lines[-5] and lines[-1].split()[-1] == "ok"
