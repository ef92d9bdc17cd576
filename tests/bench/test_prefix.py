"""bench/prefix.py: the chat workload, and a CPU run of all three configurations through real prefill,
decode and frontend processes (tiny model) whose JSON figures must agree with each other."""

from bench._chat_workload import chat_workload, split_jobs
from tests.bench.bench_helpers import run_bench

NUM_CONVERSATIONS, NUM_TURNS, SYSTEM_PROMPT_LEN, MAX_USER_LEN, MAX_ANSWER_LEN = 4, 3, 64, 24, 6


def test_the_workload_shares_one_system_prompt_and_is_seeded():
    workload = chat_workload(5, 3, 100, 1000, 50, 20, rate=2.0, seed=3)
    again = chat_workload(5, 3, 100, 1000, 50, 20, rate=2.0, seed=3)
    assert workload == again and workload != chat_workload(5, 3, 100, 1000, 50, 20, rate=2.0, seed=4)
    assert len(workload.system_prompt) == 100 and workload.num_turns == 15
    lengths = [len(u) for c in workload.conversations for u in c.user_turns]
    assert all(4 <= n <= 50 for n in lengths) and len(set(lengths)) > 1
    assert all(4 <= n <= 20 for c in workload.conversations for n in c.answer_lens)
    offsets = [c.start_offset for c in workload.conversations]
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] > 0
    longest = max(sum(map(len, c.user_turns)) + sum(c.answer_lens[:-1]) for c in workload.conversations)
    assert workload.max_prompt_len() == 100 + longest
    jobs = split_jobs("run", "x:1", workload, num_processes=2, time_limit=10)
    assert [c.conversation_id for job in jobs for c in job.conversations] == [0, 2, 4, 1, 3]


def test_a_tiny_cpu_run_reports_consistent_figures(tmp_path):
    result, lines = run_bench("prefix.py", [
        "--device", "cpu", "--model", "dummy:tiny", "--num-conversations", str(NUM_CONVERSATIONS),
        "--num-turns", str(NUM_TURNS), "--system-prompt-len", str(SYSTEM_PROMPT_LEN),
        "--max-user-len", str(MAX_USER_LEN), "--max-answer-len", str(MAX_ANSWER_LEN), "--warmup-requests", "1",
        "--rate", "8", "--client-processes", "1", "--log-dir", str(tmp_path / "logs")], tmp_path, timeout=400)
    assert result["failure"] is None and list(result["runs"]) == ["off-rr", "on-rr", "on-kv"]
    num_turns = NUM_CONVERSATIONS * NUM_TURNS
    runs = result["runs"]
    prompt_tokens = {run["prompt_tokens"] for run in runs.values()}
    assert len(prompt_tokens) == 1  # answers have fixed lengths: every configuration sends the same prompts
    for name, run in runs.items():
        assert run["num_turns"] == run["num_completed"] == num_turns and run["num_errors"] == 0, name
        assert run["all_turns"]["num_turns"] == num_turns
        assert run["later_turns"]["num_turns"] == num_turns - NUM_CONVERSATIONS
        ttft = run["all_turns"]["ttft_ms"]
        assert 0 < ttft["p50"] <= ttft["p99"]
        assert run["prefill_tokens_computed"] + run["prefix_cache_hits_tokens"] == run["prompt_tokens"]
        assert run["hit_rate"] == run["prefix_cache_hits_tokens"] / run["prompt_tokens"]
        assert sum(v for k, v in run["hits_by_worker"].items() if k.startswith("prefill")) == \
            run["prefix_cache_hits_tokens"]
        # every hand-off's bytes: from the decode workers' stats and from the spans, all turns and later ones
        assert run["kv_bytes_transferred"] == run["kv_bytes_from_spans"] == run["all_turns"]["kv_bytes"] > 0
        assert 0 < run["later_turns"]["kv_bytes"] < run["all_turns"]["kv_bytes"]
    assert runs["off-rr"]["prefix_cache_queries_tokens"] == runs["off-rr"]["prefix_cache_hits_tokens"] == 0
    system_blocks_tokens = SYSTEM_PROMPT_LEN // 16 * 16
    for name in ("on-rr", "on-kv"):
        run = runs[name]
        assert run["prefix_cache_queries_tokens"] == run["prompt_tokens"]  # each turn looked up once
        # later turns find at least the system prompt (most of them: one sent to a worker that has not
        # seen it yet may miss); no turn reuses its last token
        assert system_blocks_tokens * (num_turns - NUM_CONVERSATIONS) // 2 <= run["prefix_cache_hits_tokens"]
        assert run["prefix_cache_hits_tokens"] <= run["prompt_tokens"] - num_turns
        assert run["kv_bytes_transferred"] <= runs["off-rr"]["kv_bytes_transferred"]
    router = runs["on-kv"]["router"]
    assert router["router_prompt_tokens_total:prefill"] >= runs["on-kv"]["prompt_tokens"]  # + warm-up
    assert 0 < router["router_cached_prompt_tokens_total:prefill"] <= router["router_prompt_tokens_total:prefill"]
    assert runs["on-rr"]["router"]["router_cached_prompt_tokens_total:prefill"] == 0  # counted in kv mode only
    assert lines[-5].startswith("tiny float32: 2P1D") and lines[-4].split()[:3] == ["config", "turns", "TTFT"]
    assert [line.split()[0] for line in lines[-3:]] == ["off-rr", "on-rr", "on-kv"]  # the table comes last
