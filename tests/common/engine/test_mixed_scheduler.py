"""Mixed steps (enable_chunked_prefill): one token budget per step, running decodes first, then chunks
of waiting prompts. Scheduler decisions only; tokens are fed back by the test."""

from common.engine.sampling_params import SamplingParams
from common.engine.scheduler import SampledToken
from common.engine.sequence import Sequence
from tests.common.engine.test_scheduler import _handed_off, has_work, make_seq, run_step
from tests.common.engine.test_scheduler import make_scheduler as make_any_scheduler


def make_scheduler(**overrides):
    return make_any_scheduler(**{"enable_chunked_prefill": True, **overrides})


def start_decoding(scheduler, names, num_prompt_tokens=3, max_tokens=50):
    for name in names:
        scheduler.add(make_seq(name, num_prompt_tokens, max_tokens=max_tokens))
    run_step(scheduler)
    assert [seq.request_id for seq in scheduler.running] == list(names)


def test_long_prompt_is_chunked_beside_running_decodes_which_get_a_token_every_step():
    scheduler = make_scheduler(max_num_batched_tokens=10, num_blocks=64)
    start_decoding(scheduler, "abc")
    scheduler.add(make_seq("long", 30))
    plans = []
    while not plans or plans[-1].request_ids[-1:] == ["long"] and not plans[-1].is_sampled[-1]:
        plans.append(run_step(scheduler)[0])
    # 30 prompt tokens at 10 - 3 per step: chunks of 7, 7, 7, 7 and the last 2 (sampled)
    assert [(p.request_ids, p.query_lens, p.is_sampled) for p in plans] == [
        (["a", "b", "c", "long"], [1, 1, 1, 7], [True, True, True, False])] * 4 + [
        (["a", "b", "c", "long"], [1, 1, 1, 2], [True, True, True, True])]
    assert all(p.num_decodes == 3 and p.is_mixed and p.is_prefill for p in plans)
    assert all(p.num_batched_tokens <= 10 for p in plans)
    plan, _ = run_step(scheduler)
    assert plan.request_ids == ["a", "b", "c", "long"] and not plan.is_prefill and plan.num_decodes == 4
    assert [seq.num_output_tokens for seq in scheduler.running] == [7, 7, 7, 2]


def test_prompts_pack_behind_decodes_and_a_new_one_does_not_overtake_a_chunked_one():
    scheduler = make_scheduler(max_num_batched_tokens=12)
    start_decoding(scheduler, "a")
    scheduler.add(make_seq("p", 6))
    scheduler.add(make_seq("q", 20))
    scheduler.add(make_seq("r", 2))
    plan, _ = run_step(scheduler)
    assert (plan.request_ids, plan.query_lens, plan.is_sampled) == (["a", "p", "q"], [1, 6, 5], [True, True, False])
    plan, _ = run_step(scheduler)  # q goes on; r waits behind it
    assert (plan.request_ids, plan.query_lens) == (["a", "p", "q"], [1, 1, 10])
    plan, _ = run_step(scheduler)
    assert (plan.request_ids, plan.query_lens, plan.is_sampled) == (["a", "p", "q", "r"], [1, 1, 5, 2],
                                                                    [True] * 4)


def test_handoffs_decode_before_prompt_chunks_and_max_num_seqs_caps_the_step():
    scheduler = make_scheduler(max_num_seqs=3)
    _handed_off(scheduler, "h1", 5)
    scheduler.add(make_seq("p", 4))
    _handed_off(scheduler, "h2", 5)
    scheduler.add(make_seq("q", 4))
    plan, _ = run_step(scheduler)
    assert plan.request_ids == ["h1", "h2", "p"] and plan.num_decodes == 2
    assert [seq.request_id for seq in scheduler.waiting] == ["q"]  # three running: q waits for a slot


def test_a_step_that_preempts_takes_no_prompts_and_the_preempted_comes_back():
    # 4 blocks of 4: a and b hold 2 blocks each; when a needs a third, b is preempted.
    scheduler = make_scheduler(num_blocks=4, block_size=4)
    scheduler.add(make_seq("a", 7, max_tokens=6))
    scheduler.add(make_seq("b", 7, max_tokens=6))
    run_step(scheduler)
    run_step(scheduler)
    scheduler.add(make_seq("new", 2))
    plan, _ = run_step(scheduler)
    assert plan.request_ids == ["a"] and plan.preempted_request_ids == ["b"]
    assert [seq.request_id for seq in scheduler.waiting] == ["b", "new"]
    while scheduler.running:
        run_step(scheduler)
    plan, _ = run_step(scheduler)  # b re-prefills prompt + its 2 outputs, then new fits beside it
    assert plan.request_ids[0] == "b" and plan.query_lens[0] == 9 and plan.num_decodes == 0
    while has_work(scheduler):
        run_step(scheduler)
    assert scheduler.allocator.usage == 0.0


def test_ahead_plan_continues_chunks_and_decodes_from_tokens_in_flight():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    start_decoding(scheduler, "a")
    scheduler.add(make_seq("long", 12))
    first = scheduler.schedule()
    assert (first.request_ids, first.query_lens) == (["a", "long"], [1, 7])
    scheduler.launched(first)
    ahead = scheduler.schedule_ahead()  # a's token is in flight; long's next chunk needs none
    assert (ahead.request_ids, ahead.query_lens, ahead.is_sampled) == (["a", "long"], [1, 5], [True, True])
    scheduler.launched(ahead)
    a, long = ahead.seqs
    assert first.computed_ends == [4, 7] and ahead.computed_ends == [5, 12]
    assert scheduler.complete(first, [41]) == [(a, 4, 41)]  # one sampled row: long's chunk samples nothing
    assert scheduler.complete(ahead, [42, 43]) == [(a, 5, 42), (long, 12, 43)]
    assert a.token_ids[-3:] == [5, 41, 42] and long.token_ids[-1] == 43


def test_ahead_plan_waits_when_the_next_prompt_needs_host_tokens():
    scheduler = make_scheduler()
    start_decoding(scheduler, "a")
    step = scheduler.schedule()
    scheduler.launched(step)
    seq = Sequence("logprobs", [10, 11, 12], SamplingParams(max_tokens=4, logprobs=2))
    scheduler.add(seq)
    assert scheduler.schedule_ahead() is None  # it starts at an ordinary step, with nothing in flight
    assert seq.block_table == [] and list(scheduler.waiting) == [seq]
    scheduler.complete(step, [5])
    plan, _ = run_step(scheduler)
    assert plan.request_ids == ["a", "logprobs"]


def test_step_at_a_time_policy_still_stalls_decodes_for_prompts():
    scheduler = make_any_scheduler(max_num_batched_tokens=10)
    start_decoding(scheduler, "ab")
    scheduler.add(make_seq("long", 25))
    plans = [run_step(scheduler)[0] for _ in range(3)]
    assert [p.request_ids for p in plans] == [["long"]] * 3 and all(p.num_decodes == 0 for p in plans)


def test_samples_of_a_mixed_step_reach_decodes_and_the_last_chunk():
    scheduler = make_scheduler(max_num_batched_tokens=16)
    start_decoding(scheduler, "a")
    scheduler.add(make_seq("p", 5))
    plan = scheduler.schedule()
    samples = [SampledToken(token_id, None) for token_id in (21, 22)]
    scheduler.postprocess(plan, samples)
    a, p = plan.seqs
    assert a.token_ids[-1] == 21 and p.token_ids[-1] == 22 and p.num_computed_tokens == 5
