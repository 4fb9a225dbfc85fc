"""Incremental detokenization and stop strings (with a real trained tokenizer)."""

from __future__ import annotations

import pytest

from agora.engine.sampling import SamplingParams
from agora.engine.tokenizer import IncrementalDetokenizer, Tokenizer


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return Tokenizer(tiny_model_dir)


def run(tok: Tokenizer, text: str, **params) -> tuple[list[str], str | None]:
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, SamplingParams(**params))
    deltas = []
    for i, t in enumerate(ids):
        d = detok.step(t, finished=i == len(ids) - 1)
        deltas.append(d.text)
        if d.stop_string is not None:
            return deltas, d.stop_string
    return deltas, None


def test_deltas_concatenate_to_the_decoded_text_including_multibyte(tok):
    text = "Emoji: 🎉 ünïcödé façade. Hello world!"
    deltas, stop = run(tok, text)
    assert "".join(deltas) == text and stop is None
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_truncates_and_is_never_streamed(tok):
    text = "The quick brown fox jumps over the lazy dog."
    deltas, stop = run(tok, text, stop=["over the"])
    assert stop == "over the"
    assert "".join(deltas) == "The quick brown fox jumps "
    assert not any("over" in d for d in deltas)


def test_stop_string_can_be_kept(tok):
    deltas, stop = run(tok, "Hello world! Paged attention", stop=["world"], include_stop_str_in_output=True)
    assert "".join(deltas) == "Hello world" and stop == "world"


def test_the_earliest_stop_string_wins(tok):
    deltas, stop = run(tok, "Once upon a time there was", stop=["there", "upon"])
    assert "".join(deltas) == "Once " and stop == "upon"


def test_a_false_start_of_a_stop_string_is_released(tok):
    deltas, stop = run(tok, "The quick brown fox", stop=["quiet"])
    assert "".join(deltas) == "The quick brown fox" and stop is None
