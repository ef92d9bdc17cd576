"""`tandem offline`: input checking, and a real run on the embedded SmolLM2."""

import json

import pytest

from common.engine.sampling_params import DEFAULT_REQUEST_MAX_TOKENS
from services.cli import main as tandem_main
from services.offline import InputError, main, parse_line

FAST_ENGINE = ["--device", "cpu", "--max-model-len", "512", "--kv-cache-memory", "64MiB", "--no-progress"]


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_parse_line_defaults_and_sampling_fields():
    request = parse_line(1, json.dumps({"prompt": "hi", "temperature": 0.5, "seed": 3}))
    assert request.prompt == "hi" and request.messages is None
    assert request.sampling_params.max_tokens == DEFAULT_REQUEST_MAX_TOKENS == 256
    assert request.sampling_params.temperature == 0.5 and request.sampling_params.seed == 3


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"prompt": "hi", "temprature": 0}', r"line 7: unknown field 'temprature'"),
        ('{"prompt": "hi", "messages": []}', "line 7: needs exactly one of"),
        ('{"max_tokens": 3}', "line 7: needs exactly one of"),
        ('{"prompt": "hi", "top_p": 0}', "line 7: top_p must be"),
        ('{"prompt": ""}', "line 7: field 'prompt'"),
        ('{"prompt": "hi",', "line 7: not valid JSON"),
        ('["hi"]', "line 7: expected a JSON object"),
    ],
)
def test_bad_lines_name_line_and_field(text, message):
    with pytest.raises(InputError, match=message):
        parse_line(7, text)


def test_bad_file_fails_before_loading_the_model(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, {"prompt": "b", "stop": ["x"]}])
    # A model that does not exist would fail later: the input error must come first.
    code = main(["--input", str(source), "--output", str(tmp_path / "out.jsonl"), "--model", "/nonexistent"])
    assert code == 2
    assert "line 2: unknown field 'stop'" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.slow
def test_offline_answers_on_embedded_model_in_input_order(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [
        {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 24,
         "temperature": 0},
        {"prompt": "One, two, three,", "max_tokens": 5, "temperature": 0, "ignore_eos": True},
        "",  # blank lines are skipped
        {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0.7,
         "seed": 1},
    ])
    target = tmp_path / "out.jsonl"
    assert tandem_main(["offline", "--input", str(source), "--output", str(target), *FAST_ENGINE]) == 0
    results = [json.loads(line) for line in target.read_text().splitlines()]
    assert len(results) == 3
    assert "Paris" in results[0]["text"]
    assert results[1]["finish_reason"] == "length" and len(results[1]["token_ids"]) == 5
    for result in results:
        usage = result["usage"]
        assert usage["completion_tokens"] == len(result["token_ids"]) > 0
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert result["finish_reason"] in ("stop", "length")
    assert results[0]["usage"]["prompt_tokens"] > results[1]["usage"]["prompt_tokens"]  # chat template adds tokens
