"""Turns one row of logits per sequence into the next token, batched over the rows.

Order of processing (vLLM's): penalties → greedy argmax, or temperature → min-p → top-k → top-p →
draw. Logprobs are the raw model's (log_softmax of the unprocessed logits), as vLLM returns by default.

Drawing uses the exponential race: token = argmax(probs / q) with q ~ Exponential(1) per vocabulary
entry, which picks token i with probability probs[i]. A seeded request draws its q from a generator
seeded by mix(seed, output index), so its tokens do not depend on the batch it lands in or on which
worker samples which token (prefill samples index 0, decode the rest). Unseeded requests share the
engine's generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.engine.sampling_params import SamplingParams
from common.engine.sequence import TokenLogprobs

_MASK64 = (1 << 64) - 1


def mix_seed(seed: int, output_index: int) -> int:
    """A 64-bit seed for draw `output_index` of a request seeded with `seed` (SplitMix64)."""
    x = (seed * 0x9E3779B97F4A7C15 + output_index * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@dataclass
class SamplingRow:
    """What the sampler needs to know about one sequence."""

    params: SamplingParams
    output_index: int  # how many tokens the request has generated so far (prefill samples index 0)
    prompt_token_ids: list[int]  # for the repetition penalty
    output_token_ids: list[int]  # for all three penalties


def apply_penalties(
    logits: torch.Tensor,  # [N, V] fp32
    rows: list[SamplingRow],
) -> torch.Tensor:  # [N, V]
    """Repetition penalty over prompt + output tokens; frequency/presence over output tokens."""
    num_rows, vocab_size = logits.shape
    device = logits.device
    repetition = torch.tensor([r.params.repetition_penalty for r in rows], device=device)[:, None]
    frequency = torch.tensor([r.params.frequency_penalty for r in rows], device=device)[:, None]
    presence = torch.tensor([r.params.presence_penalty for r in rows], device=device)[:, None]
    output_counts = _token_counts([r.output_token_ids for r in rows], num_rows, vocab_size, device)
    prompt_counts = _token_counts([r.prompt_token_ids for r in rows], num_rows, vocab_size, device)
    is_seen = (output_counts + prompt_counts) > 0
    penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(is_seen, penalized, logits)
    return logits - frequency * output_counts - presence * (output_counts > 0).float()


def _token_counts(token_lists: list[list[int]], num_rows: int, vocab_size: int, device) -> torch.Tensor:
    counts = torch.zeros(num_rows, vocab_size, device=device)  # [N, V]
    for i, token_ids in enumerate(token_lists):
        if token_ids:
            index = torch.tensor(token_ids, dtype=torch.int64, device=device)
            counts[i].index_add_(0, index, torch.ones(len(token_ids), device=device))
    return counts


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Masks tokens with prob < min_p * max prob. logits [N, V], min_p [N] (0 = off)."""
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keeps the top_k highest logits per row (ties at the k-th value kept). top_k [N] long, 0 = off."""
    vocab_size = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab_size), torch.full_like(top_k, vocab_size))
    sorted_logits = logits.sort(dim=-1, descending=True).values
    kth_value = sorted_logits.gather(-1, (k - 1)[:, None])  # [N, 1]
    return logits.masked_fill(logits < kth_value, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keeps the smallest set of most likely tokens whose probability sums to >= top_p. top_p [N]."""
    sorted_logits, sorted_index = logits.sort(dim=-1, descending=False)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)  # ascending probs, summed
    is_dropped = cumulative <= (1 - top_p)[:, None]
    is_dropped[:, -1] = False  # the most likely token always stays
    mask = torch.zeros_like(is_dropped).scatter(-1, sorted_index, is_dropped)
    return logits.masked_fill(mask, float("-inf"))


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_top: list[int]) -> list[TokenLogprobs]:
    """Raw logprobs of the chosen tokens plus the top-n per row. logits [N, V], token_ids [N]."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [N, V]
    chosen = logprobs.gather(-1, token_ids[:, None])[:, 0].tolist()
    top_values, top_index = logprobs.topk(max(num_top), dim=-1) if max(num_top) > 0 else (None, None)
    results = []
    for i, n in enumerate(num_top):
        top_ids = top_index[i, :n].tolist() if n else []
        top_lps = top_values[i, :n].tolist() if n else []
        results.append(TokenLogprobs(int(token_ids[i]), chosen[i], top_ids, top_lps))
    return results


class Sampler:
    """Batched sampling; `generator` serves requests without a seed."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> tuple[list[int], list[TokenLogprobs | None]]:
        """logits [N, V] fp32, one row per entry of `rows` -> (token ids, logprobs or None) per row."""
        raw_logits = logits
        token_ids = self.choose(logits, rows)
        wants_logprobs = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        logprobs: list[TokenLogprobs | None] = [None] * len(rows)
        if wants_logprobs:
            index = torch.tensor(wants_logprobs, device=logits.device)
            num_top = [rows[i].params.logprobs for i in wants_logprobs]
            for i, lp in zip(wants_logprobs, compute_logprobs(raw_logits[index], token_ids[index], num_top)):
                logprobs[i] = lp
        return token_ids.tolist(), logprobs

    @torch.inference_mode()
    def choose(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """The chosen token of each row, left on the device: logits [N, V] fp32 -> [N] int64."""
        if any(r.params.has_penalties for r in rows):
            logits = apply_penalties(logits, rows)
        is_greedy = [r.params.is_greedy for r in rows]
        if all(is_greedy):
            return logits.argmax(dim=-1)
        return self._draw(logits, rows, is_greedy)

    def _draw(self, logits: torch.Tensor, rows: list[SamplingRow], is_greedy: list[bool]) -> torch.Tensor:
        device = logits.device
        temperatures = torch.tensor([r.params.temperature or 1.0 for r in rows], device=device)
        scaled = logits / temperatures[:, None]
        if any(r.params.min_p > 0 for r in rows):
            scaled = apply_min_p(scaled, torch.tensor([r.params.min_p for r in rows], device=device))
        if any(r.params.top_k > 0 for r in rows):
            scaled = apply_top_k(scaled, torch.tensor([r.params.top_k for r in rows], device=device))
        if any(r.params.top_p < 1 for r in rows):
            scaled = apply_top_p(scaled, torch.tensor([r.params.top_p for r in rows], device=device))
        probs = torch.softmax(scaled, dim=-1)  # [N, V]
        noise = self._exponential_noise(rows, probs.shape[-1], device)  # [N, V]
        drawn = (probs / noise).argmax(dim=-1)
        greedy = logits.argmax(dim=-1)
        return torch.where(torch.tensor(is_greedy, device=device), greedy, drawn)

    def _exponential_noise(self, rows: list[SamplingRow], vocab_size: int, device) -> torch.Tensor:
        noise = torch.empty(len(rows), vocab_size, device=device)
        unseeded = [i for i, r in enumerate(rows) if r.params.seed is None]
        if unseeded:
            shared = torch.empty(len(unseeded), vocab_size, device=device).exponential_(generator=self.generator)
            noise[unseeded] = shared
        for i, row in enumerate(rows):
            if row.params.seed is not None:
                generator = torch.Generator(device=device).manual_seed(mix_seed(row.params.seed, row.output_index))
                noise[i].exponential_(generator=generator)
        return noise.clamp_(min=torch.finfo(noise.dtype).tiny)  # q = 0 would turn probs / q into inf or nan
