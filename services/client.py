"""`tandem generate "prompt"`: streams an answer from a running frontend.

    tandem generate "What is the capital of France?"            # chat template, greedy, streamed text
    tandem generate --raw --max-tokens 32 --temperature 0.8 --seed 1 "Once upon a time"
    tandem generate --json "Hi"                                 # token ids, finish reason, usage as JSON
    tandem generate --ssl-ca-certs ca.pem [--ssl-certfile c.pem --ssl-keyfile c.key] "Hi"   # TLS (mutual)

Ctrl-C cancels the call; the frontend then frees the request on every worker.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field

import grpc

from common.tls import add_client_tls_args, client_tls_from_args, dial
from protos import generation_pb2, generation_pb2_grpc

FINISH_REASON_NAMES = {
    generation_pb2.FINISH_REASON_STOP: "stop",
    generation_pb2.FINISH_REASON_LENGTH: "length",
}


@dataclass
class Completion:
    request_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def build_request(args: argparse.Namespace) -> generation_pb2.GenerateRequest:
    sampling = generation_pb2.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, stop=args.stop)
    for name in ("top_p", "top_k", "seed"):
        if getattr(args, name) is not None:
            setattr(sampling, name, getattr(args, name))
    request = generation_pb2.GenerateRequest(sampling=sampling)
    if args.request_id:
        request.request_id = args.request_id
    if args.raw:
        request.text = args.prompt
    else:
        messages = [generation_pb2.ChatMessage(role="user", content=args.prompt)]
        if args.system:
            messages.insert(0, generation_pb2.ChatMessage(role="system", content=args.system))
        request.chat.messages.extend(messages)
    return request


def stream_completion(stub, request, timeout: float | None, on_text=None) -> Completion:
    """Runs one Generate call; `on_text(delta)` sees the text as it arrives."""
    completion = Completion()
    for response in stub.Generate(request, timeout=timeout):
        completion.request_id = response.request_id
        if response.HasField("chunk"):
            completion.token_ids.extend(response.chunk.token_ids)
            completion.text += response.chunk.text
            if on_text is not None and response.chunk.text:
                on_text(response.chunk.text)
        else:
            final = response.final
            completion.finish_reason = FINISH_REASON_NAMES.get(final.finish_reason, "unknown")
            completion.prompt_tokens = final.usage.prompt_tokens
            completion.completion_tokens = final.usage.completion_tokens
    return completion


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem generate", description="Stream an answer from a Tandem frontend.",
                                     allow_abbrev=False)
    parser.add_argument("prompt", help="the question or text to continue")
    parser.add_argument("--address", default=os.environ.get("TANDEM_ADDRESS", "localhost:50051"),
                        help="frontend host:port (env TANDEM_ADDRESS; default localhost:50051)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--system", default=None, help="system message for the chat template")
    parser.add_argument("--raw", action="store_true", help="send the prompt as plain text, no chat template")
    parser.add_argument("--request-id", default=None)
    parser.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    parser.add_argument("--json", action="store_true", help="print token ids, finish reason and usage as JSON")
    add_client_tls_args(parser)
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        tls = client_tls_from_args(args)
    except ValueError as exc:
        print(f"tandem generate: {exc}", file=sys.stderr)
        return 2
    with dial(args.address, tls) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        on_text = None if args.json else (lambda text: print(text, end="", flush=True))
        try:
            completion = stream_completion(stub, build_request(args), args.timeout, on_text)
        except grpc.RpcError as error:
            print(f"\ntandem generate: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\ntandem generate: cancelled", file=sys.stderr)
            return 130
    if args.json:
        print(json.dumps(asdict(completion)))
    else:
        print()
    return 0
