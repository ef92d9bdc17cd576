"""UTF-8-safe incremental detokenization.

Decoding one token at a time breaks multi-byte characters (a token may hold half of an emoji) and
word-initial spaces. So each step decodes a short window twice and emits only the difference:

    token ids:  ... p p p | r r r | n n
                          ^prefix ^read   (n = new tokens)
    prefix_text = decode(ids[prefix:read])      new_text = decode(ids[prefix:])
    emit new_text[len(prefix_text):] unless it ends in an incomplete character (U+FFFD)

Decoding cost per step is bounded by the window, not by the output length.

Several tokens at once (a worker message, or what queued while the client was behind) cost two decodes,
not two per token: the window then spans all of them. The text released is what adding them one at a
time releases, for decoders whose text of a window is its first token's text followed by the others'
(byte-level BPE, SentencePiece). When the last character is still incomplete, the release stops before
the token that began it, as it would one token at a time (one more decode per token stepped back).
transformers' `clean_up_tokenization_spaces` rewrites text across tokens ("a ." -> "a."), so with it
on, tokens are added one at a time.

A transformers fast tokenizer that neither cleans up nor reworks `decode` decodes exactly as its
`tokenizers` backend does, so the backend is called directly (transformers' `decode` adds several
microseconds of argument conversion per call).
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
_NUM_CONTEXT_TOKENS = 5  # prompt tokens decoded as context so the first word gets its leading space
# transformers' own decode methods, which only call the backend (and the clean-up, when on)
_PLAIN_DECODES = ("PreTrainedTokenizerBase.decode", "TokenizersBackend._decode", "PreTrainedTokenizerFast._decode")


class Tokenizer(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


def _backend(tokenizer: Tokenizer) -> Tokenizer:
    """The `tokenizers` backend when it decodes exactly as `tokenizer` does, else `tokenizer` itself."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    methods = (getattr(type(tokenizer), "decode", None), getattr(type(tokenizer), "_decode", None))
    if backend is None or any(getattr(m, "__qualname__", None) not in _PLAIN_DECODES for m in methods):
        return tokenizer
    return backend


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self._skip_special_tokens = skip_special_tokens
        self._is_additive = not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self._decoder = _backend(tokenizer) if self._is_additive else tokenizer
        context = list(prompt_token_ids[-_NUM_CONTEXT_TOKENS:])
        self._token_ids = context  # context + output token ids
        self._prefix_offset = 0
        self._read_offset = len(context)

    def _decode(self, token_ids: list[int]) -> str:
        return self._decoder.decode(token_ids, skip_special_tokens=self._skip_special_tokens)

    def add_tokens(self, token_ids: list[int]) -> str:
        """Appends generated tokens; returns the text that became final (may be "")."""
        if len(token_ids) > 1 and not self._is_additive:
            return "".join([self.add_tokens([token_id]) for token_id in token_ids])
        self._token_ids.extend(token_ids)
        prefix_text = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        end = len(self._token_ids)
        while end > self._read_offset:
            new_text = self._decode(self._token_ids[self._prefix_offset : end])
            if not new_text.endswith(REPLACEMENT_CHAR):
                if len(new_text) <= len(prefix_text):
                    return ""  # nothing printable yet
                self._prefix_offset, self._read_offset = self._read_offset, end
                return new_text[len(prefix_text) :]
            end -= 1  # a character is still incomplete: release what precedes its first token
        return ""

    def flush(self) -> str:
        """At the end of the stream: whatever is still held back (incomplete bytes decode as U+FFFD)."""
        prefix_text = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._token_ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._token_ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""
