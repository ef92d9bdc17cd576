"""Prompt tokenization on the embedded SmolLM2 tokenizer (converted from its GGUF)."""

import pytest

from common.tokenizer import TokenizerError, apply_chat_template, encode_prompt, load_tokenizer
from tests.helpers.tiny_models import embedded_model_folder


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(embedded_model_folder())


def test_plain_prompt_round_trips(tokenizer):
    text = "Hello world! Tandem splits prefill and decode: ünïcödé, 東京, 1234."
    token_ids = encode_prompt(tokenizer, text)
    assert all(isinstance(i, int) for i in token_ids) and len(token_ids) > 10
    assert tokenizer.decode(token_ids) == text
    assert token_ids[:2] == encode_prompt(tokenizer, "Hello world")  # no BOS for this model


def test_chat_template_wraps_messages_and_adds_generation_prompt(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    token_ids = apply_chat_template(tokenizer, messages)
    text = tokenizer.decode(token_ids)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without_prompt = apply_chat_template(tokenizer, messages, add_generation_prompt=False)
    assert token_ids[: len(without_prompt)] == without_prompt and len(token_ids) > len(without_prompt)


def test_chat_template_adds_default_system_prompt(tokenizer):
    text = tokenizer.decode(apply_chat_template(tokenizer, [{"role": "user", "content": "Hi"}]))
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "must not be empty"),
        ([{"role": "user"}], r"messages\[0\]"),
        ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], r"messages\[1\]\.role"),
    ],
)
def test_bad_messages_are_named(tokenizer, messages, message):
    with pytest.raises(TokenizerError, match=message):
        apply_chat_template(tokenizer, messages)


def test_missing_tokenizer_and_template_are_reported(tmp_path, tokenizer, monkeypatch):
    with pytest.raises(TokenizerError, match="no tokenizer files"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")
    monkeypatch.setattr(tokenizer, "chat_template", None)
    with pytest.raises(TokenizerError, match="no chat template"):
        apply_chat_template(tokenizer, [{"role": "user", "content": "Hi"}])
    with pytest.raises(TokenizerError, match="prompt must be a string"):
        encode_prompt(tokenizer, ["not", "text"])
