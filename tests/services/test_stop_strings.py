"""Stop strings over a text stream: never released, matched across chunk boundaries."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.frontend.stop_strings import StopStringMatcher


def _run(matcher: StopStringMatcher, pieces: list[str]) -> str:
    out = []
    for piece in pieces:
        out.append(matcher.feed(piece))
        if matcher.matched is not None:
            return "".join(out)
    out.append(matcher.flush())
    return "".join(out)


def test_match_across_pieces_is_cut_and_not_released():
    matcher = StopStringMatcher(["\nUser:"])
    assert matcher.feed("Hello\nUs") == "Hello"  # "\nUs" could start the stop string
    assert matcher.feed("er: hi") == ""
    assert matcher.matched == "\nUser:"
    assert matcher.feed("more") == ""


def test_held_text_is_released_when_it_cannot_match():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("abcST") == "abc"
    assert matcher.feed("x") == "STx"
    assert matcher.flush() == ""


def test_flush_releases_a_partial_match_at_the_end():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("abST") == "ab"
    assert matcher.flush() == "ST"
    assert matcher.matched is None


def test_the_stop_string_completed_first_wins():
    matcher = StopStringMatcher(["abcd", "bc"])
    assert matcher.feed("xabcd") == "xa"  # "bc" is complete before "abcd" is
    assert matcher.matched == "bc"


def test_empty_stop_string_is_rejected():
    with pytest.raises(ValueError, match="stop"):
        StopStringMatcher(["ok", ""])


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="abc\n:", max_size=40),
    stops=st.lists(st.text(alphabet="abc\n:", min_size=1, max_size=4), min_size=1, max_size=3),
    seed=st.integers(0, 1000),
)
def test_streamed_output_equals_cutting_the_whole_text(text, stops, seed):
    """However the text is split, the output ends where the first completed stop string starts."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    matches = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    expected = text[: min(matches)[1]] if matches else text
    assert _run(StopStringMatcher(stops), pieces) == expected
