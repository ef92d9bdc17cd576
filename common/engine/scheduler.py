"""Decides what the next forward pass computes; never touches tensors.

Queues a request moves through:

    add() ──► waiting ──(prefill step)──► running ──(decode steps)──► finished (blocks freed)
                 ▲                           ▲  │
                 │   add_prefilled() ──► prefilled (KV complete, waits for a slot; never a prefill step)
                 └──── preempted: blocks freed, re-prefilled later (prompt + output so far)

Policy, with chunked prefill (`enable_chunked_prefill`, the default; vLLM V1's and SGLang's): one token
budget per step, `max_num_batched_tokens`. Running sequences decode first, one token each; chunks of
waiting prompts, in arrival order, fill what is left, so a prompt arriving never stalls running
decodes. One step (a mixed step) can hold both:

    plan.seqs:    [ decode | decode | decode | prompt A, last chunk | prompt B, first chunk ]
    query_lens:   [   1    |   1    |   1    |        40           |   budget - 3 - 40      ]
                  <------- num_decodes ----->
    is_sampled:   [ True   | True   | True   |       True          |        False           ]

Without it (step at a time, as nano-vllm; kept for comparison): prefill steps come first. If
anything in `waiting` can start, the step is a prefill step that packs waiting sequences in arrival
order under the budget (a prompt longer than the budget is split into chunks over several steps);
otherwise the step decodes one token for every running sequence.
Either way a request added while others decode joins at the very next step, and a finished request
leaves `running` in `postprocess`, before the next plan is made.

When a decoding sequence needs a new block and none is free, the most recently started sequence is
preempted (its blocks freed; it goes back to the head of `waiting`); the count is in `num_preemptions`.

With a prefix cache, a sequence starting from scratch first looks up the hashes of its full blocks
(all but its last token: one token is always computed, for logits to sample): it forks the longest
cached run into its block table and computes only the rest. Blocks are registered in the cache as
soon as a step has computed all their tokens, prompt and output alike.

Asynchronous scheduling (the engine's overlap of host work with the device) plans step N+1 while
step N runs, before N's tokens are known:

    schedule() ─► launched(N) ─► schedule_ahead() ─► launched(N+1) ─► complete(N) ─► ...

`launched` counts each row's tokens as computed and appends a placeholder where a token is sampled;
`complete` writes the real tokens in and decides who finished. A sequence that stops at step N is
already in step N+1: that token is dropped. Lengths are known ahead, so a sequence whose in-flight
token is its last by `max_tokens` is left out of the next step. The ahead plan never preempts and
takes no row that needs its tokens on the host (`needs_host_tokens`); without chunked prefill it is
a decode step and never follows waiting prompts. What it cannot plan waits for the tokens in flight
and takes the ordinary path.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from common.engine.sequence import (
    PLACEHOLDER_TOKEN_ID,
    Sequence,
    SequenceStatus,
    TokenLogprobs,
    check_finish,
    needs_host_tokens,
)
from common.kv.block_allocator import BlockAllocator, OutOfKVBlocks
from common.kv.block_count import num_blocks_for
from common.kv.block_hash import extend_block_hashes
from common.kv.prefix_cache import PrefixCache


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int  # most sequences in one step (and in `running`)
    max_num_batched_tokens: int  # most new tokens in one step
    block_size: int  # tokens per KV block
    max_model_len: int  # prompt + output tokens cap per sequence
    enable_chunked_prefill: bool = True  # decodes and prompt chunks share each step's budget (module docstring)


@dataclass
class SchedulerPlan:
    is_prefill: bool  # True: sequences start or resume (query_len >= 1), maybe beside decodes; False: decode only
    seqs: list[Sequence] = field(default_factory=list)  # sequences in this forward pass, in batch order
    query_lens: list[int] = field(default_factory=list)  # new tokens each sequence computes this step
    is_sampled: list[bool] = field(default_factory=list)  # False: a prompt chunk with more chunks to come
    preempted_request_ids: list[str] = field(default_factory=list)  # preempted while making this plan
    num_batched_tokens: int = 0  # sum(query_lens)
    num_decodes: int = 0  # the first num_decodes seqs are running sequences decoding one token each
    # launched steps, per seq: its KV is complete below this position once the step is; a sampled row's
    # token goes at this index of its token_ids
    computed_ends: list[int] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def is_mixed(self) -> bool:
        """Decodes and prompt chunks in one step."""
        return 0 < self.num_decodes < len(self.seqs)

    @property
    def request_ids(self) -> list[str]:
        return [seq.request_id for seq in self.seqs]

    @property
    def sampled_seqs(self) -> list[Sequence]:
        """The sequences that sample a token this step, in batch order (one logits row each)."""
        return [seq for seq, is_sampled in zip(self.seqs, self.is_sampled) if is_sampled]

    def add(self, seq: Sequence, query_len: int, is_sampled: bool) -> None:
        self.seqs.append(seq)
        self.query_lens.append(query_len)
        self.is_sampled.append(is_sampled)
        self.num_batched_tokens += query_len

    def add_decode(self, seq: Sequence) -> None:
        """A running sequence's next token; decodes come before any prompt chunk."""
        if self.num_decodes != len(self.seqs):
            raise ValueError("decodes must come before the prompt chunks of a step")
        self.add(seq, 1, is_sampled=True)
        self.num_decodes += 1


@dataclass
class SampledToken:
    token_id: int  # the token chosen for this sequence
    logprobs: TokenLogprobs | None  # None unless the request asked for logprobs


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator, eos_token_ids: frozenset[int],
                 prefix_cache: PrefixCache | None = None):
        if prefix_cache is not None and prefix_cache.allocator is not allocator:
            raise ValueError("the prefix cache must serve the scheduler's allocator")
        self.config = config
        self.allocator = allocator
        self.prefix_cache = prefix_cache  # None: prefix caching is off
        self.num_prefix_cache_queries_tokens = 0  # tokens of sequences that looked their prefix up
        self.num_prefix_cache_hits_tokens = 0  # of those, tokens found cached (not computed)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.prefilled: deque[Sequence] = deque()  # KV hand-offs waiting for a running slot
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queues a sequence; it starts at the next prefill step that has room for it."""
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    @property
    def num_waiting(self) -> int:
        """Sequences not in the running batch: queued prompts, preempted ones and hand-offs awaiting a slot."""
        return len(self.waiting) + len(self.prefilled)

    def add_prefilled(self, seq: Sequence) -> None:
        """Adds a sequence whose prompt KV is already in its blocks (a KV hand-off).

        It needs exactly what a running sequence needs (its newest token computed), so it joins
        `running` at the next decode step; while `running` is full it waits in `prefilled`, keeping
        its blocks, and never goes through a prefill step.
        """
        seq.status = SequenceStatus.WAITING
        self.prefilled.append(seq)

    def schedule(self) -> SchedulerPlan:
        """The next step, with every token it reads known on the host (nothing in flight)."""
        if self.config.enable_chunked_prefill:
            return self._schedule_mixed()
        plan = SchedulerPlan(is_prefill=True)
        self._schedule_prefill(plan, self.config.max_num_batched_tokens)
        if plan.is_empty and not self.running and not self.prefilled and self._unblock_waiting_head(plan):
            self._schedule_prefill(plan, self.config.max_num_batched_tokens)
        if plan.is_empty:
            self._start_prefilled()
        if plan.is_empty and self.running:
            plan.is_prefill = False
            self._schedule_decode(plan)
        return plan

    def _schedule_mixed(self) -> SchedulerPlan:
        """Running decodes first (preempting when blocks run out), then prompt chunks in what is left."""
        plan = SchedulerPlan(is_prefill=False)
        self._start_prefilled()
        self._schedule_decode(plan)
        if not plan.preempted_request_ids:  # else the prompts would take back the blocks just freed
            self._schedule_prefill(plan, self.config.max_num_batched_tokens - plan.num_batched_tokens)
        if plan.is_empty and not self.running and not self.prefilled and self._unblock_waiting_head(plan):
            self._schedule_prefill(plan, self.config.max_num_batched_tokens)
        plan.is_prefill = plan.num_decodes < len(plan.seqs)
        return plan

    def schedule_ahead(self) -> SchedulerPlan | None:
        """The next step, planned while the launched one is still on the device (module docstring); None
        when it must wait for the tokens in flight (a row needs them on the host, or blocks are short
        without preempting) or has nothing to run."""
        is_mixed = self.config.enable_chunked_prefill
        if self.waiting and (not is_mixed or needs_host_tokens(self.waiting[0])):
            return None
        self._start_prefilled()
        plan = self._schedule_decode_ahead()
        if plan is None:
            return None
        if is_mixed:
            budget = self.config.max_num_batched_tokens - plan.num_batched_tokens
            self._schedule_prefill(plan, budget, is_ahead=True)
            plan.is_prefill = plan.num_decodes < len(plan.seqs)
        return None if plan.is_empty else plan

    def _schedule_decode_ahead(self) -> SchedulerPlan | None:
        """Every running sequence that may still need a token decodes one, or None (nothing planned)."""
        seqs = [seq for seq in self.running if not self._stops_by_length(seq)]
        if any(needs_host_tokens(seq) for seq in seqs):
            return None
        block_size = self.config.block_size
        num_new_blocks = [seq.num_blocks_needed(seq.num_tokens, block_size) for seq in seqs]
        if not self.allocator.can_allocate(sum(num_new_blocks)):
            return None
        plan = SchedulerPlan(is_prefill=False)
        for seq, count in zip(seqs, num_new_blocks):
            if count:
                seq.block_table += self.allocator.allocate(count)
            plan.add_decode(seq)
        return plan

    def _stops_by_length(self, seq: Sequence) -> bool:
        """True when the newest token (known or in flight) is the sequence's last whatever its value."""
        return (seq.num_output_tokens >= seq.sampling_params.max_tokens
                or seq.num_tokens >= self.config.max_model_len)

    def launched(self, plan: SchedulerPlan) -> None:
        """A step's forward is on the device: its tokens count as computed, sampled values to come."""
        computed_ends = plan.computed_ends
        for index, (seq, query_len, is_sampled) in enumerate(zip(plan.seqs, plan.query_lens, plan.is_sampled)):
            seq.num_computed_tokens += query_len
            computed_ends.append(seq.num_computed_tokens)
            if index >= plan.num_decodes:
                # A prompt chunk's token ids are all known: its full blocks are findable at once (a step
                # that forks them runs after this one on the device), not one step later.
                self._cache_full_blocks(seq, seq.num_computed_tokens)
            if is_sampled:
                seq.token_ids.append(PLACEHOLDER_TOKEN_ID)

    def complete(self, plan: SchedulerPlan, token_ids: list[int]) -> list[tuple[Sequence, int, int]]:
        """Writes a launched step's tokens in (`token_ids`: one per `plan.sampled_seqs`); returns
        (sequence, token index, token id) for each token that counts (not where its sequence had already
        stopped: aborted, or finished by the step before). Sequences that finish leave `running` and free
        their blocks (the allocator fences them while steps are in flight)."""
        counted: list[tuple[Sequence, int, int]] = []
        sampled_token_ids = iter(token_ids)
        for seq, end, is_sampled in zip(plan.seqs, plan.computed_ends, plan.is_sampled):
            token_id = next(sampled_token_ids) if is_sampled else None
            if seq.is_finished:
                continue
            self._cache_full_blocks(seq, end)  # KV is complete below `end`; a token at `end` is in flight
            if token_id is None:
                continue  # a prompt chunk with more to come
            seq.token_ids[end] = token_id
            reason = check_finish(seq, self.eos_token_ids, self.config.max_model_len, end + 1)
            if reason is not None:
                del seq.token_ids[end + 1 :]  # a token computed past the end is dropped
                seq.num_computed_tokens = end
                seq.finish_reason = reason
                self._finish(seq, keep_blocks=False)
            counted.append((seq, end, token_id))
        return counted

    def _start_prefilled(self) -> None:
        """Hand-offs join the running batch in arrival order while it has room."""
        while self.prefilled and len(self.running) < self.config.max_num_seqs:
            seq = self.prefilled.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)

    def _schedule_prefill(self, plan: SchedulerPlan, budget: int, is_ahead: bool = False) -> None:
        """Waiting sequences in arrival order, chunked to fit `budget` tokens; `is_ahead` stops at one
        that needs its tokens on the host (it starts at an ordinary step)."""
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if is_ahead and needs_host_tokens(seq):
                break
            is_lookup = self._is_cache_lookup(seq)
            cached_block_ids = self._find_cached_prefix(seq) if is_lookup else []
            num_computed = seq.num_computed_tokens + len(cached_block_ids) * self.config.block_size
            query_len = min(seq.num_tokens - num_computed, budget)
            num_new_blocks = seq.num_blocks_needed(num_computed + query_len, self.config.block_size) \
                - len(cached_block_ids)
            num_revived = sum(1 for block_id in cached_block_ids if self.allocator.ref_count(block_id) == 0)
            if not self.allocator.can_allocate(num_new_blocks + num_revived):
                break
            if is_lookup:
                self._use_cached_prefix(seq, cached_block_ids)
            seq.block_table += self.allocator.allocate(num_new_blocks)
            is_last_chunk = query_len == seq.num_uncomputed_tokens
            plan.add(seq, query_len, is_sampled=is_last_chunk)
            budget -= query_len
            if not is_last_chunk:
                break  # the rest of this prompt goes in the next step; nothing may overtake it
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)

    def _is_cache_lookup(self, seq: Sequence) -> bool:
        """A sequence looks its prefix up when it starts from scratch (new, or preempted)."""
        return self.prefix_cache is not None and seq.num_computed_tokens == 0 and not seq.block_table

    def _find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks of the longest prefix of `seq`, leaving at least its last token to compute."""
        block_size = self.config.block_size
        extend_block_hashes(seq.block_hashes, seq.token_ids, seq.num_tokens - 1, block_size)
        num_lookup_blocks = (seq.num_tokens - 1) // block_size
        return self.prefix_cache.lookup(seq.block_hashes[:num_lookup_blocks])

    def _use_cached_prefix(self, seq: Sequence, cached_block_ids: list[int]) -> None:
        seq.block_table = self.allocator.fork(cached_block_ids)
        seq.num_cached_blocks = len(cached_block_ids)
        seq.num_computed_tokens = len(cached_block_ids) * self.config.block_size
        self.num_prefix_cache_queries_tokens += seq.num_tokens
        self.num_prefix_cache_hits_tokens += seq.num_computed_tokens

    def _cache_full_blocks(self, seq: Sequence, num_tokens_with_kv: int) -> None:
        """Registers the blocks whose KV is complete: every position below `num_tokens_with_kv`
        written by completed steps, and every token id known."""
        if self.prefix_cache is None:
            return
        block_size = self.config.block_size
        num_full_blocks = min(num_tokens_with_kv // block_size, len(seq.block_table))
        if num_full_blocks <= seq.num_cached_blocks:
            return
        extend_block_hashes(seq.block_hashes, seq.token_ids, num_full_blocks * block_size, block_size)
        for index in range(seq.num_cached_blocks, num_full_blocks):
            self.prefix_cache.register(seq.block_table[index], seq.block_hashes[index])
        seq.num_cached_blocks = num_full_blocks

    def _unblock_waiting_head(self, plan: SchedulerPlan) -> bool:
        """Nothing runs, yet the head of `waiting` cannot start: the blocks it lacks are held by
        sequences queued behind it (a part-prefilled prompt, a hand-off). Only recomputing those
        later frees them. Returns whether anything was freed."""
        blocking = [seq for seq in list(self.waiting)[1:] if seq.block_table]
        for seq in blocking:
            self._reset(seq, plan)
        return bool(blocking)

    def _schedule_decode(self, plan: SchedulerPlan) -> None:
        scheduled: deque[Sequence] = deque()
        while self.running:
            seq = self.running.popleft()
            # The newest token's KV is written this step, at position num_tokens - 1.
            num_new_blocks = seq.num_blocks_needed(seq.num_tokens, self.config.block_size)
            while not self.allocator.can_allocate(num_new_blocks) and self.running:
                self._preempt(self.running.pop(), plan)
            if not self.allocator.can_allocate(num_new_blocks):
                self._preempt(seq, plan)
                continue
            seq.block_table += self.allocator.allocate(num_new_blocks)
            plan.add_decode(seq)
            scheduled.append(seq)
        self.running = scheduled

    def _preempt(self, seq: Sequence, plan: SchedulerPlan) -> None:
        self._reset(seq, plan)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _reset(self, seq: Sequence, plan: SchedulerPlan) -> None:
        self._free_blocks(seq)
        seq.num_computed_tokens = 0
        plan.preempted_request_ids.append(seq.request_id)
        self.num_preemptions += 1

    def postprocess(self, plan: SchedulerPlan, samples: list[SampledToken | None]) -> list[Sequence]:
        """Records what a step computed and sampled; returns the sequences that finished.

        Finished sequences leave `running` here and free their blocks, except prefill-only ones,
        whose blocks stay held (the caller owns them until it releases them).
        """
        finished: list[Sequence] = []
        for seq, query_len, sample in zip(plan.seqs, plan.query_lens, samples):
            seq.num_computed_tokens += query_len
            self._cache_full_blocks(seq, seq.num_computed_tokens)
            if sample is None:
                continue
            seq.append_token(sample.token_id, sample.logprobs)
            seq.finish_reason = check_finish(seq, self.eos_token_ids, self.config.max_model_len)
            if seq.finish_reason is not None or seq.is_prefill_only:
                self._finish(seq, keep_blocks=seq.is_prefill_only)
                finished.append(seq)
        return finished

    def abort(self, seq: Sequence) -> None:
        """Removes a waiting or running sequence and frees its blocks."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.prefilled:
            self.prefilled.remove(seq)
        elif seq in self.running:
            self.running.remove(seq)
        self._free_blocks(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "abort"

    def release(self, seq: Sequence) -> None:
        """Frees the blocks of a sequence that finished with its blocks held."""
        self._free_blocks(seq)

    def _finish(self, seq: Sequence, keep_blocks: bool) -> None:
        self.running.remove(seq)
        seq.status = SequenceStatus.FINISHED
        if not keep_blocks:
            self._free_blocks(seq)

    def _free_blocks(self, seq: Sequence) -> None:
        if seq.block_table:
            self.allocator.free(seq.block_table[::-1])  # the tail first: cached tail blocks are evicted first
            seq.block_table = []
            seq.num_cached_blocks = 0

    # ---- KV hand-offs (decode worker) ----------------------------------------------------------

    def reserve_handoff(self, block_hashes: list[bytes], num_prompt_tokens: int) -> tuple[list[int], int]:
        """Blocks for a prompt whose KV arrives by hand-off: the longest cached run of its full blocks
        (`block_hashes`), forked, then new blocks for the rest. The last block always comes over the
        wire (so a hand-off always pulls, and its ack releases the sender's blocks):

            prompt blocks:  [ cached | cached | new | new ]      returns (block ids, 2)

        Forked blocks are held, so no allocation evicts them while the rest is in flight. Raises
        OutOfKVBlocks (holding nothing) when the new and revived blocks do not fit.
        """
        block_size = self.config.block_size
        cached_block_ids: list[int] = []
        if self.prefix_cache is not None:
            num_lookup_blocks = min((num_prompt_tokens - 1) // block_size, len(block_hashes))
            cached_block_ids = self.prefix_cache.lookup(block_hashes[:num_lookup_blocks])
        num_new_blocks = num_blocks_for(num_prompt_tokens, block_size) - len(cached_block_ids)
        num_revived = sum(1 for block_id in cached_block_ids if self.allocator.ref_count(block_id) == 0)
        if not self.allocator.can_allocate(num_new_blocks + num_revived):
            raise OutOfKVBlocks(num_new_blocks + num_revived, self.allocator.num_free_blocks)
        block_ids = self.allocator.fork(cached_block_ids) + self.allocator.allocate(num_new_blocks)
        if self.prefix_cache is not None:
            self.num_prefix_cache_queries_tokens += num_prompt_tokens
            self.num_prefix_cache_hits_tokens += len(cached_block_ids) * block_size
        return block_ids, len(cached_block_ids)

    def cache_handed_off(self, seq: Sequence) -> None:
        """A hand-off's prompt KV is complete in its blocks: its full blocks join the prefix cache (the
        reused ones, its first `num_cached_blocks`, are there already); decode steps add its output's."""
        self._cache_full_blocks(seq, seq.num_computed_tokens)
