"""One sequence's grammar: the matcher, the text it accepted, and the ending it keeps in reserve.

Each step the sampler asks :meth:`GrammarState.mask` for the tokens the grammar allows and
hands back the sampled token through :meth:`GrammarState.accept`. Near the end of the
token budget the state keeps a *plan*: the shortest valid ending of what it accepted so
far, spelled in tokens. Once the plan takes all the budget left, its tokens are forced
one by one; and a sampled token after which no ending fits any more is taken back and
replaced by the plan's first token. So a constrained output always ends valid, unless
not even the smallest output fits in ``max_tokens``.

::

    budget left:  9   8   7   6   5   4   3   2   1
    sampled:      a   b   c   d   e
    plan tokens:                     [", "n": 0}"]  (4 tokens; forced from budget 4)

The plan is recomputed only near the end (within ``NEAR`` tokens of it) and every
``REFRESH`` tokens before that; a plan stays valid while the grammar still accepts it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from agora.engine.structured.compiler import Constraint
from agora.engine.structured.endings import TooLong, search_ending

logger = logging.getLogger(__name__)

NEAR = 64  # tokens: within this many of the plan's length, check every step
REFRESH = 16  # tokens: before that, recompute the plan this often


@dataclass(slots=True)
class Plan:
    data: bytes  # the ending
    tokens: list[int]  # the same bytes, in tokens
    at: int  # len(GrammarState.text) when it was last known to end the output


class GrammarState:
    def __init__(self, constraint: Constraint, stop_token_ids: list[int]) -> None:
        import xgrammar as xgr

        self.constraint = constraint
        self.vocab = constraint.vocab
        self.matcher = xgr.GrammarMatcher(constraint.grammar, override_stop_tokens=stop_token_ids or None)
        self.stop_token_ids = stop_token_ids
        self.text = bytearray()  # bytes of the accepted tokens
        self.forced: list[int] = []  # the plan's tokens still to emit, once forcing started
        self.plan: Plan | None = None
        self.num_accepted = 0
        self._planned_at = -REFRESH  # num_accepted at the last plan attempt
        self._retry_at = 0  # after a failed attempt, the next is tried only from here
        self._failures = 0

    # -- state ---------------------------------------------------------------------------

    @property
    def is_completed(self) -> bool:
        """The output so far is a whole valid output (the grammar may still allow more)."""
        return self.matcher.is_completed()

    @property
    def is_terminated(self) -> bool:
        """A stop token was accepted: nothing more may follow."""
        return self.matcher.is_terminated()

    # -- the two calls the sampler makes ---------------------------------------------------

    def mask(self, bitmask: object, row: int, budget: int) -> None:
        """Fill ``bitmask[row]`` with the tokens allowed now; ``budget`` counts this token too."""
        if not self.forced:
            plan = self._plan_for(budget)
            if plan is not None and plan.tokens and len(plan.tokens) >= budget:
                self.forced = list(plan.tokens)
            elif plan is not None and not plan.tokens and budget <= 1 and self.stop_token_ids:
                self.forced = [self.stop_token_ids[0]]  # whole, and the last token: end here
        if self.forced:
            _only(bitmask, row, self.forced[0])
        else:
            self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int, budget: int) -> int:
        """Take the sampled token (or a replacement, if no ending would fit after it); returns the token kept."""
        if self.forced:
            token = self.forced.pop(0)
            self._advance(token)
            return token
        before = self.plan if self._plan_is_current() else None
        if not self._advance(token):
            return token
        if budget - 1 <= 0 or self.is_terminated or before is None or not self._near(budget - 1):
            return token
        after = self._plan_for(budget - 1)
        if after is None or len(after.tokens) <= budget - 1:
            return token  # it fits (or no ending is known to compare with: keep the model's choice)
        # No ending fits after this token: take it back and start the plan made before it.
        self._rollback(token)
        self.plan = before
        self.forced = list(before.tokens) or [*self.stop_token_ids[:1]]
        if not self.forced:
            self._advance(token)
            return token
        replacement = self.forced.pop(0)
        self._advance(replacement)
        return replacement

    # -- internals ---------------------------------------------------------------------------

    def _advance(self, token: int) -> bool:
        if not self.matcher.accept_token(token):
            logger.warning("grammar refused token %d; the output may not parse", token)
            return False
        self.num_accepted += 1
        if token not in self.stop_token_ids:
            self.text += self.vocab.token_bytes[token]
        plan = self.plan
        if plan is not None and plan.tokens and plan.tokens[0] == token:  # the model wrote the plan's next token
            self.plan = Plan(plan.data[len(self.vocab.token_bytes[token]) :], plan.tokens[1:], len(self.text))
        return True

    def _rollback(self, token: int) -> None:
        self.matcher.rollback(1)
        self.num_accepted -= 1
        if token not in self.stop_token_ids:
            del self.text[len(self.text) - len(self.vocab.token_bytes[token]) :]

    def _plan_is_current(self) -> bool:
        return self.plan is not None and self.plan.at == len(self.text)

    def _near(self, budget: int) -> bool:
        size = len(self.plan.tokens) if self.plan is not None else 0
        return budget <= size + NEAR

    def _plan_for(self, budget: int) -> Plan | None:
        """A plan valid for the current state, when the budget calls for one (None otherwise)."""
        if self._plan_is_current():
            return self.plan
        if not self._near(budget) and self.num_accepted - self._planned_at < REFRESH and self.plan is not None:
            return None  # far from the end: no decision needs a plan yet
        if self.plan is not None and self._still_valid(self.plan):
            return self.plan  # what was left to write still ends the output
        if self.num_accepted < self._retry_at:
            return None
        self._planned_at = self.num_accepted
        plan = self._make_plan()
        if plan is None:  # try again soon, then less and less often
            self._failures += 1
            self._retry_at = self.num_accepted + (1 << min(self._failures - 1, 4))
            return None
        self._failures = 0
        self.plan = plan
        return plan

    def _still_valid(self, plan: Plan) -> bool:
        ok = self._accepts(plan.data)
        if ok:
            plan.at = len(self.text)
        return ok

    def _make_plan(self) -> Plan | None:
        raw = bytes(self.text)
        pad = _finish_utf8(raw)  # the text may end inside a multi-byte character
        text = (raw + pad).decode("utf-8", "replace")
        c = self.constraint
        try:
            ending = c.ending.ending(text) if c.ending is not None else None
        except TooLong:
            return None  # no ending this long fits any budget worth planning for
        if ending is None or not self._accepts(pad + ending.encode()):
            after_pad = self.matcher.fork()
            if pad and not after_pad.accept_string(pad):
                return None
            ending = search_ending(after_pad, c.alphabet)
            if ending is None:
                return None
        data = pad + ending.encode()
        tokens = self._spell(pad, ending)
        return Plan(data, tokens, len(self.text)) if tokens is not None else None

    def _accepts(self, ending: bytes) -> bool:
        check = self.matcher.fork()
        return (not ending or check.accept_string(ending)) and check.is_completed()

    def _spell(self, pad: bytes, ending: str) -> list[int] | None:
        """``pad`` + ``ending`` (bytes the grammar accepts) in tokens: the tokenizer's spelling where it spells
        exactly those bytes with ordinary tokens, else byte by byte."""
        head = self._bytes_of(pad)
        if head is None:
            return None
        if ending:
            tokens = self.vocab.encode(ending)
            if b"".join(self.vocab.token_bytes[t] for t in tokens) == ending.encode() and not (
                self.vocab.special & set(tokens)
            ):
                return head + tokens
        tail = self._bytes_of(ending.encode())
        return None if tail is None else head + tail

    def _bytes_of(self, data: bytes) -> list[int] | None:
        out = []
        for b in data:
            t = self.vocab.byte_tokens.get(b)
            if t is None:
                return None
            out.append(t)
        return out


def _finish_utf8(raw: bytes) -> bytes:
    """The fewest bytes that complete a UTF-8 character ``raw`` ends inside (b"" if none)."""
    for back in range(1, min(4, len(raw)) + 1):
        lead = raw[-back]
        if lead & 0xC0 == 0x80:
            continue  # a continuation byte: look further back
        need = 2 if lead & 0xE0 == 0xC0 else 3 if lead & 0xF0 == 0xE0 else 4 if lead & 0xF8 == 0xF0 else 1
        missing = need - back
        if missing <= 0:
            return b""
        # the smallest continuation that keeps the character valid (E0 needs A0+, F0 needs 90+)
        first = {0xE0: 0xA0, 0xF0: 0x90}.get(lead, 0x80) if back == 1 else 0x80
        return bytes([first] + [0x80] * (missing - 1))
    return b""


def _only(bitmask: object, row: int, token: int) -> None:
    """``bitmask[row]``: just ``token`` allowed (bit ``token % 32`` of word ``token // 32``)."""
    r = bitmask[row]  # type: ignore[index]
    r.zero_()
    word, bit = divmod(token, 32)
    value = 1 << bit
    r[word] = value - (1 << 32) if value >= 1 << 31 else value  # int32 words
