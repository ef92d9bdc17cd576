"""A multi-turn chat workload and the client that plays it, for bench/prefix.py.

    conversation c:  turn 1 prompt = system + user[c][0]                             ─► answer 1 (streamed ids)
                     turn 2 prompt = system + user[c][0] + answer 1 + user[c][1]     ─► answer 2
                     ...              (each turn is sent once the previous answer has fully returned)

Every conversation shares one system prompt; user turns and answer lengths are ShareGPT-shaped (the
lognormal lengths of bench/sharegpt.py: inputs around 200 tokens, outputs around 180, clipped), token ids
random (seeded). Conversations start at Poisson arrivals of --rate (inf: all at once). The conversations
are split round-robin over the bench's client processes (bench/_disagg_client.py's ClientPool), each
playing its share on its own event loop from one shared start instant.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc
import numpy as np

from bench._disagg_client import CONNECT_TIMEOUT_SECONDS, RequestRecord, send_grpc
from protos import generation_pb2_grpc


@dataclass
class Conversation:
    conversation_id: int
    user_turns: list[list[int]]  # token ids of each user message
    answer_lens: list[int]  # tokens to generate for each turn (EOS ignored)
    start_offset: float  # seconds after the run's start at which turn 1 is sent


@dataclass
class ChatWorkload:
    system_prompt: list[int]
    conversations: list[Conversation]

    @property
    def num_turns(self) -> int:
        return sum(len(c.user_turns) for c in self.conversations)

    def max_prompt_len(self) -> int:
        """The longest last-turn prompt the workload can send (answers at their full length)."""
        return len(self.system_prompt) + max(
            sum(map(len, c.user_turns)) + sum(c.answer_lens[:-1]) for c in self.conversations)

    def summary(self) -> dict:
        return {"num_conversations": len(self.conversations), "num_turns": self.num_turns,
                "system_prompt_tokens": len(self.system_prompt),
                "user_tokens": sum(len(u) for c in self.conversations for u in c.user_turns),
                "answer_tokens": sum(sum(c.answer_lens) for c in self.conversations),
                "max_prompt_tokens": self.max_prompt_len()}


def chat_workload(num_conversations: int, num_turns: int, system_prompt_len: int, vocab_size: int,
                  max_user_len: int, max_answer_len: int, rate: float, seed: int = 0) -> ChatWorkload:
    """The seeded workload (see the module docstring); token ids avoid 0..2 (special tokens)."""
    rng = np.random.default_rng(seed)
    system_prompt = rng.integers(3, vocab_size, size=system_prompt_len).tolist()
    num = num_conversations * num_turns
    user_lens = np.clip(rng.lognormal(np.log(200) - 0.5, 1.0, num), 4, max_user_len).astype(int)
    answer_lens = np.clip(rng.lognormal(np.log(180) - 0.5, 1.0, num), 4, max_answer_len).astype(int)
    gaps = rng.exponential(1.0 / rate, num_conversations) if rate != float("inf") else np.zeros(num_conversations)
    offsets = np.cumsum(gaps) - gaps[0] if num_conversations else gaps
    conversations = []
    for index in range(num_conversations):
        turns = range(index * num_turns, (index + 1) * num_turns)
        conversations.append(Conversation(
            index, [rng.integers(3, vocab_size, size=int(user_lens[t])).tolist() for t in turns],
            [int(answer_lens[t]) for t in turns], float(offsets[index])))
    return ChatWorkload(system_prompt, conversations)


@dataclass
class TurnRecord:
    conversation_id: int
    turn: int  # 0-based
    record: RequestRecord


@dataclass
class ChatResult:
    turns: list[TurnRecord]
    ended_at: float  # time.monotonic() of the last answer's end, or of the cut
    cpu_seconds: float


@dataclass
class ChatJob:
    """One client process's share of the conversations (run by ClientPool.run_jobs)."""

    run_name: str
    grpc_address: str
    system_prompt: list[int]
    conversations: list[Conversation]
    time_limit: float  # seconds after the shared start; turns still streaming then are cut
    turns: list[TurnRecord] = field(default_factory=list)

    async def play(self, stub, conversation: Conversation, start_at: float) -> None:
        await asyncio.sleep(max(0.0, start_at + conversation.start_offset - time.monotonic()))
        history = list(self.system_prompt)
        for turn, (user, answer_len) in enumerate(zip(conversation.user_turns, conversation.answer_lens)):
            prompt = history + user
            record = RequestRecord(f"{self.run_name}-c{conversation.conversation_id}-t{turn}", len(prompt), answer_len)
            self.turns.append(TurnRecord(conversation.conversation_id, turn, record))
            answer: list[int] = []
            await send_grpc(stub, record, prompt, answer)
            if not record.is_complete:
                return  # the conversation cannot go on without its answer
            history = prompt + answer

    async def run_in_process(self, connection, event_loop: str) -> ChatResult:
        options = [("grpc.max_receive_message_length", 64 << 20)]
        async with grpc.aio.insecure_channel(self.grpc_address, options=options) as channel:
            await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT_SECONDS)
            stub = generation_pb2_grpc.GenerationStub(channel)
            connection.send(("ready", None))
            start_at = connection.recv()
            cpu_before = time.process_time()
            tasks = [asyncio.create_task(self.play(stub, c, start_at)) for c in self.conversations]
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, start_at + self.time_limit - time.monotonic()))
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for turn in self.turns:
            if turn.record.end is None:
                turn.record.error = turn.record.error or f"cut at the {self.time_limit:.0f} s time limit"
        ends = [t.record.end for t in self.turns if t.record.end is not None]
        ended_at = max(ends) if ends and not pending else time.monotonic()
        return ChatResult(self.turns, ended_at, time.process_time() - cpu_before)


def split_jobs(run_name: str, grpc_address: str, workload: ChatWorkload, num_processes: int,
               time_limit: float) -> list[ChatJob]:
    """The conversations round-robin over at most `num_processes` jobs (none empty)."""
    num_jobs = max(1, min(num_processes, len(workload.conversations)))
    return [ChatJob(run_name, grpc_address, workload.system_prompt, workload.conversations[i::num_jobs], time_limit)
            for i in range(num_jobs)]
