"""Stop strings over a text stream: the match (and what follows) is never sent.

Text that could still become the start of a stop string is held back until it can't:

    stop = ["\\nUser:"]   stream "Hi\\nUs" -> release "Hi", hold "\\nUs"
                          then "er:" arrives -> match, release nothing more, finish
"""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stop: list[str]):
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        self._stop = list(stop)
        self._pending = ""  # text received but not released yet
        self.matched: str | None = None

    @property
    def has_stop_strings(self) -> bool:
        return bool(self._stop)

    def feed(self, text: str) -> str:
        """Adds text; returns what can be released now. After a match, `matched` is set."""
        if self.matched is not None or not self._stop:
            return "" if self.matched is not None else text
        self._pending += text
        # The match that completes first wins (ties: the one starting first), so the result does not
        # depend on how the text was split into pieces.
        best_key, best_index, best_stop = None, -1, None
        for stop in self._stop:
            index = self._pending.find(stop)
            key = (index + len(stop), index)
            if index != -1 and (best_key is None or key < best_key):
                best_key, best_index, best_stop = key, index, stop
        if best_stop is not None:
            released = self._pending[:best_index]
            self._pending = ""
            self.matched = best_stop
            return released
        num_held = self._num_chars_to_hold()
        released = self._pending[: len(self._pending) - num_held]
        self._pending = self._pending[len(self._pending) - num_held :]
        return released

    def _num_chars_to_hold(self) -> int:
        """Length of the longest suffix of the pending text that is a proper prefix of a stop string."""
        longest = min(len(self._pending), max(len(s) for s in self._stop) - 1)
        for length in range(longest, 0, -1):
            suffix = self._pending[-length:]
            if any(stop.startswith(suffix) for stop in self._stop):
                return length
        return 0

    def flush(self) -> str:
        """At the end of the stream: the held text (no stop string completed)."""
        released, self._pending = self._pending, ""
        return "" if self.matched is not None else released
