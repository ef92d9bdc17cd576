"""Runs every Triton kernel variant serving can hit, once, before a worker reports SERVING.

Triton compiles a kernel once per variant (kernels/launch_utils.py says what tells variants apart),
and the first step needing a new one stalls the engine thread for the compile. Dtypes, head sizes and
weight shapes are fixed per model, and sizes that follow a step (block-table widths, split counts)
are do_not_specialize; what still picks a variant is:

    what varies while serving          what it picks                        warmed up by
    tokens in a step, 1..4             GEMV rows of each projection         prefill steps of 1..4 tokens
    rows sampled, 1..4                 GEMV rows of the LM head             decode forwards of 1..4 rows
    tokens in a step                   SiLU-and-mul BLOCK                   activation.token_counts_per_block
    only one-token queries             decode attention (else prefill)      both kinds of prefill step
    decodes beside prompt chunks       both attention kernels, split        a mixed step
    decode rows x plan length          split-KV plus reduce, or one pass    plans of one block and max_model_len
    first norm of a forward            RMSNorm without residual             any forward

Decode batches on the CUDA-graph ladder were compiled at capture; a larger batch runs the same
forward eagerly, warmed here one row past the ladder. Token counts of each specialisation class
(1, multiples of 16, others), ragged batches, chunked prefill and both sampling paths run too, so a
change that makes any of them pick a new variant shows up in the variant keys (tests).

Nothing is allocated: every warm-up sequence's block table repeats the scratch block (the pool's
last block, which the allocator never hands out and padded decode rows already write), so the
values are garbage but finite and no request ever reads them. The scheduler, the allocator and the
engine's stats are not touched; the sampler's shared generator is restored afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import torch

from common.engine.sampling_params import SamplingParams
from common.engine.scheduler import SchedulerPlan
from common.engine.sequence import Sequence
from common.kv.block_count import num_blocks_for
from common.model.ops import GEMV_MAX_ROWS

logger = logging.getLogger(__name__)

GREEDY = SamplingParams(temperature=0)
# One step samples with each of these: the full sampler (seeded and unseeded draws) beside the greedy rows.
MIXED_SAMPLING = (
    SamplingParams(temperature=0, logprobs=2),
    SamplingParams(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05, seed=1, repetition_penalty=1.2),
    SamplingParams(temperature=1.0, frequency_penalty=0.5, presence_penalty=0.5),  # the shared generator
    GREEDY,
    GREEDY,
)


@dataclass(frozen=True)
class WarmupQuery:
    """One sequence of a warm-up prefill step."""

    query_len: int  # new tokens this step
    context_len: int  # tokens of KV it attends to, the new ones included
    is_sampled: bool = True  # False: a prompt chunk with more to come
    params: SamplingParams = field(default_factory=lambda: GREEDY)
    is_decode: bool = False  # a running sequence's decode, at the front of a mixed step (query_len 1)


def warm_up(engine) -> None:
    """Runs `engine`'s prefill and decode paths over every kernel variant serving can hit.

    Call it before the engine serves (nothing else may use it meanwhile); a no-op unless the model
    runs the Triton kernels.
    """
    if engine.model.attention_backend.name != "triton":
        return
    from kernels.launch_utils import num_compiled_variants

    runner = engine.model_runner
    start, num_compiled_before = time.perf_counter(), num_compiled_variants()
    generator_state = runner.sampler.generator.get_state()
    try:
        steps = prefill_steps(engine)
        for step_index, queries in enumerate(steps):
            runner.run(_plan(engine, step_index, queries))
        shapes = decode_shapes(engine)
        for num_rows, plan_context_len in shapes:
            _run_decode(runner, num_rows, plan_context_len)
        _warm_up_kv_copies(engine)
    finally:
        runner.sampler.generator.set_state(generator_state)
    logger.info("kernel warm-up: %d prefill steps, %d decode steps, %d variants compiled in %.1f s",
                len(steps), len(shapes), num_compiled_variants() - num_compiled_before, time.perf_counter() - start)


def _warm_up_kv_copies(engine) -> None:
    """The hand-off's gather (on its side stream) and scatter, on the scratch block: their first use
    loads kernels and creates the stream, which must not happen while a pull waits."""
    scratch_block_id = engine.kv_pool.num_blocks - 1
    engine.kv_pool.scatter_blocks([scratch_block_id], engine.kv_pool.gather_blocks([scratch_block_id]))


def prefill_steps(engine) -> list[list[WarmupQuery]]:
    """The warm-up's prefill steps that fit the engine's limits (see the module docstring)."""
    from kernels.activation import token_counts_per_block

    steps = [[WarmupQuery(n, n)] for n in range(1, GEMV_MAX_ROWS + 1)]
    steps += [
        [WarmupQuery(1, 9), WarmupQuery(1, 20)],  # only one-token queries: the decode attention kernel
        [WarmupQuery(16, 16)],
        [WarmupQuery(17, 17)],
        [WarmupQuery(5, 5), WarmupQuery(16, 16), WarmupQuery(1, 9), WarmupQuery(7, 7)],  # ragged
        [WarmupQuery(16, 40, is_sampled=False)],  # a chunk of a longer prompt, nothing sampled
        [WarmupQuery(9, 25), WarmupQuery(3, 3)],  # the prompt's last chunk beside a new one
        # a mixed step: decodes, then a prompt's last chunk and another's first
        [WarmupQuery(1, 9, is_decode=True), WarmupQuery(1, 20, is_decode=True), WarmupQuery(16, 40),
         WarmupQuery(5, 9, is_sampled=False)],
        [WarmupQuery(n, n, params=params) for n, params in zip((3, 1, 4, 2, 6), MIXED_SAMPLING)],
    ]
    intermediate = engine.model_config.intermediate_size
    steps += [_one_prompt(engine, n) for n in token_counts_per_block(intermediate, engine.device)]
    return [step for step in steps if _fits(engine, step)]


def decode_shapes(engine) -> list[tuple[int, int]]:
    """(rows, plan context length) of the eager decode forwards: GEMV row counts at a short plan, the
    longest plan (where decode splits, if it ever does), and one row past the CUDA-graph ladder."""
    runner = engine.model_runner
    max_rows, max_len = runner.decode_buffers.max_num_seqs, engine.max_model_len
    short_len = min(engine.config.block_size, max_len)
    shapes = [(n, short_len) for n in range(1, GEMV_MAX_ROWS + 1)] + [(1, max_len)]
    if runner.graph_runner is not None:
        past_ladder = runner.graph_runner.batch_sizes[-1] + 1
        shapes += [(past_ladder, short_len), (past_ladder, max_len)]
    return [(num_rows, length) for num_rows, length in shapes if num_rows <= max_rows]


def _one_prompt(engine, num_tokens: int) -> list[WarmupQuery]:
    """A step of `num_tokens` new tokens, in as few sequences as max_model_len allows."""
    longest = engine.max_model_len - 1
    return [WarmupQuery(min(longest, num_tokens - start), min(longest, num_tokens - start))
            for start in range(0, num_tokens, longest)]


def _fits(engine, queries: list[WarmupQuery]) -> bool:
    config = engine.config
    return (len(queries) <= config.max_num_seqs
            and sum(q.query_len for q in queries) <= config.max_num_batched_tokens
            and max(q.context_len for q in queries) < engine.max_model_len)


def _plan(engine, step_index: int, queries: list[WarmupQuery]) -> SchedulerPlan:
    """A prefill plan of throwaway sequences whose block tables all point at the scratch block."""
    scratch_block_id = engine.kv_pool.num_blocks - 1
    if scratch_block_id < engine.allocator.num_blocks:
        raise RuntimeError("the KV pool has no scratch block past the allocator's blocks")
    block_size, vocab_size = engine.config.block_size, engine.model_config.vocab_size
    plan = SchedulerPlan(is_prefill=True)
    for index, query in enumerate(queries):
        token_ids = [(31 * position + 7 * index + 3) % vocab_size for position in range(query.context_len)]
        seq = Sequence(f"warm-up-{step_index}-{index}", token_ids, query.params)
        seq.block_table = [scratch_block_id] * num_blocks_for(query.context_len, block_size)
        seq.num_computed_tokens = query.context_len - query.query_len
        if query.is_decode:
            plan.add_decode(seq)
        else:
            plan.add(seq, query.query_len, query.is_sampled)
    return plan


def _run_decode(runner, num_rows: int, plan_context_len: int) -> None:
    """One eager decode forward of `num_rows` padding rows (the scratch path CUDA-graph capture uses)."""
    is_cuda = runner.device.type == "cuda"
    with torch.inference_mode(), torch.cuda.device(runner.device) if is_cuda else contextlib.nullcontext():
        runner.decode_buffers.fill_padding(num_rows)
        logits = runner.decode_forward(num_rows, plan_context_len)  # [num_rows, V]
        logits.argmax(dim=-1).tolist()
