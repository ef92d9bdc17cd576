"""Pure-PyTorch references for every Triton kernel in this folder.

They are the CPU path of the engine and the ground truth of the kernel tests. Layouts:

    kv_cache (one layer): [2, num_blocks, block_size, num_kv_heads, head_dim]   (0 = K, 1 = V)
    query:               [num_tokens, num_heads, head_dim]
    key / value (new):   [num_tokens, num_kv_heads, head_dim]

Query head h reads KV head h // (num_heads // num_kv_heads) (grouped-query attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv_cache_reference(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64
) -> None:
    """Scatters each new token's K and V into its slot of the paged pool (in place)."""
    num_blocks, block_size = kv_cache.shape[1], kv_cache.shape[2]
    flat = kv_cache.view(2, num_blocks * block_size, *kv_cache.shape[3:])
    flat[0].index_copy_(0, slot_mapping, key.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, value.to(kv_cache.dtype))


def gather_context_kv(
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [num_blocks_of_seq] int
    context_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns one sequence's K and V, each [context_len, num_kv_heads, head_dim]."""
    block_size = kv_cache.shape[2]
    num_blocks = -(-context_len // block_size)
    blocks = kv_cache[:, block_table[:num_blocks].long()]  # [2, n, block_size, Hkv, D]
    blocks = blocks.reshape(2, num_blocks * block_size, *kv_cache.shape[3:])
    return blocks[0, :context_len], blocks[1, :context_len]


def decode_attention_reference(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]: one new token per sequence
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim], new KV already written
    block_tables: torch.Tensor,  # [num_seqs, max_num_blocks]
    context_lens: torch.Tensor,  # [num_seqs]
    max_context_len: int,  # >= every context_len
    scale: float,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    """Each sequence's one new token over its whole paged context, batched: every context is gathered
    padded to the longest and the padding masked."""
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    group = num_heads // num_kv_heads
    num_blocks = -(-max_context_len // block_size)
    tables = block_tables[:, :num_blocks].long()  # [B, nb]
    keys = kv_cache[0][tables].reshape(num_seqs, num_blocks * block_size, num_kv_heads, head_dim)
    values = kv_cache[1][tables].reshape(num_seqs, num_blocks * block_size, num_kv_heads, head_dim)
    q = query.view(num_seqs, num_kv_heads, group, head_dim).float()  # [B, Hkv, G, D]
    k = keys.permute(0, 2, 3, 1).float()  # [B, Hkv, D, S]
    v = values.permute(0, 2, 1, 3).float()  # [B, Hkv, S, D]
    scores = torch.matmul(q, k) * scale  # [B, Hkv, G, S]
    positions = torch.arange(num_blocks * block_size, device=query.device)
    padding = positions[None, :] >= context_lens[:, None].long()  # [B, S]
    scores.masked_fill_(padding[:, None, None, :], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v)  # [B, Hkv, G, D]
    return out.reshape(num_seqs, num_heads, head_dim).to(query.dtype)


def prefill_attention_reference(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], packed: sequence i owns rows [starts[i], starts[i+1])
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim], new KV already written
    block_tables: torch.Tensor,  # [num_seqs, max_num_blocks]
    query_start_locs: list[int],  # [num_seqs + 1], on the host
    context_lens: list[int],  # [num_seqs], on the host
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal attention of each sequence's new tokens over its whole paged context, one sequence at a time."""
    num_heads = query.shape[1]
    num_kv_heads = kv_cache.shape[3]
    out = torch.empty_like(query)
    for i, context_len in enumerate(context_lens):
        start, end = query_start_locs[i], query_start_locs[i + 1]
        query_len = end - start
        keys, values = gather_context_kv(kv_cache, block_tables[i], context_len)
        q = query[start:end].transpose(0, 1)  # [H, q, D]
        k = keys.transpose(0, 1).repeat_interleave(num_heads // num_kv_heads, dim=0)  # [H, ctx, D]
        v = values.transpose(0, 1).repeat_interleave(num_heads // num_kv_heads, dim=0)
        # Token j of the query sits at position context_len - query_len + j and sees positions <= it.
        prior = context_len - query_len
        mask = torch.arange(context_len, device=query.device)[None, :] <= (
            torch.arange(query_len, device=query.device)[:, None] + prior
        )
        attended = F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=mask, scale=scale
        )
        out[start:end] = attended.transpose(0, 1).to(query.dtype)
    return out


def rms_norm_reference(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]: added to x first when given
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm in float32, rounded to x's dtype before the weight (transformers' Llama numerics).

    With `residual`, returns (norm(x + residual), x + residual), the sum rounded to x's dtype.
    """
    hidden = x if residual is None else x + residual
    normed = hidden.float() * torch.rsqrt(hidden.float().pow(2).mean(-1, keepdim=True) + eps)
    out = (weight.to(x.dtype) * normed.to(x.dtype)).to(x.dtype)
    return out if residual is None else (out, hidden)


def rotary_reference(
    x: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    cos: torch.Tensor,  # [num_tokens, rotary_dim // 2], x's dtype
    sin: torch.Tensor,  # [num_tokens, rotary_dim // 2]
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Rotates the pairs (x[i], x[i + rotary_dim/2]) ("rotate_half" layout); dims past rotary_dim pass."""
    rotary_dim = 2 * cos.shape[-1]
    x1, x2 = x[..., : rotary_dim // 2], x[..., rotary_dim // 2 : rotary_dim]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rotary_dim:]), dim=-1)


def silu_and_mul_reference(
    gate_up: torch.Tensor,  # [num_tokens, 2 * intermediate]: [gate | up], as SwiGLUMLP.gate_up_proj emits
) -> torch.Tensor:  # [num_tokens, intermediate]
    """silu(gate) * up, each step rounded to the activation dtype like the model's eager MLP."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gemv_reference(
    x: torch.Tensor,  # [num_rows, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [num_rows, N], x's dtype
    """x @ weight.T + bias summed in float64 and rounded once to x's dtype: the exact result the
    fp32-accumulating kernel approximates."""
    out = x.double() @ weight.double().T
    if bias is not None:
        out = out + bias.double()
    return out.to(x.dtype)
