"""Batched sampler: per-request parameters within one batch."""

from __future__ import annotations

import math

import pytest
import torch

from agora.engine.sampler import SampleRequest, sample
from agora.engine.sampling import SamplingParams


def row(params: SamplingParams, out: list[int] | None = None, prompt: list[int] | None = None,
        position: int | None = None) -> SampleRequest:  # fmt: skip
    return SampleRequest(params, prompt or [], out or [], frozenset({0}), params.seed, position=position)


def logits_of(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_greedy_and_top_k_1_pick_the_argmax():
    lg = logits_of([0.1, 2.0, 0.3, 1.9], [3.0, 0.0, 0.0, 0.0])
    res = sample(lg, [row(SamplingParams(temperature=0)), row(SamplingParams(temperature=1.5, top_k=1))])
    assert res.token_ids == [1, 0]


@pytest.mark.parametrize("seeded", [False, True])
def test_sampled_tokens_follow_the_distribution(seeded):
    """The exponential race draws each token with its probability, rare ones included: unseeded rows in one
    batch, and a seeded request's tokens over its positions (each position's noise from its own seed)."""
    p = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.02, 0.01])
    n = 20000
    params = SamplingParams(temperature=1.0, seed=1234 if seeded else None)
    got = sample(p.log().expand(n, -1).contiguous(), [row(params, position=i) for i in range(n)]).token_ids
    freq = torch.bincount(torch.tensor(got), minlength=len(p)).double() / n
    sigma = (p.double() * (1 - p.double()) / n).sqrt()
    assert ((freq - p.double()).abs() <= 4 * sigma).all(), (freq, p)
    if seeded:  # the same seed and positions: the same tokens
        again = sample(p.log().expand(n, -1).contiguous(), [row(params, position=i) for i in range(n)]).token_ids
        assert again == got


def test_seeded_rows_do_not_depend_on_the_rest_of_the_batch():
    lg = torch.randn(1, 50, generator=torch.Generator().manual_seed(1))
    p = SamplingParams(temperature=1.0, seed=1234)

    def run(batch_extra: int) -> list[int]:
        toks = []
        for i in range(20):
            reqs = [row(SamplingParams(temperature=1.0)) for _ in range(batch_extra)] + [row(p, position=i)]
            batch = torch.cat([torch.randn(batch_extra, 50), lg]) if batch_extra else lg
            toks.append(sample(batch, reqs).token_ids[-1])
        return toks

    alone, crowded = run(0), run(7)
    assert alone == crowded
    assert len(set(alone)) > 1  # it really samples


def _frequencies(params: SamplingParams, logits: list[float], n: int = 4000) -> list[float]:
    lg = logits_of(*([logits] * n))
    toks = sample(lg, [row(params) for _ in range(n)]).token_ids
    return [toks.count(i) / n for i in range(len(logits))]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = [math.log(x) for x in (0.5, 0.3, 0.15, 0.05)]
    freq = _frequencies(SamplingParams(temperature=1.0, top_p=0.7), logits)
    assert freq[2] == 0 and freq[3] == 0
    assert freq[0] == pytest.approx(0.5 / 0.8, abs=0.04)


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    logits = [math.log(x) for x in (0.6, 0.3, 0.1)]
    freq = _frequencies(SamplingParams(temperature=1.0, min_p=0.3), logits)
    assert freq[2] == 0 and freq[1] > 0.2


def test_temperature_sharpens():
    logits = [1.0, 0.0]
    cold = _frequencies(SamplingParams(temperature=0.25), logits)
    hot = _frequencies(SamplingParams(temperature=1.0), logits)
    assert cold[0] > hot[0] + 0.15


def test_penalties():
    lg = logits_of([1.0, 0.9, -1.0], [1.0, 0.9, -1.0], [2.0, 1.9, -1.0])
    reqs = [
        row(SamplingParams(temperature=0, presence_penalty=0.2), out=[0]),  # 0.8 < 0.9
        row(SamplingParams(temperature=0, frequency_penalty=0.04), out=[0, 0, 0]),  # 0.88 < 0.9
        row(SamplingParams(temperature=0, repetition_penalty=1.1), prompt=[0]),  # 2.0/1.1 < 1.9
    ]
    assert sample(lg, reqs).token_ids == [1, 1, 1]
    # Without penalties the same rows pick token 0.
    assert sample(lg, [row(SamplingParams(temperature=0), out=[0]) for _ in range(3)]).token_ids == [0, 0, 0]


def test_min_tokens_blocks_eos_and_stop_token_ids():
    lg = logits_of([5.0, 1.0, 4.0], [5.0, 1.0, 4.0])
    reqs = [
        row(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[2]), out=[1]),
        row(SamplingParams(temperature=0, min_tokens=2), out=[1, 1]),
    ]
    assert sample(lg, reqs).token_ids == [1, 0]


def test_logit_bias():
    lg = logits_of([1.0, 0.0, 0.0])
    assert sample(lg, [row(SamplingParams(temperature=0, logit_bias={2: 5.0}))]).token_ids == [2]


def test_allowed_token_ids_mask_every_other_token_of_their_row_only():
    lg = logits_of([5.0, 1.0, 0.0, 3.0], [5.0, 1.0, 0.0, 3.0])
    reqs = [row(SamplingParams(temperature=0, allowed_token_ids=[1, 2])), row(SamplingParams(temperature=0))]
    assert sample(lg, reqs).token_ids == [1, 0]
    sampled = _frequencies(SamplingParams(temperature=1.0, allowed_token_ids=[2, 3]), [5.0, 1.0, 0.0, 3.0], 500)
    assert sampled[0] == sampled[1] == 0 and sampled[3] > sampled[2] > 0


def test_bad_words_ban_a_word_s_last_token_only_after_the_rest_of_it():
    lg = logits_of(*[[0.0, 1.0, 2.0, 3.0, 4.0]] * 4)
    params = SamplingParams(temperature=0, bad_words_token_ids=[[1, 4], [3]])
    # [1, 4]: token 4 is banned only right after token 1; [3]: token 3 is banned everywhere
    reqs = [row(params, out=[2, 1]), row(params, out=[1, 2]), row(params), row(SamplingParams(temperature=0), out=[1])]
    assert sample(lg, reqs).token_ids == [2, 4, 4, 4]
    # the prompt does not count: a word may be split across prompt and output (vLLM's rule too)
    assert sample(lg[:1], [row(params, prompt=[1])]).token_ids == [4]


def test_a_thinking_budget_writes_the_end_of_the_thinking_once_it_is_spent():
    # tokens: 7 <think>, 8 and 9 </think> (two tokens), 1..3 words; the model would go on thinking with 1
    lg = logits_of(*[[0.0, 5.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]] * 8)
    opened = SamplingParams(temperature=0, thinking_token_budget=3, thinking_end_token_ids=[8, 9])
    may = SamplingParams(temperature=0, thinking_token_budget=2, thinking_start_token_ids=[7],
                         thinking_end_token_ids=[8, 9])  # fmt: skip
    reqs = [row(opened, out=[1, 1]), row(opened, out=[1, 1, 1]), row(opened, out=[1, 1, 1, 8]),
            row(opened, out=[1, 1, 1, 8, 9]),  # written: the answer is free
            row(opened, out=[8, 9, 1]),  # it ended of its own accord within the budget
            row(may, out=[2, 7, 1, 1]),  # opened after a first token (whitespace, say): the budget counts from there
            row(may, out=[1, 2, 3, 4, 7, 1, 1]),  # a <think> past the output's start is the answer's text
            row(may, out=[1])]  # fmt: skip
    assert sample(lg, reqs).token_ids == [1, 8, 9, 1, 1, 8, 1, 1]
    # speculation: a draft past the budget is rejected where the end must be written
    from agora.engine.sampler import verify

    assert verify(lg[:3], [row(opened, out=[1])], [[1, 1]])[0][0] == [1, 1, 8]
    with pytest.raises(ValueError, match="does not reason"):
        SamplingParams(thinking_token_budget=5)
    with pytest.raises(ValueError, match=">= 0"):
        SamplingParams(thinking_token_budget=-1, thinking_end_token_ids=[8])


def test_logprobs_are_the_raw_distribution():
    lg = logits_of([2.0, 1.0, 0.5, -1.0], [0.0, 0.0, 3.0, 0.0])
    reqs = [row(SamplingParams(temperature=0, logprobs=2)), row(SamplingParams(temperature=0))]
    res = sample(lg, reqs)
    ref = torch.log_softmax(lg[0], -1)
    lp = res.logprobs[0]
    assert lp is not None and res.logprobs[1] is None
    assert lp.token_id == 0 and lp.rank == 1
    assert lp.logprob == pytest.approx(ref[0].item())
    assert [t for t, _ in lp.top] == [0, 1]
    assert lp.top[1][1] == pytest.approx(ref[1].item())


@pytest.mark.parametrize(
    "kwargs",
    [dict(n=0), dict(n=17), dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(max_tokens=0),
     dict(logprobs=21), dict(min_tokens=5, max_tokens=2), dict(stop=[""]), dict(seed=-1), dict(min_p=1.5),
     dict(allowed_token_ids=[]), dict(bad_words=[" "]), dict(bad_words=["x"] * 129), dict(bad_words_token_ids=[[]]),
     dict(bad_words_token_ids=[[1] * 100] * 41)],
)  # fmt: skip
def test_invalid_params_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


# -- the logits-processor chain: grammar masks as one more link ----------------------------------


class FakeGrammar:
    """Allows only ``allowed``; ``swap`` replaces a sampled token (as budget steering does)."""

    def __init__(self, allowed: set[int], swap: dict[int, int] | None = None, completed: bool = False) -> None:
        self.allowed, self.swap, self.is_completed = allowed, swap or {}, completed
        self.seen: list[tuple[int, int]] = []

    def mask(self, bitmask, row: int, budget: int) -> None:
        bitmask[row].zero_()
        for t in self.allowed:
            word, bit = divmod(t, 32)
            value = 1 << bit
            bitmask[row, word] |= value - (1 << 32) if value >= 1 << 31 else value

    def accept(self, token: int, budget: int) -> int:
        self.seen.append((token, budget))
        return self.swap.get(token, token)


def grammar_row(params: SamplingParams, grammar: FakeGrammar, budget: int = 10, out: list[int] | None = None):
    return SampleRequest(params, [], out or [], frozenset({0}), None, grammar, budget)


def test_grammar_rows_and_free_rows_in_one_batch():
    pytest.importorskip("xgrammar")
    lg = torch.arange(40, dtype=torch.float32).repeat(3, 1)  # argmax 39 everywhere
    g1, g2 = FakeGrammar({3, 7}), FakeGrammar({33, 35})
    reqs = [grammar_row(SamplingParams(temperature=0), g1, budget=5), row(SamplingParams(temperature=0)),
            grammar_row(SamplingParams(temperature=1.0, seed=1), g2)]  # fmt: skip
    res = sample(lg, reqs)
    assert res.token_ids[0] == 7 and res.token_ids[1] == 39 and res.token_ids[2] in (33, 35)
    assert g1.seen == [(7, 5)]  # the grammar took the token, with the budget left


def test_bias_cannot_escape_a_grammar_and_a_swapped_token_gets_its_logprob():
    pytest.importorskip("xgrammar")
    lg = torch.zeros(1, 40)
    lg[0, 5], lg[0, 9] = 3.0, 1.0
    g = FakeGrammar({5, 9}, swap={5: 9})
    res = sample(lg, [grammar_row(SamplingParams(temperature=0, logit_bias={20: 100.0}, logprobs=1), g)])
    assert res.token_ids == [9]
    assert res.logprobs[0].token_id == 9
    assert res.logprobs[0].logprob == pytest.approx(torch.log_softmax(lg[0], -1)[9].item())


def test_min_tokens_yields_to_a_whole_grammar():
    pytest.importorskip("xgrammar")
    lg = torch.zeros(2, 8)
    lg[:, 0] = 5.0  # token 0 is end-of-sequence
    params = SamplingParams(temperature=0, min_tokens=4)
    whole, partial = FakeGrammar({0, 3}, completed=True), FakeGrammar({0, 3})
    res = sample(lg, [grammar_row(params, whole), grammar_row(params, partial)])
    assert res.token_ids == [0, 3]  # the whole grammar may end; the other must go on
