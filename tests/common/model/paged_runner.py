"""Drives a Tandem model over a small paged KV pool like the engine does, for parity tests.

Sequences get block tables drawn from a shuffled pool (scattered, non-contiguous block ids), so
any mix-up between logical and physical blocks changes the logits. Everything lives on the model's
device; the pool's garbage is drawn on the CPU, so it is the same on every device.
"""

from __future__ import annotations

import torch

from common.attention import AttentionMetadata
from common.model.config import ModelConfig


class PagedRunner:
    def __init__(self, model, config: ModelConfig, block_size: int = 4, num_blocks: int = 40, seed: int = 0):
        self.model = model
        self.block_size = block_size
        parameter = next(model.parameters())
        self.device = parameter.device
        self.kv_cache = torch.randn(  # garbage, not zeros: unwritten slots must never be read
            config.num_hidden_layers, 2, num_blocks, block_size, config.num_key_value_heads, config.head_dim,
            generator=torch.Generator().manual_seed(seed),
        ).to(device=self.device, dtype=parameter.dtype)
        shuffle = torch.Generator().manual_seed(seed + 1)
        self.free_block_ids = torch.randperm(num_blocks, generator=shuffle).tolist()
        self.block_tables: list[list[int]] = []
        self.token_ids: list[list[int]] = []

    def _grow_tables(self) -> None:
        for table, tokens in zip(self.block_tables, self.token_ids):
            while len(table) * self.block_size < len(tokens):
                table.append(self.free_block_ids.pop())

    @torch.no_grad()
    def step(self, new_token_ids: list[list[int]]) -> list[torch.Tensor]:
        """Appends new tokens per sequence (new sequences start at the end); returns each one's logits."""
        while len(self.token_ids) < len(new_token_ids):
            self.token_ids.append([])
            self.block_tables.append([])
        for tokens, new in zip(self.token_ids, new_token_ids):
            tokens.extend(new)
        self._grow_tables()
        query_lens = [len(new) for new in new_token_ids]
        context_lens = [len(tokens) for tokens in self.token_ids]
        metadata = AttentionMetadata.build(
            query_lens, context_lens, self.block_tables, self.block_size, device=self.device
        )
        input_ids = torch.tensor([t for new in new_token_ids for t in new], dtype=torch.int64, device=self.device)
        positions = torch.tensor(
            [p for q, c in zip(query_lens, context_lens) for p in range(c - q, c)], dtype=torch.int64,
            device=self.device,
        )
        hidden = self.model(input_ids, positions, self.kv_cache, metadata)  # [T, hidden]
        logits = self.model.compute_logits(hidden)  # [T, vocab]
        return list(logits.split(query_lens))
