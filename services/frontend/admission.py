"""Slots for open requests: checked and taken in one step, so a burst cannot overshoot the limit.

    slots = admission.take(num_slots)   # raises RequestsExhausted when fewer than num_slots are free
    slot.release()                      # idempotent; each request gives its own slot back when it ends

A Generate call takes its slot before its first await (validation and tokenization come after), and an
HTTP request takes one slot per choice (n x prompts) at once, all or none. The count and the taking
are never separated by an await, which is what lets a burst of many calls through a check-then-register.
"""

from __future__ import annotations

from services.common.errors import Overloaded

RETRY_AFTER_SECONDS = 1  # what an overloaded caller is told to wait before retrying


class RequestsExhausted(Overloaded):
    """Every slot is taken; the caller should retry after `retry_after_seconds`."""

    retry_after_seconds = RETRY_AFTER_SECONDS


class Slot:
    def __init__(self, admission: Admission):
        self._admission = admission
        self.is_released = False

    def release(self) -> None:
        if not self.is_released:
            self.is_released = True
            self._admission.num_taken -= 1


class Admission:
    def __init__(self, max_num_requests: int):
        if max_num_requests < 1:
            raise ValueError(f"max_num_requests: must be >= 1, got {max_num_requests}")
        self.max_num_requests = max_num_requests
        self.num_taken = 0

    def take(self, num_slots: int = 1) -> list[Slot]:
        """`num_slots` slots, or RequestsExhausted (none taken) when fewer are free."""
        if self.num_taken + num_slots > self.max_num_requests:
            raise RequestsExhausted(
                f"{self.num_taken} requests open, {num_slots} more asked (max_num_requests="
                f"{self.max_num_requests}); retry after {RETRY_AFTER_SECONDS}s")
        self.num_taken += num_slots
        return [Slot(self) for _ in range(num_slots)]
