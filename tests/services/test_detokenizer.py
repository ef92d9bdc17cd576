"""Incremental detokenization with SmolLM2's tokenizer: the deltas add up to the full decode and
never contain a broken character, token by token, including multi-byte characters split across tokens."""

import random

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


# ---- several tokens at once: the same text as one at a time ------------------------------------------

AWKWARD_TEXTS = [
    *TEXTS,
    "🚀🚀🚀 three rockets, 𝔘𝔫𝔦 and ½ ⭐⛵ — done",
    "日本語🙂x中文",
    "café\n\n  naïve 12°C",
]


def _one_at_a_time(tokenizer, prompt, token_ids) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    return [detokenizer.add_tokens([token_id]) for token_id in token_ids] + [detokenizer.flush()]


def _in_batches(tokenizer, prompt, token_ids, sizes) -> list[str]:
    """Text released per batch (batch k holds the next sizes[k % len(sizes)] tokens), then the flush."""
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    pieces, start, index = [], 0, 0
    while start < len(token_ids):
        end = start + sizes[index % len(sizes)]
        pieces.append(detokenizer.add_tokens(token_ids[start:end]))
        start, index = end, index + 1
    return pieces + [detokenizer.flush()]


def _expected_batches(per_token: list[str], num_tokens: int, sizes) -> list[str]:
    """What each batch must release: the per-token pieces of its tokens, joined."""
    pieces, start, index = [], 0, 0
    while start < num_tokens:
        end = min(num_tokens, start + sizes[index % len(sizes)])
        pieces.append("".join(per_token[start:end]))
        start, index = end, index + 1
    return pieces + [per_token[-1]]


def _check_batches_match(tokenizer, prompt, token_ids, seed: int) -> None:
    rng = random.Random(seed)
    per_token = _one_at_a_time(tokenizer, prompt, token_ids)
    for sizes in ([2], [3], [len(token_ids)], [rng.randint(1, 7) for _ in range(20)]):
        assert _in_batches(tokenizer, prompt, token_ids, sizes) == _expected_batches(per_token, len(token_ids), sizes)


@pytest.mark.parametrize("text", AWKWARD_TEXTS)
def test_a_batch_releases_exactly_what_its_tokens_release_one_at_a_time(tokenizer, text):
    token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for seed, start in enumerate(range(0, len(token_ids), 3)):  # start mid-character too
        prompt = tokenizer("Say:", add_special_tokens=False)["input_ids"] + token_ids[:start][-2:]
        _check_batches_match(tokenizer, prompt, token_ids[start:] + [tokenizer.eos_token_id], seed)


def test_a_batch_ending_inside_a_character_releases_what_precedes_it(tokenizer):
    token_ids = tokenizer("ab🚀", add_special_tokens=False)["input_ids"]
    assert len(token_ids) > 3  # "ab" then the rocket's bytes over several tokens
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    assert detokenizer.add_tokens(token_ids[:-1]) == "ab"  # not "" (the rocket is incomplete)
    assert detokenizer.add_tokens(token_ids[-1:]) == "🚀"


def _sentencepiece_like_tokenizer():
    """A Llama-2-style decoder (▁ for spaces, byte fallback, the first space stripped) over a tiny vocab."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "</s>", "▁Hello", "▁world", "!", "▁caf", "é", "▁", "▁x"]
    pieces += [f"<0x{byte:02X}>" for byte in "€🚀".encode()]
    backend = Tokenizer(models.WordLevel({piece: i for i, piece in enumerate(pieces)}, unk_token="<unk>"))
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>"), pieces


def test_batches_match_one_at_a_time_with_a_sentencepiece_style_decoder():
    tokenizer, pieces = _sentencepiece_like_tokenizer()
    byte_ids = [pieces.index(f"<0x{byte:02X}>") for byte in "€🚀".encode()]
    words = [pieces.index(p) for p in ("▁Hello", "▁world", "!", "▁caf", "é", "▁", "▁x")]
    rng = random.Random(3)
    for seed in range(30):
        token_ids = [rng.choice(words) for _ in range(6)] + byte_ids[:3] + [rng.choice(words)] + byte_ids[3:]
        token_ids += [rng.choice(words), pieces.index("</s>")]
        _check_batches_match(tokenizer, [pieces.index("▁Hello")], token_ids, seed)
    text = "".join(_one_at_a_time(tokenizer, [pieces.index("▁x")], [pieces.index("▁Hello"), *byte_ids]))
    assert text == " Hello€🚀"


class _CleaningTokenizer:
    """transformers' clean_up_tokenization_spaces: rewrites " ." and " ," across token boundaries."""

    clean_up_tokenization_spaces = True

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def decode(self, token_ids, skip_special_tokens=False):
        text = self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)
        return text.replace(" .", ".").replace(" ,", ",")


def test_a_tokenizer_that_cleans_up_spaces_is_fed_one_token_at_a_time(tokenizer):
    cleaning = _CleaningTokenizer(tokenizer)
    token_ids = tokenizer("a , b . c 🚀 d .", add_special_tokens=False)["input_ids"]
    _check_batches_match(cleaning, [], token_ids, seed=0)


def test_the_tokenizers_backend_decodes_as_the_transformers_tokenizer(tokenizer):
    from services.frontend.detokenizer import _backend

    backend = _backend(tokenizer)
    assert backend is tokenizer.backend_tokenizer
    token_ids = tokenizer(AWKWARD_TEXTS[-3], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    for end in range(1, len(token_ids) + 1):
        for skip in (True, False):
            assert backend.decode(token_ids[:end], skip_special_tokens=skip) == tokenizer.decode(
                token_ids[:end], skip_special_tokens=skip)
    assert _backend(_CleaningTokenizer(tokenizer)).__class__ is _CleaningTokenizer
