"""What `LLMEngine.step()` hands back: one `RequestOutput` per request that produced something."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.engine.sequence import TokenLogprobs

FINISH_REASONS = ("stop", "length", "abort")


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]  # tokens sampled in this step (one, or none for an abort)
    new_logprobs: list[TokenLogprobs] | None  # one per new token when the request asked for logprobs
    finished: bool  # no more outputs will come for this request from this engine
    # "stop" (EOS / stop token), "length" (max_tokens / max_model_len), "abort", or None while running.
    # A prefill-only request finishes after token #1 with finish_reason None when decoding should go
    # on elsewhere, or "stop"/"length" when token #1 already ended the generation.
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int  # output tokens so far, including the new ones
    kv_block_ids: list[int] | None = None  # prefill-only: the held blocks with the prompt's KV


@dataclass
class EngineStats:
    """A snapshot of the engine's gauges and counters (vLLM metric meanings)."""

    num_running: int  # sequences decoding
    num_waiting: int  # sequences queued for (re-)prefill
    num_free_blocks: int
    num_total_blocks: int
    kv_cache_usage: float  # fraction of KV blocks in use, [0, 1]
    num_preemptions: int  # total sequences preempted so far
    prompt_tokens_total: int  # prompt tokens prefilled (each request counted once)
    generation_tokens_total: int  # tokens sampled
    finished_reasons: dict[str, int] = field(default_factory=dict)  # finish reason -> requests
    prefix_cache_queries_tokens: int = 0  # tokens of prompts looked up in the prefix cache
    prefix_cache_hits_tokens: int = 0  # of those, tokens found cached and not computed
