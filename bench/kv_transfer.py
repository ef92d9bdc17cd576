"""KV hand-off latency over the real UCX transport, between two processes, with and without a busy GIL.

A sender process (the prefill side: a real `KVPool` and `UcxKVSender`) offers blocks; this process (the
decode side: `UcxKVReceiver`) pulls them one at a time into a buffer on its device. Each pull is timed
as the services time it: the sender's gather + send (`kv.send`, from its release stats) and the
receiver's pull request -> bytes in place (`kv.recv`). Sizes sweep the number of blocks.

A serving worker runs its engine thread beside the UCX loop, and every step of a pull (the request
arriving, the gather, the completions) needs the GIL. `--gil-load busy` starts one pure-Python thread in
each process, as a busy engine thread would be; `--switch-intervals` sets `sys.setswitchinterval`, the
longest such a thread holds the GIL while the UCX loop waits for it. The first configuration of the
sweep is the baseline the others are compared with.

    python bench/kv_transfer.py --sender-device cuda:0 --receiver-device cuda:1 \
        --block-counts 1,8,16,64 --gil-loads none,busy --switch-intervals 5,0.5,0.1 --output kv.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from common.transfer import KVHandle, KVLayout, create_receiver, create_sender, new_transfer_id

MODEL_NAME = "bench"
GIL_LOADS = ("none", "busy")


@dataclass(frozen=True)
class Config:
    gil_load: str  # "none" | "busy": a pure-Python thread spins in each process
    switch_interval_ms: float  # sys.setswitchinterval in both processes

    @property
    def name(self) -> str:
        return f"gil={self.gil_load} switch={self.switch_interval_ms:g}ms"


class GilLoad:
    """A daemon thread executing Python bytecode nonstop (it gives the GIL up only when asked to)."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, name="gil-load", daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        while not self._stop.is_set():
            sum(index * index for index in range(200))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _prepare_ucx(device: torch.device) -> None:
    from common.transfer.ucx_runtime import UcxRuntime, prefer_busy_progress

    if device.type == "cuda":
        torch.cuda.set_device(device)
        prefer_busy_progress()
        UcxRuntime.bind_cuda_device(device.index or 0)


def sender_main(layout: KVLayout, device_name: str, num_pool_blocks: int, config: Config,
                commands, events) -> None:
    """The prefill side, in a process of its own: offers on command, reports each release."""
    torch.set_num_threads(1)
    sys.setswitchinterval(config.switch_interval_ms / 1000)
    from common.kv.kv_pool import KVPool

    device = torch.device(device_name)
    _prepare_ucx(device)
    pool = KVPool(layout, num_pool_blocks, device)
    pool.kv.normal_()

    def on_release(transfer_id, outcome, stats):
        events.put(("released", transfer_id, outcome.name, stats.num_bytes, stats.seconds, stats.transport))

    sender = create_sender("ucx", layout, pool.gather_blocks, on_release)
    load = GilLoad() if config.gil_load == "busy" else None
    events.put(("address", sender.address))
    while True:
        command = commands.get()
        if command[0] == "offer":
            _, transfer_id, block_ids = command
            handle = sender.offer(transfer_id, block_ids, len(block_ids) * layout.block_size, 30.0)
            events.put(("handle", handle.transfer_id, handle.address, handle.num_tokens, handle.num_blocks,
                        handle.layout))
        elif command[0] == "close":
            if load is not None:
                load.stop()
            sender.close()
            events.put(("closed",))
            return


class SenderProcess:
    def __init__(self, layout: KVLayout, device: str, num_pool_blocks: int, config: Config):
        context = multiprocessing.get_context("spawn")
        self.commands, self.events = context.Queue(), context.Queue()
        self.process = context.Process(target=sender_main, daemon=True, args=(
            layout, device, num_pool_blocks, config, self.commands, self.events))
        self.process.start()
        self.address = self.expect("address")[1]

    def expect(self, kind: str, timeout: float = 120):
        event = self.events.get(timeout=timeout)
        if event[0] != kind:
            raise RuntimeError(f"sender: expected {kind}, got {event}")
        return event

    def offer(self, block_ids: list[int]) -> KVHandle:
        self.commands.put(("offer", new_transfer_id(), block_ids))
        return KVHandle(*self.expect("handle")[1:])

    def stop(self) -> None:
        if self.process.is_alive():
            self.commands.put(("close",))
            self.process.join(timeout=60)
        if self.process.is_alive():
            self.process.kill()


def run_config(args, layout: KVLayout, config: Config) -> list[dict]:
    sys.setswitchinterval(config.switch_interval_ms / 1000)
    receiver_device = torch.device(args.receiver_device)
    num_pool_blocks = max(args.block_counts) * 4
    sender = SenderProcess(layout, args.sender_device, num_pool_blocks, config)
    receiver = create_receiver("ucx", layout)
    load = GilLoad() if config.gil_load == "busy" else None
    rows = []
    try:
        for num_blocks in args.block_counts:
            destination = torch.empty(layout.block_shape(num_blocks), dtype=layout.torch_dtype,
                                      device=receiver_device)
            send_seconds, recv_seconds, transports = [], [], set()
            for repeat in range(args.warmup + args.repeats):
                start_block = (repeat * num_blocks) % (num_pool_blocks - num_blocks + 1)
                handle = sender.offer(list(range(start_block, start_block + num_blocks)))
                stats = receiver.wait(receiver.begin(handle, destination), timeout=60)
                released = sender.expect("released")
                if released[2] != "DONE":
                    raise RuntimeError(f"transfer released {released[2]}")
                if repeat >= args.warmup:
                    recv_seconds.append(stats.seconds)
                    send_seconds.append(released[4])
                    transports.add(released[5])
            num_bytes = layout.bytes_per_block * num_blocks
            rows.append(summarize(config, num_blocks, num_bytes, send_seconds, recv_seconds, transports))
            print(format_row(rows[-1]), flush=True)
    finally:
        if load is not None:
            load.stop()
        receiver.close()
        sender.stop()
    return rows


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def summarize(config: Config, num_blocks: int, num_bytes: int, send: list[float], recv: list[float],
              transports: set[str]) -> dict:
    send_p50, recv_p50 = statistics.median(send), statistics.median(recv)
    return {
        "config": config.name, "gil_load": config.gil_load, "switch_interval_ms": config.switch_interval_ms,
        "num_blocks": num_blocks, "mib": num_bytes / 2**20, "transport": "+".join(sorted(transports)),
        "send_ms_p50": send_p50 * 1e3, "send_ms_p99": percentile(send, 0.99) * 1e3,
        "send_gb_per_s_p50": num_bytes / send_p50 / 1e9,
        "recv_ms_p50": recv_p50 * 1e3, "recv_ms_p99": percentile(recv, 0.99) * 1e3,
        "recv_gb_per_s_p50": num_bytes / recv_p50 / 1e9,
    }


def format_row(row: dict, baseline: dict | None = None) -> str:
    ratio = f"{baseline['send_ms_p50'] / row['send_ms_p50']:.2f}x" if baseline else ""
    return (f"| {row['config']} | {row['num_blocks']} | {row['mib']:.2f} | {row['transport']} | "
            f"{row['send_ms_p50']:.3f} / {row['send_ms_p99']:.3f} | {row['send_gb_per_s_p50']:.1f} | "
            f"{row['recv_ms_p50']:.3f} / {row['recv_ms_p99']:.3f} | {row['recv_gb_per_s_p50']:.1f} | {ratio} |")


def print_table(rows: list[dict]) -> None:
    baselines = {row["num_blocks"]: row for row in rows if row["config"] == rows[0]["config"]}
    print("| config | blocks | MiB | transport | kv.send ms p50 / p99 | send GB/s | kv.recv ms p50 / p99 "
          "| recv GB/s | send speed vs first config |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(format_row(row, baselines.get(row["num_blocks"])))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--sender-device", default="cpu")
    add("--receiver-device", default="cpu")
    add("--dtype", default="bfloat16")
    add("--num-layers", type=int, default=32, help="default: Llama-3-8B's KV shape")
    add("--num-kv-heads", type=int, default=8)
    add("--head-dim", type=int, default=128)
    add("--block-size", type=int, default=16)
    add("--block-counts", default="1,8,16,64", help="blocks per pull (2 MiB each with the defaults)")
    add("--repeats", type=int, default=50)
    add("--warmup", type=int, default=5)
    add("--gil-loads", default="none,busy", help=f"comma-separated subset of {GIL_LOADS}")
    add("--switch-intervals", default="5,0.5", help="sys.setswitchinterval values in ms, comma separated")
    add("--output", default=None)
    args = parser.parse_args(argv)
    args.block_counts = [int(count) for count in args.block_counts.split(",")]
    args.gil_loads = args.gil_loads.split(",")
    if any(load not in GIL_LOADS for load in args.gil_loads):
        parser.error(f"--gil-loads takes a subset of {GIL_LOADS}")
    args.switch_intervals = [float(value) for value in args.switch_intervals.split(",")]
    if any(count < 1 for count in args.block_counts) or args.repeats < 1:
        parser.error("--block-counts and --repeats must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    _prepare_ucx(torch.device(args.receiver_device))
    layout = KVLayout(MODEL_NAME, args.dtype, args.block_size, args.num_layers, args.num_kv_heads, args.head_dim)
    rows = []
    for gil_load in args.gil_loads:
        for switch_interval_ms in args.switch_intervals:
            rows += run_config(args, layout, Config(gil_load, switch_interval_ms))
    print_table(rows)
    if args.output:
        from bench._common import environment

        report = {"environment": environment(torch.device(args.receiver_device)), "args": vars(args), "rows": rows}
        Path(args.output).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
