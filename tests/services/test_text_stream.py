"""TextStream over batched token events: the same chunks' text, token ids, finish and usage as one token
per event, with and without stop strings, over text whose characters span several tokens."""

import random

import pytest

from common.engine.sampling_params import SamplingParams
from services.frontend.relay import FinishEvent, TokenEvent
from services.frontend.text_stream import TextStream

TEXT = "Hi 🙂 café — 日本語🚀 and ½ STOP⭐ more text after STOP, then the end."


def _run(tokenizer, token_ids, sizes, stop, min_tokens=0):
    """Feeds `token_ids` in events of sizes[k % len(sizes)] tokens; returns (chunks, finish)."""
    stream = TextStream(tokenizer, tokenizer("Say:")["input_ids"], SamplingParams(max_tokens=500, min_tokens=min_tokens),
                        stop)
    chunks, start, index = [], 0, 0
    while start < len(token_ids):
        event = TokenEvent(token_ids[start:start + sizes[index % len(sizes)]], None)
        start, index = start + len(event.token_ids), index + 1
        chunk, finish = stream.on_tokens(event)
        chunks.append(chunk)
        if finish is not None:
            return chunks, finish
    chunk, finish = stream.on_finish(FinishEvent("length"))
    return chunks + ([chunk] if chunk is not None else []), finish


def _flat(chunks):
    return [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks)


@pytest.mark.parametrize("stop", [[], ["STOP"], ["🚀 and", "⭐ m"]])
@pytest.mark.parametrize("min_tokens", [0, 12])
def test_batched_events_give_the_text_of_one_token_per_event(tokenizer, stop, min_tokens):
    token_ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    one_by_one, finish = _run(tokenizer, token_ids, [1], stop, min_tokens)
    rng = random.Random(len(stop) + min_tokens)
    for sizes in ([2], [5], [len(token_ids)], [rng.randint(1, 6) for _ in range(30)]):
        chunks, batched_finish = _run(tokenizer, token_ids, sizes, stop, min_tokens)
        assert _flat(chunks) == _flat(one_by_one)
        assert batched_finish == finish
    text = _flat(one_by_one)[1]
    if stop == []:
        assert text == tokenizer.decode(token_ids) and finish.finish_reason == "length"
    else:
        assert finish.finish_reason == "stop" and finish.matched_stop in stop
        assert not any(s in text for s in stop) and TEXT.startswith(text)


def test_a_batched_event_is_one_chunk_with_every_token_and_the_text_they_complete(tokenizer):
    token_ids = tokenizer("ab🚀cd", add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, [], SamplingParams(max_tokens=50), [])
    first, finish = stream.on_tokens(TokenEvent(token_ids[:-2], None))  # ends inside the rocket
    assert finish is None and first.token_ids == token_ids[:-2] and first.text == "ab"
    second, _ = stream.on_tokens(TokenEvent(token_ids[-2:], None))
    assert second.text == "🚀cd"
    assert stream.num_completion_tokens == len(token_ids)


def test_a_stop_string_inside_a_batch_cuts_its_tokens_and_logprobs(tokenizer):
    from common.engine.sequence import TokenLogprobs

    token_ids = tokenizer("one two STOP three four", add_special_tokens=False)["input_ids"]
    logprobs = [TokenLogprobs(t, -1.0, [t], [-1.0]) for t in token_ids]
    stream = TextStream(tokenizer, [], SamplingParams(max_tokens=50), ["STOP"])
    chunk, finish = stream.on_tokens(TokenEvent(token_ids, logprobs))
    assert finish.finish_reason == "stop" and finish.matched_stop == "STOP"
    assert chunk.text == "one two " and len(chunk.token_ids) < len(token_ids)
    assert [lp.token_id for lp in chunk.logprobs] == chunk.token_ids
    assert finish.num_completion_tokens == len(chunk.token_ids)
