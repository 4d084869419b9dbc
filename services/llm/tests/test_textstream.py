"""Incremental detokenization: stop strings never leak, UTF-8 is never split."""

from __future__ import annotations

from mlmesh_llm.engines.textstream import TextStream

ALPHABET = ["he", "llo", " wor", "ld", "!", "\xe2", "\x82\xac"]  # last two: one "€" split


def decode(ids):
    data = "".join(ALPHABET[i] for i in ids).encode("latin-1")
    return data.decode("utf-8", errors="replace")


def stream_all(ids, stop=()):
    stream = TextStream(decode, stop)
    out = "".join(stream.push(i) for i in ids if not stream.stopped)
    return out + stream.flush(), stream.stopped


def test_plain_text_round_trips():
    assert stream_all([0, 1, 2, 3, 4]) == ("hello world!", False)


def test_a_split_utf8_character_is_held_back_until_complete():
    stream = TextStream(decode, ())
    assert stream.push(0) == "he"
    assert stream.push(5) == ""  # half a euro sign
    assert stream.push(6) == "€"


def test_stop_string_ends_the_stream_and_is_not_emitted():
    text, stopped = stream_all([0, 1, 2, 3, 4], stop=["o w"])
    assert stopped and text == "hell"


def test_text_that_might_become_a_stop_string_is_held_back():
    stream = TextStream(decode, ["world!"])
    emitted = [stream.push(i) for i in (0, 1, 2, 3)]
    # "hello world": the last len("world!") - 1 characters might still become it
    assert "".join(emitted) == "hello "
    assert stream.push(4) == "" and stream.stopped
