"""KV pool sizing from fake memory figures: a process's share ignores what other processes hold."""

import argparse
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from common.engine import kv_budget, model_runner
from common.engine.args import add_engine_args, engine_config_from_args
from common.engine.config import EngineConfig
from common.engine.kv_budget import MemoryProfile, kv_bytes_for_utilization, num_kv_blocks
from common.kv.layout import KVLayout

GIB = 2**30
H200_BYTES = int(139.8 * GIB)
# SmolLM2-135M in bfloat16: 30 layers x K,V x 3 heads x 64 x 2 B = 23,040 bytes a token
SMOLLM2 = KVLayout(model_name="SmolLM2", num_layers=30, block_size=16, num_kv_heads=3, head_dim=64, dtype="bfloat16")


def _profile(free_bytes: int, total_bytes: int = H200_BYTES) -> MemoryProfile:
    """A SmolLM2 worker after its profile: 0.27 GiB of weights, 2.5 GiB peak, 0.1 GiB of decode
    graphs, a 0.5 GiB CUDA context."""
    return MemoryProfile(total_bytes=total_bytes, free_bytes=free_bytes, torch_reserved_bytes=int(0.27 * GIB),
                         peak_torch_bytes=int(2.5 * GIB), cuda_graph_bytes=int(0.1 * GIB),
                         non_torch_bytes=GIB // 2)


def test_the_share_is_utilization_times_total_less_this_process_own_memory():
    kv_bytes = kv_bytes_for_utilization(_profile(free_bytes=100 * GIB), 0.3, "cuda:0")
    assert kv_bytes == int(0.3 * H200_BYTES) - int(2.5 * GIB) - int(0.1 * GIB) - GIB // 2  # the context once


@pytest.mark.parametrize("others_bytes", [0, 20 * GIB, int(0.3 * H200_BYTES), 90 * GIB])
def test_the_budget_ignores_other_processes_usage(others_bytes):
    alone = _profile(free_bytes=H200_BYTES - _profile(0).used_bytes)
    shared = replace(alone, free_bytes=alone.free_bytes - others_bytes)
    assert kv_bytes_for_utilization(shared, 0.3, "cuda:0") == kv_bytes_for_utilization(alone, 0.3, "cuda:0")


class FakeGPU:
    """Processes start one after the other; each measures only itself, sees the others in `free`."""

    def __init__(self, total_bytes: int):
        self.total_bytes = total_bytes
        self.held_bytes: dict[str, int] = {}

    def start(self, name: str, utilization: float, kv_role: str) -> int:
        own = _profile(0)
        self.held_bytes[name] = own.used_bytes  # weights and context are in before the profile ends
        free = self.total_bytes - sum(self.held_bytes.values())
        kv_bytes = kv_bytes_for_utilization(replace(own, free_bytes=free), utilization, "cuda:0")
        cap = None
        if kv_role == "kv_producer":
            cap = kv_budget.producer_max_num_kv_tokens(8192, 256, 8192, SMOLLM2.block_size)
        blocks = num_kv_blocks(kv_bytes, SMOLLM2.bytes_per_block, SMOLLM2.block_size, 8192, cap)
        # serving, it holds everything but the KV it was not given: at most its share
        self.held_bytes[name] = own.used_bytes + (own.peak_torch_bytes - own.torch_reserved_bytes) \
            + own.cuda_graph_bytes + blocks * SMOLLM2.bytes_per_block
        assert self.held_bytes[name] <= utilization * self.total_bytes
        return blocks


@pytest.mark.parametrize("kv_role", ["kv_both", "kv_producer"])
def test_both_start_orders_give_each_process_the_same_pool(kv_role):
    prefill_first, decode_first = FakeGPU(H200_BYTES), FakeGPU(H200_BYTES)
    pools_prefill_first = {name: prefill_first.start(name, 0.3, role)
                           for name, role in [("prefill", kv_role), ("decode", "kv_both")]}
    pools_decode_first = {name: decode_first.start(name, 0.3, role)
                          for name, role in [("decode", "kv_both"), ("prefill", kv_role)]}
    assert pools_prefill_first == pools_decode_first
    alone = FakeGPU(H200_BYTES).start("decode", 0.3, "kv_both")
    assert pools_prefill_first["decode"] == alone


def test_a_gpu_without_the_share_free_is_a_one_line_error():
    profile = replace(_profile(0), free_bytes=int(12.3 * GIB) - _profile(0).used_bytes)
    with pytest.raises(ValueError) as error:
        kv_bytes_for_utilization(profile, 0.5, "cuda:0")
    assert str(error.value).startswith("cuda:0 has 12.3 GiB free; --gpu-memory-utilization 0.5 asks for 69.9 GiB")
    assert "\n" not in str(error.value)


def test_what_this_process_holds_counts_as_available_once():
    requested = int(0.5 * H200_BYTES)
    exactly = replace(_profile(0), free_bytes=requested - _profile(0).used_bytes)
    assert kv_bytes_for_utilization(exactly, 0.5, "cuda:0") > 0
    with pytest.raises(ValueError, match="has 69.9 GiB free"):
        kv_bytes_for_utilization(replace(exactly, free_bytes=exactly.free_bytes - 1), 0.5, "cuda:0")


def test_a_share_too_small_for_the_weights_names_what_takes_it():
    with pytest.raises(ValueError, match="leaves no room for the KV cache: weights and activations peak at 2.50"):
        kv_bytes_for_utilization(_profile(free_bytes=100 * GIB), 0.02, "cuda:0")
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        kv_bytes_for_utilization(_profile(free_bytes=100 * GIB), 0, "cuda:0")


def test_a_producer_holds_a_few_steps_of_hand_offs_plus_one_long_prompt():
    # 4 steps x (8192 / 16 + 256 partial blocks) + 8192 / 16 = 3,584 blocks of 16 tokens
    assert kv_budget.producer_max_num_kv_tokens(8192, 256, 8192, 16) == 3584 * 16
    assert kv_budget.producer_max_num_kv_tokens(100, 1, 30, 16) == (4 * (7 + 1) + 2) * 16
    # SmolLM2 at 0.9 of an H200 would get ~5.6M tokens of KV; a prefill worker needs 57,344 (1.2 GiB)
    kv_bytes = kv_bytes_for_utilization(_profile(free_bytes=130 * GIB), 0.9, "cuda:0")
    assert num_kv_blocks(kv_bytes, SMOLLM2.bytes_per_block, 16, 8192) > 300_000
    assert num_kv_blocks(kv_bytes, SMOLLM2.bytes_per_block, 16, 8192, 3584 * 16) == 3584


def test_the_cap_rounds_up_to_whole_blocks_and_never_grows_the_budget():
    assert num_kv_blocks(100 * 64, 64, 16, 16, max_num_kv_tokens=17) == 2
    assert num_kv_blocks(3 * 64, 64, 16, 16, max_num_kv_tokens=10_000) == 3


def test_a_pool_shorter_than_max_model_len_is_an_error():
    with pytest.raises(ValueError, match="fewer than max_model_len 2048"):
        num_kv_blocks(100 * 64, 64, 16, 2048)
    with pytest.raises(ValueError, match="max_num_kv_tokens"):
        num_kv_blocks(1000 * 64, 64, 16, 2048, max_num_kv_tokens=1024)


# ---- the thin caller in model_runner, with the device measurements faked -----------------------

def _tiny_model(backend: str = "triton"):
    return SimpleNamespace(attention_backend=SimpleNamespace(name=backend))


@pytest.fixture
def fake_cuda_profile(monkeypatch):
    calls = []

    def profile(model, layout, device, num_tokens, max_model_len, num_logit_rows, graph_batch_size=None):
        calls.append(dict(num_tokens=num_tokens, num_logit_rows=num_logit_rows, graph_batch_size=graph_batch_size))
        return _profile(free_bytes=60 * GIB)

    monkeypatch.setattr(model_runner, "profile_peak_memory", profile)
    return calls


def test_cuda_pools_come_from_the_profile_and_the_producer_cap(fake_cuda_profile):
    cuda = torch.device("cuda:0")
    decode = EngineConfig(gpu_memory_utilization=0.3, max_num_seqs=64, cuda_graph_max_batch_size=32)
    num_blocks = model_runner.determine_num_kv_blocks(decode, _tiny_model(), SMOLLM2, cuda, 8192)
    expected = kv_bytes_for_utilization(_profile(60 * GIB), 0.3, "cuda:0") // SMOLLM2.bytes_per_block
    assert num_blocks == expected
    assert fake_cuda_profile[-1] == dict(num_tokens=8192, num_logit_rows=64, graph_batch_size=32)

    prefill = replace(decode, kv_role="kv_producer", enforce_eager=True)
    assert model_runner.determine_num_kv_blocks(prefill, _tiny_model(), SMOLLM2, cuda, 8192) == 4 * (512 + 64) + 512
    assert fake_cuda_profile[-1]["graph_batch_size"] is None
    capped = replace(decode, max_num_kv_tokens=10_000)
    assert model_runner.determine_num_kv_blocks(capped, _tiny_model("reference"), SMOLLM2, cuda, 8192) == 625
    assert fake_cuda_profile[-1]["graph_batch_size"] is None


def test_explicit_sizes_need_no_profile(fake_cuda_profile):
    cuda = torch.device("cuda:0")
    explicit = EngineConfig(num_kv_blocks=10_000, kv_role="kv_producer")
    assert model_runner.determine_num_kv_blocks(explicit, _tiny_model(), SMOLLM2, cuda, 8192) == 10_000
    cpu_prefill = EngineConfig(kv_cache_memory_bytes=GIB, kv_role="kv_producer", max_num_seqs=8,
                               max_num_batched_tokens=256)
    assert model_runner.determine_num_kv_blocks(cpu_prefill, _tiny_model(), SMOLLM2, torch.device("cpu"),
                                                1024) == 4 * (16 + 8) + 64
    assert fake_cuda_profile == []


def test_non_torch_memory_is_this_process_own(monkeypatch):
    monkeypatch.setattr(model_runner, "_nvml_process_bytes", lambda device: 3 * GIB)
    # NVML's per-process figure: what the device holds for others (here 50 GiB) never enters it
    assert model_runner._non_torch_bytes(torch.device("cuda:0"), 2 * GIB + GIB // 2, 55 * GIB) == GIB // 2
    monkeypatch.setattr(model_runner, "_nvml_process_bytes", lambda device: None)
    assert model_runner._non_torch_bytes(torch.device("cuda:0"), 2 * GIB, 2 * GIB + GIB // 2) == GIB // 2  # alone
    assert model_runner._non_torch_bytes(torch.device("cuda:0"), 2 * GIB, 55 * GIB) == GIB  # capped


# ---- config and flags ----------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("max_num_kv_tokens", 0), ("max_num_kv_tokens", 1.5),
                                          ("kv_role", "producer")])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value})


def test_flags_set_the_cap_and_the_role():
    parser = add_engine_args(argparse.ArgumentParser())
    config = engine_config_from_args(parser.parse_args(["--max-num-kv-tokens", "4096", "--kv-role", "kv_producer"]))
    assert (config.max_num_kv_tokens, config.kv_role) == (4096, "kv_producer")
    assert engine_config_from_args(parser.parse_args([])).kv_role == "kv_both"


def test_the_prefill_command_defaults_to_kv_producer():
    from services.decode.main import build_parser as decode_parser
    from services.prefill.main import build_parser as prefill_parser

    assert engine_config_from_args(prefill_parser().parse_args([])).kv_role == "kv_producer"
    assert engine_config_from_args(prefill_parser().parse_args(["--kv-role", "kv_both"])).kv_role == "kv_both"
    assert engine_config_from_args(decode_parser().parse_args([])).kv_role == "kv_both"


def test_the_decode_command_runs_a_larger_batch_by_default():
    from services.decode.main import build_parser as decode_parser
    from services.prefill.main import build_parser as prefill_parser

    assert engine_config_from_args(decode_parser().parse_args([])).max_num_seqs == 512
    assert engine_config_from_args(decode_parser().parse_args(["--max-num-seqs", "64"])).max_num_seqs == 64
    assert engine_config_from_args(prefill_parser().parse_args([])).max_num_seqs == EngineConfig().max_num_seqs
