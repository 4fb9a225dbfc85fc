"""Batched sampling with per-request parameters.

One call handles every request that samples this step::

    logits ─▶ logits processors, in chain order, each over the whole batch:
              bias ─▶ allowed tokens ─▶ bad words ─▶ penalties ─▶ min_tokens ─▶ grammar masks
           ─▶ pick: greedy, or temperature + top-k/top-p/min-p + an exponential race
           ─▶ grammars take the picked tokens (and may swap one to keep a valid ending in budget)
           ─▶ logprobs of the raw distribution

A processor that no request of the batch needs is skipped, and without grammars the
only host sync is the final ``.tolist()``. Seeded requests draw each token's noise from
a generator seeded by (seed, position in the output): the same tokens whatever else is
in the batch, and whether or not speculative decoding verified them.

``verify`` is the speculative step: a sequence with k draft tokens has k + 1 rows of
logits (one per draft position, and the bonus one after the last), each row is sampled
as if the drafts before it had been sampled (penalties, bad words and min_tokens see them), and the
longest prefix of drafts equal to the sampled tokens is kept plus the sampled token after
it. With a single-token guess per position that is exact rejection sampling: a draft is
kept with probability p(draft), and a rejected position keeps the token sampled from p,
which given that it differs from the draft is distributed as p without the draft. Greedy
output is the same tokens as without speculation. A grammar is one more link in the chain,
not a special case: its token bitmasks are filled per row and applied batched, rows
with and without grammars in one step.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from agora import kernels
from agora.engine.sampling import SamplingParams

UNBOUNDED = 1 << 30


@dataclass(slots=True)
class SampleRequest:
    """What the sampler needs to know about one row of logits."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    eos_token_ids: frozenset[int]
    seed: int | None = None  # a seeded request's seed (its noise is then drawn per position)
    grammar: Any = None  # structured.GrammarState, or None
    budget: int = UNBOUNDED  # tokens this sequence may still produce, this one included
    position: int | None = None  # index in the output of the token sampled (default: len(output_token_ids))

    @property
    def index(self) -> int:
        """Where in the output the token sampled for this row goes."""
        return len(self.output_token_ids) if self.position is None else self.position


_MASK64 = (1 << 64) - 1


def noise_seed(seed: int, position: int) -> int:
    """A generator seed for one token of a seeded request (splitmix64 of seed and position)."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


_GENERATORS: dict[torch.device, torch.Generator] = {}


def _generator(device: torch.device) -> torch.Generator:
    gen = _GENERATORS.get(device)
    if gen is None:
        gen = _GENERATORS[device] = torch.Generator(device=device)
    return gen


def exponential_from_uniform_(u: torch.Tensor) -> torch.Tensor:
    """``u`` ~ U[0, 1) becomes, in place, ``-log(1 - u)`` ~ Exp(1). The variates ``exponential_`` draws,
    5-6x faster on a CPU (``exponential_`` takes 15 ms for 16 rows of a 49k vocabulary on 2 Zen 4 cores,
    a quarter of a sampled decode step of SmolLM2 at batch 16; this takes 2.6 ms)."""
    return u.neg_().log1p_().neg_()


@dataclass(slots=True)
class TokenLogprobs:
    """Logprob of the chosen token and the top alternatives (raw model distribution)."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def _pad(lists: list[list[int]], fill: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(len(x) for x in lists))
    out = torch.full((len(lists), width), fill, dtype=torch.long)
    for i, x in enumerate(lists):
        if x:
            out[i, : len(x)] = torch.tensor(x, dtype=torch.long)
    return out.to(device)


class LogitsProcessor(Protocol):
    """One link of the chain: changes the logits of the rows that ask for it."""

    def wanted(self, reqs: Sequence[SampleRequest]) -> bool: ...

    def __call__(self, logits: torch.Tensor, reqs: Sequence[SampleRequest]) -> torch.Tensor: ...


def _ban(logits: torch.Tensor, rows: Sequence[tuple[int, list[int]]]) -> torch.Tensor:
    """``logits`` with the given tokens of each row made impossible (a copy, or the same tensor when none are)."""
    if not any(ids for _, ids in rows):
        return logits
    logits = logits.clone()
    for i, ids in rows:
        if ids:
            logits[i, torch.tensor(ids, device=logits.device)] = float("-inf")
    return logits


class LogitBias:
    def wanted(self, reqs: Sequence[SampleRequest]) -> bool:
        return any(r.params.logit_bias for r in reqs)

    def __call__(self, logits: torch.Tensor, reqs: Sequence[SampleRequest]) -> torch.Tensor:
        bias = torch.zeros_like(logits)
        for i, r in enumerate(reqs):
            for tok, value in (r.params.logit_bias or {}).items():
                bias[i, tok] = value
        return logits + bias


class AllowedTokens:
    """``allowed_token_ids``: every other token of the row's vocabulary is masked out. A request's ids become a
    tensor once, not every step (a vocabulary-sized list takes 8 ms to convert, more than a decode step)."""

    MAX_CACHED = 256

    def __init__(self) -> None:
        # (id(params), device) -> (params, ids): the params are held, so their id is not reused while cached
        self._ids: OrderedDict[tuple[int, torch.device], tuple[SamplingParams, torch.Tensor]] = OrderedDict()

    def _tensor(self, params: SamplingParams, device: torch.device) -> torch.Tensor:
        key = (id(params), device)
        hit = self._ids.get(key)
        if hit is not None and hit[0] is params:
            self._ids.move_to_end(key)
            return hit[1]
        ids = torch.tensor(params.allowed_token_ids, dtype=torch.long, device=device)
        self._ids[key] = (params, ids)
        if len(self._ids) > self.MAX_CACHED:
            self._ids.popitem(last=False)
        return ids

    def wanted(self, reqs: Sequence[SampleRequest]) -> bool:
        return any(r.params.allowed_token_ids is not None for r in reqs)

    def __call__(self, logits: torch.Tensor, reqs: Sequence[SampleRequest]) -> torch.Tensor:
        keep = torch.ones_like(logits, dtype=torch.bool)
        for i, r in enumerate(reqs):
            if r.params.allowed_token_ids is not None:
                keep[i] = False
                keep[i, self._tensor(r.params, logits.device)] = True
        return logits.masked_fill(~keep, float("-inf"))


class BadWords:
    """``bad_words``: a word's last token is banned wherever the output so far ends with the tokens before it
    (a one-token word is banned everywhere), so the output never spells the word in those tokens."""

    @staticmethod
    def _banned(r: SampleRequest) -> list[int]:
        out = r.output_token_ids
        return [
            ids[-1]
            for ids in r.params.bad_words_token_ids
            if len(ids) == 1 or (len(out) >= len(ids) - 1 and out[len(out) - len(ids) + 1 :] == ids[:-1])
        ]

    def wanted(self, reqs: Sequence[SampleRequest]) -> bool:
        return any(r.params.bad_words_token_ids for r in reqs)

    def __call__(self, logits: torch.Tensor, reqs: Sequence[SampleRequest]) -> torch.Tensor:
        return _ban(logits, [(i, self._banned(r)) for i, r in enumerate(reqs) if r.params.bad_words_token_ids])


class Penalties:
    """Repetition (over prompt and output, as HF), presence and frequency (over the output)."""

    def wanted(self, reqs: Sequence[SampleRequest]) -> bool:
        return any(r.params.uses_penalties for r in reqs)

    def __call__(self, logits: torch.Tensor, reqs: Sequence[SampleRequest]) -> torch.Tensor:
        rows, vocab = logits.shape
        device = logits.device
        # Counts of output tokens (presence/frequency) and a seen-mask over prompt+output
        # (repetition, as in HF). Column `vocab` absorbs the padding.
        out_ids = _pad([r.output_token_ids for r in reqs], vocab, device)
        counts = torch.zeros(rows, vocab + 1, device=device)
        counts.scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=counts.dtype))
        counts = counts[:, :vocab]
        rep = torch.tensor([r.params.repetition_penalty for r in reqs], device=device)[:, None]
        if (rep != 1.0).any():
            prompt_ids = _pad([r.prompt_token_ids for r in reqs], vocab, device)
            seen = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=device)
            seen.scatter_(1, prompt_ids, True)
            seen = seen[:, :vocab] | (counts > 0)
            penalized = torch.where(logits > 0, logits / rep, logits * rep)
            logits = torch.where(seen, penalized, logits)
        freq = torch.tensor([r.params.frequency_penalty for r in reqs], device=device)[:, None]
        pres = torch.tensor([r.params.presence_penalty for r in reqs], device=device)[:, None]
        return logits - freq * counts - pres * (counts > 0).to(logits.dtype)


class MinTokens:
    """Before ``min_tokens`` are out, end-of-sequence tokens cannot be picked (unless a
    grammar is whole: then it decides, and it may allow nothing but the end)."""

    @staticmethod
    def _blocked(reqs: Sequence[SampleRequest]) -> list[tuple[int, list[int]]]:
        return [
            (i, sorted(r.eos_token_ids | set(r.params.stop_token_ids)))
            for i, r in enumerate(reqs)
            if len(r.output_token_ids) < r.params.min_tokens and not (r.grammar is not None and r.grammar.is_completed)
        ]

    def wanted(self, reqs: Sequence[SampleRequest]) -> bool:
        return any(len(r.output_token_ids) < r.params.min_tokens for r in reqs)

    def __call__(self, logits: torch.Tensor, reqs: Sequence[SampleRequest]) -> torch.Tensor:
        return _ban(logits, self._blocked(reqs))


def _find(seq: list[int], part: list[int], lo: int, hi: int) -> int:
    """Where ``part`` first lies wholly inside ``seq[lo:hi]`` (-1: nowhere); list.index scans in C."""
    i = lo
    while True:
        try:
            i = seq.index(part[0], i, hi)
        except ValueError:
            return -1
        if i + len(part) > hi:
            return -1
        if seq[i : i + len(part)] == part:
            return i
        i += 1


class ThinkingBudget:
    """``thinking_token_budget``: a reasoning model that has thought that many tokens without ending its thinking
    has the end (``</think>``) written for it, one token a step (every other token masked). The thinking starts
    at the output's start (the prompt opened it) or where the output opens it among its first tokens; it is
    over once the end lies inside the budget, or has been written."""

    OPENS_WITHIN = 4  # tokens at the output's start in which a model opens its thinking (whitespace first)

    @classmethod
    def forced(cls, r: SampleRequest) -> int | None:
        p, out = r.params, r.output_token_ids
        start = 0
        if p.thinking_start_token_ids:
            opened = _find(out, p.thinking_start_token_ids, 0, min(len(out), cls.OPENS_WITHIN))
            if opened < 0:
                return None
            start = opened + len(p.thinking_start_token_ids)
        budget, end = p.thinking_token_budget, p.thinking_end_token_ids
        assert budget is not None
        spent = len(out) - start
        if spent < budget or spent >= budget + len(end) or _find(out, end, start, start + budget) >= 0:
            return None
        return end[spent - budget]

    def wanted(self, reqs: Sequence[SampleRequest]) -> bool:
        return any(r.params.thinking_token_budget is not None for r in reqs)

    def __call__(self, logits: torch.Tensor, reqs: Sequence[SampleRequest]) -> torch.Tensor:
        rows = [(i, t) for i, r in enumerate(reqs) if r.params.thinking_token_budget is not None
                and (t := self.forced(r)) is not None]  # fmt: skip
        if not rows:
            return logits
        logits = logits.clone()
        for i, token in rows:
            kept = logits[i, token].clone()
            logits[i] = float("-inf")
            logits[i, token] = kept if torch.isfinite(kept) else 0.0
        return logits


class GrammarMask:
    """Structured outputs: each grammar row keeps only the tokens its grammar allows.

    xgrammar fills one int32 bitmask row per grammar (bit ``t % 32`` of word ``t // 32``
    allows token ``t``); the rows are unpacked and applied in one batched masked fill on
    the logits' device, with torch's own threads (xgrammar's CPU kernel runs threads of
    its own, which contend with the engine's and took 3 ms a step at batch 16)."""

    _SHIFTS: dict[torch.device, torch.Tensor] = {}

    def wanted(self, reqs: Sequence[SampleRequest]) -> bool:
        return any(r.grammar is not None for r in reqs)

    def __call__(self, logits: torch.Tensor, reqs: Sequence[SampleRequest]) -> torch.Tensor:
        import xgrammar as xgr

        rows = [i for i, r in enumerate(reqs) if r.grammar is not None]
        vocab = logits.shape[1]
        bitmask = xgr.allocate_token_bitmask(len(rows), vocab)
        for k, i in enumerate(rows):
            reqs[i].grammar.mask(bitmask, k, reqs[i].budget)
        shifts = self._SHIFTS.get(logits.device)
        if shifts is None:
            shifts = self._SHIFTS[logits.device] = torch.arange(32, dtype=torch.int32, device=logits.device)
        words = bitmask.to(logits.device, non_blocking=True)
        allowed = ((words[:, :, None] >> shifts) & 1).view(len(rows), -1)[:, :vocab].bool()
        index = torch.tensor(rows, device=logits.device)
        logits = logits.clone()
        logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
        return logits


CHAIN: tuple[LogitsProcessor, ...] = (LogitBias(), AllowedTokens(), BadWords(), Penalties(), MinTokens(),
                                      ThinkingBudget(), GrammarMask())  # fmt: skip


def _apply_truncation(logits: torch.Tensor, reqs: list[SampleRequest]) -> torch.Tensor:
    """top_k, then top_p on what remains, then min_p; all in one sort."""
    vocab = logits.shape[1]
    device = logits.device
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device)[None, :]
    top_k = torch.tensor([r.params.top_k or vocab for r in reqs], device=device)[:, None]
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    top_p = torch.tensor([r.params.top_p for r in reqs], device=device)[:, None]
    # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
    drop = (probs.cumsum(dim=-1) - probs) >= top_p
    min_p = torch.tensor([r.params.min_p for r in reqs], device=device)[:, None]
    drop |= probs < min_p * probs[:, :1]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` of ``[R, vocab]`` scores: on the CPU kernels where they are (the same indices,
    several times faster: 6.8 ms -> about 1 for a 16-agent verification step's 144 rows of 49,152)."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] > 0 and kernels.available():
        return kernels.argmax(x)
    return x.argmax(dim=-1)


def sample(logits: torch.Tensor, reqs: list[SampleRequest],
           chain: Sequence[LogitsProcessor] = CHAIN) -> SamplerOutput:  # fmt: skip
    """Pick one token per row of ``logits`` ([R, vocab], float32)."""
    rows = logits.shape[0]
    device = logits.device
    want_logprobs = [r.params.logprobs for r in reqs]
    raw_logprobs = logits.log_softmax(dim=-1) if any(n is not None for n in want_logprobs) else None
    for processor in chain:
        if processor.wanted(reqs):
            logits = processor(logits, reqs)

    greedy = torch.tensor([r.params.greedy for r in reqs], device=device)
    tokens = _argmax(logits)
    if not bool(greedy.all()):
        temps = torch.tensor([r.params.temperature if not r.params.greedy else 1.0 for r in reqs], device=device)
        scaled = logits / temps[:, None]
        if any(r.params.uses_truncation for r in reqs):
            scaled = _apply_truncation(scaled, reqs)
        probs = scaled.softmax(dim=-1)
        # Exponential race (Gumbel-max in disguise): argmax(p / E) with E ~ Exp(1) is a
        # sample from p. Seeded requests draw their noise from their own generator, so
        # their tokens do not depend on what else is in the batch.
        noise = torch.empty_like(probs)
        seeded = [i for i, r in enumerate(reqs) if r.seed is not None and not r.params.greedy]
        if len(seeded) < rows:
            noise.uniform_()
        if seeded:
            gen = _generator(device)
            for i in seeded:
                gen.manual_seed(noise_seed(reqs[i].seed, reqs[i].index))  # type: ignore[arg-type]
                noise[i].uniform_(generator=gen)
        exponential_from_uniform_(noise)
        sampled = _argmax(probs / noise.clamp_(min=1e-30))
        tokens = torch.where(greedy, tokens, sampled)

    token_list = tokens.tolist()
    swapped = False
    for i, r in enumerate(reqs):
        if r.grammar is not None:
            kept = r.grammar.accept(token_list[i], r.budget)
            swapped |= kept != token_list[i]
            token_list[i] = kept
    if swapped:
        tokens = torch.tensor(token_list, device=device)
    logprob_list: list[TokenLogprobs | None] = [None] * rows
    if raw_logprobs is not None:
        k = max(n or 0 for n in want_logprobs)
        chosen = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)
        ranks = (raw_logprobs > chosen[:, None]).sum(dim=-1) + 1
        top_vals, top_ids = raw_logprobs.topk(k, dim=-1) if k > 0 else (None, None)
        chosen_l, ranks_l = chosen.tolist(), ranks.tolist()
        top_vals_l = top_vals.tolist() if top_vals is not None else None
        top_ids_l = top_ids.tolist() if top_ids is not None else None
        for i, n in enumerate(want_logprobs):
            if n is None:
                continue
            top = list(zip(top_ids_l[i][:n], top_vals_l[i][:n], strict=True)) if n and top_ids_l else []
            logprob_list[i] = TokenLogprobs(token_list[i], chosen_l[i], ranks_l[i], top)
    return SamplerOutput(token_list, logprob_list)


def verify(logits: torch.Tensor, reqs: list[SampleRequest], drafts: list[list[int]],
           chain: Sequence[LogitsProcessor] = CHAIN) -> list[tuple[list[int], list[TokenLogprobs | None]]]:  # fmt: skip
    """Speculative verification. ``logits`` holds ``1 + len(drafts[i])`` consecutive rows for each request
    ``i``; returns, per request, the tokens kept (accepted drafts, then one sampled token) and their logprobs.

    Rows of requests without a grammar are sampled in one batch. A grammar's state advances with each
    token it takes, so a constrained request's rows are sampled one after another, each only if every
    draft before it was accepted (a draft the grammar forbids is simply never equal to the sampled token).
    """
    starts = []
    offset = 0
    for d in drafts:
        starts.append(offset)
        offset += 1 + len(d)
    results: list[tuple[list[int], list[TokenLogprobs | None]]] = [([], [])] * len(reqs)
    plain = [i for i, r in enumerate(reqs) if r.grammar is None]
    if plain:
        rows: list[SampleRequest] = []
        index: list[int] = []
        for i in plain:
            r, d = reqs[i], drafts[i]
            history = r.params.uses_history or r.params.min_tokens > len(r.output_token_ids)
            base = r.index
            for j in range(len(d) + 1):
                out_ids = r.output_token_ids + d[:j] if history and j else r.output_token_ids
                rows.append(SampleRequest(r.params, r.prompt_token_ids, out_ids, r.eos_token_ids, r.seed, None,
                                          r.budget - j, base + j))  # fmt: skip
                index.append(starts[i] + j)
        picked = logits if len(index) == logits.shape[0] else logits[torch.tensor(index, device=logits.device)]
        out = sample(picked, rows, chain)
        k = 0
        for i in plain:
            d = drafts[i]
            tokens = out.token_ids[k : k + len(d) + 1]
            lps = out.logprobs[k : k + len(d) + 1]
            k += len(d) + 1
            n = 0
            while n < len(d) and tokens[n] == d[n]:
                n += 1
            results[i] = (tokens[: n + 1], lps[: n + 1])
    for i, r in enumerate(reqs):
        if r.grammar is None:
            continue
        d = drafts[i]
        base = r.index
        kept: list[int] = []
        kept_lps: list[TokenLogprobs | None] = []
        for j in range(len(d) + 1):
            row = SampleRequest(r.params, r.prompt_token_ids, r.output_token_ids + kept, r.eos_token_ids, r.seed,
                                r.grammar, r.budget - j, base + j)  # fmt: skip
            one = sample(logits[starts[i] + j : starts[i] + j + 1], [row], chain)
            kept.append(one.token_ids[0])
            kept_lps.append(one.logprobs[0])
            if j == len(d) or kept[-1] != d[j] or r.grammar.is_terminated:
                break
        results[i] = (kept, kept_lps)
    return results
