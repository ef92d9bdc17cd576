"""`tandem offline`: batch inference from a JSONL file in one process, no servers.

    tandem offline --input prompts.jsonl --output out.jsonl [engine flags]

Each input line is a JSON object with either `prompt` (plain text) or `messages` (chat messages,
rendered with the model's chat template), plus optional sampling fields named as in
`SamplingParams` (`max_tokens` defaults to 256). Each output line, in input order:

    {"text": ..., "token_ids": [...], "finish_reason": "stop" | "length",
     "usage": {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}}

The whole file is checked before the model loads, so a typo on line 900 fails in a second.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from common.engine.args import add_engine_args, engine_config_from_args
from common.engine.sampling_params import DEFAULT_REQUEST_MAX_TOKENS, SamplingParams

PROMPT_FIELDS = ("prompt", "messages")


class InputError(ValueError):
    """A line of the input file is malformed; the message names the line and the field."""


@dataclass
class OfflineRequest:
    line_number: int  # 1-based, for error messages
    prompt: str | None  # plain text prompt, or
    messages: list | None  # chat messages
    sampling_params: SamplingParams


def parse_line(line_number: int, text: str) -> OfflineRequest:
    """One JSONL line -> request; raises InputError naming the line and the offending field."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"line {line_number}: not valid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise InputError(f"line {line_number}: expected a JSON object, got {type(record).__name__}")
    sampling_fields = SamplingParams.field_names()
    for name in record:
        if name not in PROMPT_FIELDS and name not in sampling_fields:
            raise InputError(
                f"line {line_number}: unknown field {name!r} (allowed: {', '.join(PROMPT_FIELDS + sampling_fields)})"
            )
    present = [name for name in PROMPT_FIELDS if name in record]
    if len(present) != 1:
        raise InputError(f"line {line_number}: needs exactly one of 'prompt' or 'messages', got {present or 'none'}")
    prompt, messages = record.get("prompt"), record.get("messages")
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        raise InputError(f"line {line_number}: field 'prompt' must be a non-empty string")
    if messages is not None and (not isinstance(messages, list) or not messages):
        raise InputError(f"line {line_number}: field 'messages' must be a non-empty list of chat messages")
    sampling = {name: value for name, value in record.items() if name in sampling_fields}
    sampling.setdefault("max_tokens", DEFAULT_REQUEST_MAX_TOKENS)
    try:
        params = SamplingParams(**sampling)
    except (ValueError, TypeError) as error:
        raise InputError(f"line {line_number}: {error}") from None
    return OfflineRequest(line_number, prompt, messages, params)


def read_requests(path: Path) -> list[OfflineRequest]:
    requests = []
    with open(path, encoding="utf-8") as handle:
        for line_number, text in enumerate(handle, start=1):
            if text.strip():
                requests.append(parse_line(line_number, text))
    if not requests:
        raise InputError(f"{path} has no requests")
    return requests


def tokenize(tokenizer, request: OfflineRequest) -> list[int]:
    from common.tokenizer import TokenizerError, apply_chat_template, encode_prompt

    try:
        if request.messages is not None:
            return apply_chat_template(tokenizer, request.messages)
        return encode_prompt(tokenizer, request.prompt)
    except TokenizerError as error:
        raise InputError(f"line {request.line_number}: {error}") from None


def generate(engine, tokenizer, requests: list[OfflineRequest], show_progress: bool = True) -> list[dict]:
    """Runs every request through one engine; results in input order."""
    prompts = [tokenize(tokenizer, request) for request in requests]
    for index, (request, prompt) in enumerate(zip(requests, prompts)):
        try:
            engine.add_request(str(index), prompt, request.sampling_params)
        except ValueError as error:
            raise InputError(f"line {request.line_number}: {error}") from None
    token_ids: list[list[int]] = [[] for _ in requests]
    finish_reasons: list[str | None] = [None] * len(requests)
    with tqdm(total=len(requests), desc="Generating", unit="req", disable=not show_progress) as bar:
        while engine.has_unfinished_requests():
            for output in engine.step():
                index = int(output.request_id)
                token_ids[index] += output.new_token_ids
                if output.finished:
                    finish_reasons[index] = output.finish_reason
                    bar.update(1)
    return [
        {
            "text": tokenizer.decode(tokens, skip_special_tokens=True),
            "token_ids": tokens,
            "finish_reason": reason,
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(tokens),
                      "total_tokens": len(prompt) + len(tokens)},
        }
        for prompt, tokens, reason in zip(prompts, token_ids, finish_reasons)
    ]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tandem offline", description="Batch inference from a JSONL file.",
                                     allow_abbrev=False)
    parser.add_argument("--input", required=True, type=Path, help="JSONL: one {prompt|messages, ...} per line")
    parser.add_argument("--output", required=True, type=Path, help="JSONL results, in input order")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_engine_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        requests = read_requests(args.input)
        config = engine_config_from_args(args)
        from common.engine.llm_engine import LLMEngine  # after the input checks: loading takes a while
        from common.tokenizer import load_tokenizer

        engine = LLMEngine(config)
        if engine.model_folder is None:
            raise InputError(f"model {config.model!r} has no tokenizer; offline needs one to read prompts")
        results = generate(engine, load_tokenizer(engine.model_folder), requests, not args.no_progress)
    except (ValueError, FileNotFoundError) as error:
        print(f"tandem offline: error: {error}", file=sys.stderr)
        return 2
    with open(args.output, "w", encoding="utf-8") as handle:
        for result in results:
            handle.write(json.dumps(result, ensure_ascii=False) + "\n")
    return 0
