"""An echoed prompt with its tokens' logprobs, from engine outputs shaped like RequestOutput."""

from __future__ import annotations

from types import SimpleNamespace

from agora.openai.accumulate import CompletionStream
from agora.openai.stream import merge_completion_chunks

TEXTS = {0: "<s>", 1: "Hi", 2: " there", 3: "!"}


def _out(**kw):  # noqa: ANN003, ANN202
    base = dict(index=0, text="", token_ids=[], logprobs=[], finished=False, finish_reason=None, stop_reason=None,
                num_cached_tokens=0, text_offsets=[], prompt_logprobs=None)  # fmt: skip
    return SimpleNamespace(**{**base, **kw})


def _lp(token: int, logprob: float):  # noqa: ANN202
    return SimpleNamespace(token_id=token, logprob=logprob, rank=1, top=[(token, logprob)])


def test_the_echo_waits_for_its_logprobs_and_a_bos_token_takes_no_room() -> None:
    acc = CompletionStream("cmpl-1", "m", 1, 3, ["Hi there"], logprobs=True, token_text=TEXTS.__getitem__,
                           echo_ids=[[0, 1, 2]])  # fmt: skip
    assert acc.start() == []  # the prompt's logprobs come with the first output
    first = _out(text="!", token_ids=[3], logprobs=[_lp(3, -0.5)], text_offsets=[0], finished=True,
                 finish_reason="length", prompt_logprobs=[_lp(1, -2.0), _lp(2, -1.0)])  # fmt: skip
    whole = merge_completion_chunks(acc.feed(0, first)).choices[0]
    assert whole.text == "Hi there!"
    assert whole.logprobs.tokens == ["<s>", "Hi", " there", "!"]
    assert whole.logprobs.token_logprobs == [None, -2.0, -1.0, -0.5]
    assert whole.logprobs.top_logprobs == [None, {"Hi": -2.0}, {" there": -1.0}, {"!": -0.5}]
    assert whole.logprobs.text_offset == [0, 0, 2, 8]  # "<s>" is not in the text


def test_max_tokens_0_shows_the_prompt_alone() -> None:
    acc = CompletionStream("cmpl-2", "m", 1, 3, ["Hi there"], logprobs=True, token_text=TEXTS.__getitem__,
                           echo_ids=[[1, 2]], prompt_only=True)  # fmt: skip
    out = _out(text="!", token_ids=[3], logprobs=[_lp(3, -0.5)], finished=True, finish_reason="length",
               prompt_logprobs=[_lp(2, -1.0)])  # fmt: skip
    whole = merge_completion_chunks(acc.feed(0, out), acc.usage()).choices[0]
    assert whole.text == "Hi there" and whole.finish_reason == "length"
    assert whole.logprobs.tokens == ["Hi", " there"] and whole.logprobs.token_logprobs == [None, -1.0]
    assert acc.usage().completion_tokens == 0 and acc.usage().prompt_tokens == 3
