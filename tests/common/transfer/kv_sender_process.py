"""Entry point of a separate prefill-like process for the cross-process UCX tests.

It fills a KV pool with seeded random data, serves it with a real UCX sender and obeys commands
from a queue; every on_release is reported back on the events queue.
"""

import torch

POOL_SEED = 1234
NUM_POOL_BLOCKS = 64


def make_pool(layout) -> torch.Tensor:
    """[L, 2, NUM_POOL_BLOCKS, BS, Hkv, D], identical in every process for the same layout."""
    generator = torch.Generator().manual_seed(POOL_SEED)
    return torch.randn(layout.block_shape(NUM_POOL_BLOCKS), generator=generator).to(layout.torch_dtype)


def main(layout, commands, events, port: int = 0) -> None:
    torch.set_num_threads(1)
    from common.transfer import create_sender

    kv = make_pool(layout)

    def on_release(transfer_id, outcome, stats):
        events.put(("released", transfer_id, outcome.name, stats.num_bytes, stats.transport))

    sender = create_sender("ucx", layout, lambda ids: kv.index_select(2, torch.tensor(ids)), on_release, port=port)
    events.put(("address", sender.address))
    while True:
        command = commands.get()
        if command[0] == "offer":
            _, transfer_id, block_ids, num_tokens, lease_seconds = command
            handle = sender.offer(transfer_id, block_ids, num_tokens, lease_seconds)
            events.put(("handle", handle.transfer_id, handle.address, handle.num_tokens, handle.num_blocks,
                        handle.layout))
        elif command[0] == "close":
            sender.close()
            events.put(("closed",))
            return
