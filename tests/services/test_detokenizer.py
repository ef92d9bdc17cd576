"""Incremental detokenization with SmolLM2's tokenizer: the deltas add up to the full decode and
never contain a broken character, token by token, including multi-byte characters split across tokens."""

import pytest

from services.frontend.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer

TEXTS = [
    "The capital of France is Paris.",
    "  leading spaces and\nnew lines\n\n  indented",
    "Emoji 🙂🚀 and accents: café, naïve, Zürich",
    "中文字符和日本語のテキスト",
    "mixed 😀a😀b 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_add_up_to_the_full_decode(tokenizer, text):
    prompt = tokenizer("Say something:")["input_ids"]
    token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detokenizer.add_tokens([token_id]) for token_id in token_ids]
    deltas.append(detokenizer.flush())
    assert "".join(deltas) == tokenizer.decode(token_ids, skip_special_tokens=True)
    assert not any(REPLACEMENT_CHAR in delta for delta in deltas)


def test_a_split_character_is_held_until_complete(tokenizer):
    token_ids = tokenizer("🚀", add_special_tokens=False)["input_ids"]
    assert len(token_ids) > 1  # byte-level BPE splits the emoji's 4 bytes
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    assert [detokenizer.add_tokens([t]) for t in token_ids[:-1]] == [""] * (len(token_ids) - 1)
    assert detokenizer.add_tokens(token_ids[-1:]) == "🚀"


def test_special_tokens_are_skipped(tokenizer):
    eos = tokenizer.eos_token_id
    token_ids = tokenizer("Hi there", add_special_tokens=False)["input_ids"] + [eos]
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    text = "".join(detokenizer.add_tokens([t]) for t in token_ids) + detokenizer.flush()
    assert text == "Hi there"


def test_flush_returns_an_incomplete_character_as_replacement(tokenizer):
    token_ids = tokenizer("🚀", add_special_tokens=False)["input_ids"]
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    assert detokenizer.add_tokens(token_ids[:1]) == ""
    assert detokenizer.flush() == REPLACEMENT_CHAR
