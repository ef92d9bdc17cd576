"""Text -> token ids for prompts: plain text, or chat messages through the model's chat template.

Thin wrappers over transformers' tokenizers that always return `list[int]` (transformers 5
returns a BatchEncoding from apply_chat_template) and fail with a clear error when a folder has
no tokenizer or no chat template. Incremental detokenization lives in the frontend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

CHAT_ROLES = ("system", "user", "assistant", "tool")


class TokenizerError(ValueError):
    """The tokenizer cannot do what was asked (no tokenizer, no chat template, bad messages)."""


def load_tokenizer(folder: str | Path):
    """The HF tokenizer saved in a model folder (fast/tokenizers backend)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise TokenizerError(f"no tokenizer files (tokenizer.json, tokenizer.model, vocab.json) in {folder}")
    return AutoTokenizer.from_pretrained(folder)


def _as_ids(encoded: Any) -> list[int]:
    if isinstance(encoded, Mapping) or hasattr(encoded, "input_ids"):
        encoded = encoded["input_ids"]
    ids = encoded.tolist() if hasattr(encoded, "tolist") else list(encoded)
    if ids and isinstance(ids[0], list):  # a batch of one
        ids = ids[0]
    return [int(i) for i in ids]


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    if not messages:
        raise TokenizerError("messages must not be empty")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise TokenizerError(f"messages[{index}] must be a mapping with 'role' and 'content'")
        if message["role"] not in CHAT_ROLES:
            raise TokenizerError(f"messages[{index}].role must be one of {CHAT_ROLES}, got {message['role']!r}")


def apply_chat_template(
    tokenizer, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of the conversation, ending with the assistant prompt when add_generation_prompt."""
    _check_messages(messages)
    if not getattr(tokenizer, "chat_template", None):
        raise TokenizerError("this model's tokenizer has no chat template; send a plain prompt instead")
    encoded = tokenizer.apply_chat_template(
        [dict(m) for m in messages], add_generation_prompt=add_generation_prompt, tokenize=True
    )
    return _as_ids(encoded)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a plain prompt, with whatever special tokens (e.g. BOS) the tokenizer adds."""
    if not isinstance(text, str):
        raise TokenizerError(f"prompt must be a string, got {type(text).__name__}")
    return _as_ids(tokenizer(text, add_special_tokens=True))
