"""transformers baselines for bench/sharegpt.py, on the very weights Tandem ran (shared, not copied).

    static: `generate` on static batches, left-padded, each batch run to its longest output
    cb:     transformers' continuous batching (`continuous_batching_context_manager`, `add_request`),
            paged attention over SDPA

Useful output tokens count each request's own output length only: a static batch computes tokens
past a short request's end, which are not useful. The API calls work on transformers 5.17 - 5.23;
a version without them fails with a message naming what is missing.
"""

from __future__ import annotations

import dataclasses
import time

import torch


def hf_config_from(model_config, dtype: torch.dtype):
    """transformers' LlamaConfig for a Tandem ModelConfig (Llama architecture only), SDPA attention."""
    import transformers

    if model_config.architecture != "llama":
        raise ValueError(f"the transformers baselines support llama models, got {model_config.architecture!r}")
    rope = {"rope_type": "default", "rope_theta": model_config.rope_theta}
    scaling = model_config.rope_scaling
    if scaling is not None:
        rope.update(rope_type=scaling.rope_type, factor=scaling.factor)
        if scaling.rope_type == "llama3":
            rope.update(low_freq_factor=scaling.low_freq_factor, high_freq_factor=scaling.high_freq_factor,
                        original_max_position_embeddings=scaling.original_max_position_embeddings)
    config = transformers.LlamaConfig(
        vocab_size=model_config.vocab_size, hidden_size=model_config.hidden_size,
        intermediate_size=model_config.intermediate_size, num_hidden_layers=model_config.num_hidden_layers,
        num_attention_heads=model_config.num_attention_heads, num_key_value_heads=model_config.num_key_value_heads,
        head_dim=model_config.head_dim, rms_norm_eps=model_config.rms_norm_eps, rope_parameters=rope,
        max_position_embeddings=model_config.max_position_embeddings,
        tie_word_embeddings=model_config.tie_word_embeddings, attention_bias=model_config.attention_output_bias,
        bos_token_id=model_config.bos_token_id, eos_token_id=list(model_config.eos_token_ids) or None,
        pad_token_id=0,
    )
    config._attn_implementation = "sdpa"
    config.dtype = dtype
    return config


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """transformers' tensor names -> views of Tandem's parameters (fused q/k/v and gate/up split by rows)."""
    state = {"model.embed_tokens.weight": model.model.embed_tokens.weight.detach(),
             "model.norm.weight": model.model.norm.weight.detach()}
    if model.lm_head is not None:
        state["lm_head.weight"] = model.lm_head.weight.detach()
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}"
        attention, mlp = layer.self_attn, layer.mlp
        for part, name in zip(attention.qkv_proj.weight.detach().split(attention.split_sizes), "qkv"):
            state[f"{prefix}.self_attn.{name}_proj.weight"] = part
        if attention.qkv_proj.bias is not None:
            for part, name in zip(attention.qkv_proj.bias.detach().split(attention.split_sizes), "qkv"):
                state[f"{prefix}.self_attn.{name}_proj.bias"] = part
        state[f"{prefix}.self_attn.o_proj.weight"] = attention.o_proj.weight.detach()
        if attention.o_proj.bias is not None:
            state[f"{prefix}.self_attn.o_proj.bias"] = attention.o_proj.bias.detach()
        gate, up = mlp.gate_up_proj.weight.detach().split(mlp.intermediate_size)
        state[f"{prefix}.mlp.gate_proj.weight"], state[f"{prefix}.mlp.up_proj.weight"] = gate, up
        state[f"{prefix}.mlp.down_proj.weight"] = mlp.down_proj.weight.detach()
        state[f"{prefix}.input_layernorm.weight"] = layer.input_layernorm.weight.detach()
        state[f"{prefix}.post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight.detach()
    return state


def transformers_twin(model, model_config):
    """transformers' LlamaForCausalLM whose parameters are views of `model`'s (no second copy)."""
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    weight = model.model.embed_tokens.weight
    config = hf_config_from(model_config, weight.dtype)
    with torch.device("meta"):
        twin = transformers.LlamaForCausalLM(config).to(weight.dtype)
    twin.load_state_dict(hf_state_dict(model), strict=True, assign=True)
    twin.model.rotary_emb = LlamaRotaryEmbedding(config).to(weight.device)  # its buffers were on meta
    left_on_meta = [name for name, t in list(twin.named_parameters()) + list(twin.named_buffers()) if t.is_meta]
    if left_on_meta:
        raise RuntimeError(f"transformers model tensors left unset: {left_on_meta[:5]}")
    twin.generation_config.eos_token_id = None  # outputs are forced to their length
    twin.generation_config.pad_token_id = 0
    return twin.eval()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def run_static(twin, prompts: list[list[int]], output_lens: list[int], batch_size: int, time_limit: float) -> dict:
    """`generate` on consecutive batches; stops starting new batches once time_limit seconds have passed."""
    device = twin.device
    useful, num_done, start = 0, 0, time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        if time.perf_counter() - start > time_limit:
            break
        batch_prompts, batch_outputs = prompts[first : first + batch_size], output_lens[first : first + batch_size]
        width = max(map(len, batch_prompts))
        input_ids = torch.zeros(len(batch_prompts), width, dtype=torch.int64)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(batch_prompts):  # left padding
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        longest = max(batch_outputs)
        out = twin.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                            max_new_tokens=longest, min_new_tokens=longest, do_sample=False, pad_token_id=0)
        _synchronize(device)
        generated = out.shape[1] - width
        useful += sum(min(n, generated) for n in batch_outputs)
        num_done += len(batch_prompts)
    seconds = time.perf_counter() - start
    return {"system": "transformers generate, static batches", "num_requests": num_done, "batch_size": batch_size,
            "useful_output_tokens": useful, "seconds": seconds, "useful_output_tokens_per_s": useful / seconds,
            "truncated": num_done < len(prompts)}


def _continuous_batching_api(twin):
    """The context manager and workload hints, or a clear error on a transformers without them."""
    import transformers

    if not hasattr(twin, "continuous_batching_context_manager"):
        raise RuntimeError(f"transformers {transformers.__version__} has no continuous_batching_context_manager "
                           "(needs transformers 5.x with continuous batching)")
    try:
        from transformers.generation.continuous_batching.utils import WorkloadHints
    except ImportError:
        WorkloadHints = None
    return twin.continuous_batching_context_manager, WorkloadHints


def continuous_batching_config(prompts: list[list[int]], output_lens: list[int], is_sized: bool):
    """None (transformers sizes its cache from free GPU memory), or a cache just big enough for the
    workload: on CPU the automatic size would take most of the machine's RAM."""
    if not is_sized:
        return None
    import transformers

    tokens_per_block = 256  # transformers' default block (page) size
    num_blocks = sum(-(-(len(p) + n) // tokens_per_block) for p, n in zip(prompts, output_lens)) + 8
    return transformers.ContinuousBatchingConfig(num_blocks=num_blocks, max_batch_tokens=2048)


def run_continuous_batching(twin, prompts: list[list[int]], output_lens: list[int], time_limit: float) -> dict:
    """All requests into transformers' continuous batching at once; timed from the first add (warm-up and
    its CUDA-graph capture excluded, as Tandem's is) to the last result, or cut at time_limit seconds.

    Not under inference_mode: the manager's own thread updates tensors made here, outside that mode.
    """
    import transformers

    context_manager, hints_class = _continuous_batching_api(twin)
    generation_config = transformers.GenerationConfig(max_new_tokens=max(output_lens), do_sample=False,
                                                      eos_token_id=-1, pad_token_id=0)
    options = {"generation_config": generation_config, "block": True, "timeout": 60,
               "continuous_batching_config": continuous_batching_config(prompts, output_lens,
                                                                        twin.device.type != "cuda")}
    if hints_class is not None:
        names = {field.name for field in dataclasses.fields(hints_class)}
        hints = {"max_prompt_length": max(map(len, prompts)), "max_generated_length": max(output_lens),
                 "num_requests": len(prompts)}
        options["workload_hints"] = hints_class(**{k: v for k, v in hints.items() if k in names})
    useful, finished = 0, set()
    with context_manager(**options) as manager:
        start = time.perf_counter()
        for i, (prompt, num_tokens) in enumerate(zip(prompts, output_lens)):
            manager.add_request(input_ids=prompt, request_id=f"r{i}", max_new_tokens=num_tokens, eos_token_id=-1)
        while len(finished) < len(prompts) and time.perf_counter() - start < time_limit:
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' continuous batching loop stopped with requests pending")
                continue
            if result.is_finished() and result.request_id not in finished:
                if result.error is not None:
                    raise RuntimeError(f"transformers' continuous batching failed {result.request_id}: {result.error}")
                finished.add(result.request_id)
                useful += min(len(result.generated_tokens), output_lens[int(result.request_id[1:])])
        seconds = time.perf_counter() - start
        if len(finished) < len(prompts):
            manager.stop(block=True, timeout=60, hard_stop=True)
    return {"system": "transformers continuous batching", "num_requests": len(finished),
            "useful_output_tokens": useful, "seconds": seconds, "useful_output_tokens_per_s": useful / seconds,
            "truncated": len(finished) < len(prompts)}
