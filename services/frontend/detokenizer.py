"""UTF-8-safe incremental detokenization.

Decoding one token at a time breaks multi-byte characters (a token may hold half of an emoji) and
word-initial spaces. So each step decodes a short window twice and emits only the difference:

    token ids:  ... p p p | r r r | n n
                          ^prefix ^read   (n = new tokens)
    prefix_text = decode(ids[prefix:read])      new_text = decode(ids[prefix:])
    emit new_text[len(prefix_text):] unless it ends in an incomplete character (U+FFFD)

Decoding cost per step is bounded by the window, not by the output length.
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
_NUM_CONTEXT_TOKENS = 5  # prompt tokens decoded as context so the first word gets its leading space


class Tokenizer(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-_NUM_CONTEXT_TOKENS:])
        self._token_ids = context  # context + output token ids
        self._prefix_offset = 0
        self._read_offset = len(context)

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)

    def add_tokens(self, token_ids: list[int]) -> str:
        """Appends generated tokens; returns the text that became final (may be "")."""
        self._token_ids.extend(token_ids)
        prefix_text = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._token_ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""  # nothing printable yet, or a character is still incomplete
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """At the end of the stream: whatever is still held back (incomplete bytes decode as U+FFFD)."""
        prefix_text = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._token_ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._token_ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""
