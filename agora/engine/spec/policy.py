"""How many of a sequence's draft tokens are worth verifying this step.

A draft token costs compute whether or not it is accepted, and what it costs depends on the
machine and the batch: at batch 1 on a CPU a step that verifies 8 drafts reads the weights once,
as one token does, so drafts are nearly free; in a batch of 16 long contexts every extra token
costs about half a decode token. So the engine measures it. Two estimates, both decayed so they
follow the load:

- the step's cost as a line over the tokens it computes, ``t(T) = a + b T`` (least squares
  over recent decode steps: ``b`` is what one more token costs);
- each sequence's acceptance rate: of the draft positions verified (a position is verified when
  every draft before it was accepted), the share accepted; a new sequence starts from the rate
  of all recent sequences (an agent's next turn is a new request, and its drafts tend to do as
  the last turns' did).

Position ``i`` of a draft is kept while its chance of being accepted, ``rate ** (i + 1)``, is at
least what it costs in tokens of this step's throughput, ``b * B / t(B)`` for ``B`` sequences
decoding; a sequence whose first position would not pass is not even asked for drafts. Until the
line can be told (the first steps, or when the recent ones were all of one size), every other step
keeps all drafts and the rest none, so the steps the fit sees differ in size. A
sequence that has not drafted for ``EXPLORE`` steps may try ``PROBE`` tokens once, so its rate
can recover (the probes of different sequences fall on different steps, and they keep the cost
fit seeing steps of different sizes). Each probe of a sequence that finds nothing doubles that
sequence's wait for the next, up to ``MAX_EXPLORE``; one that lands resets it. The wait is the
sequence's own: a new request (an agent's next turn, which may copy where the last did not)
probes after ``EXPLORE`` steps whatever earlier requests' probes found.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

DECAY = 0.98  # per step, of the cost fit; per verification, of a sequence's acceptance counts
PRIOR_ACCEPTED, PRIOR_VERIFIED = 2.0, 3.0  # before anything was verified, a rate of 2/3
PRIOR_WEIGHT = 3.0  # verifications a new sequence's starting rate (the recent overall rate) counts for
MIN_STEPS = 16  # decode steps measured before the cost fit is trusted
EXPLORE = 32  # steps without drafts after which a sequence probes (its first probe, or after one that landed)
MAX_EXPLORE = 256  # the longest wait, after probes that found nothing
PROBE = 2  # draft tokens of a probe
UNTOLD = 2.0  # the threshold of the steps that keep no drafts while the cost line cannot be told (> any chance)


@dataclass
class _Fit:
    w: float = 0.0
    t: float = 0.0
    y: float = 0.0
    tt: float = 0.0
    ty: float = 0.0
    steps: int = 0

    def add(self, tokens: float, seconds: float) -> None:
        self.w = DECAY * self.w + 1.0
        self.t = DECAY * self.t + tokens
        self.y = DECAY * self.y + seconds
        self.tt = DECAY * self.tt + tokens * tokens
        self.ty = DECAY * self.ty + tokens * seconds
        self.steps += 1

    def line(self) -> tuple[float, float] | None:
        """(a, b) of t(T) = a + b T, or None while the data cannot tell (too few steps, one batch size)."""
        if self.steps < MIN_STEPS:
            return None
        mean_t, mean_y = self.t / self.w, self.y / self.w
        var = self.tt / self.w - mean_t * mean_t
        if var < 0.25:
            return None
        b = max((self.ty / self.w - mean_t * mean_y) / var, 0.0)
        return mean_y - b * mean_t, b


class DraftPolicy:
    def __init__(self) -> None:
        self.fit = _Fit()
        self.rates: dict[str, tuple[float, float]] = {}  # request -> (accepted, verified), decayed
        self.overall = (PRIOR_ACCEPTED, PRIOR_VERIFIED)  # every sequence's verifications, decayed
        self.idle: dict[str, int] = {}  # request -> steps since it last drafted
        self.waits: dict[str, int] = {}  # request -> steps it waits before its next probe, if not EXPLORE
        self.probing: set[str] = set()  # requests whose drafts this step are a probe
        self.step = 0
        self._threshold = 0.0

    def observe_step(self, tokens: int, seconds: float) -> None:
        """A step that computed ``tokens`` (decode tokens and drafts, no prefill) in ``seconds``."""
        self.fit.add(tokens, seconds)

    def _prior(self) -> tuple[float, float]:
        acc, ver = self.overall
        return PRIOR_WEIGHT * acc / ver, PRIOR_WEIGHT

    def record(self, request_id: str, num_drafts: int, num_accepted: int) -> None:
        acc, ver = self.rates.get(request_id) or self._prior()
        verified = min(num_accepted + 1, num_drafts)
        self.rates[request_id] = (DECAY * acc + num_accepted, DECAY * ver + verified)
        if request_id in self.probing:
            self.probing.discard(request_id)
            if num_accepted:
                self.waits.pop(request_id, None)
            else:
                self.waits[request_id] = min(2 * self.waits.get(request_id, EXPLORE), MAX_EXPLORE)
        acc, ver = self.overall
        self.overall = (DECAY * acc + num_accepted, DECAY * ver + verified)

    def forget(self, request_id: str) -> None:
        self.rates.pop(request_id, None)
        self.idle.pop(request_id, None)
        self.waits.pop(request_id, None)
        self.probing.discard(request_id)

    def rate(self, request_id: str) -> float:
        acc, ver = self.rates.get(request_id) or self._prior()
        return acc / ver

    def wants(self, request_id: str) -> bool:
        """Whether a sequence's drafts could be kept this step at all (if not, do not compute them)."""
        if self._threshold <= 0.0 or self.rate(request_id) >= self._threshold:
            return True
        idle = self.idle.get(request_id, 0) + 1
        self.idle[request_id] = idle
        return idle > self.waits.get(request_id, EXPLORE)

    def begin_step(self, batch: int) -> float:
        """The acceptance chance a draft position needs for the next step, ``batch`` sequences decoding."""
        self.step += 1
        line = self.fit.line()
        if batch < 1:
            self._threshold = 0.0
        elif line is None:
            # The data cannot tell yet (too few steps, or all of one size): keep every draft on every other
            # step and none on the others, so the fit sees steps of two sizes. Keeping every draft on every
            # step could go on forever where each sequence always offers as many: each step the same size.
            self._threshold = 0.0 if self.step % 2 else UNTOLD
        else:
            a, b = line
            step_time = max(a + b * batch, 1e-6)
            self._threshold = min(b * batch / step_time, 1.0)
            if self.step % 256 == 1:
                rates = [acc / ver for acc, ver in self.rates.values()]
                logger.debug("drafts: batch %d, step %.1f ms + %.2f ms a token, keep positions accepted with p >= %.2f"
                            " (mean rate %.2f)", batch, a * 1e3, b * 1e3, self._threshold,
                            sum(rates) / max(1, len(rates)))  # fmt: skip
        return self._threshold

    def keep(self, request_id: str, num_drafts: int) -> int:
        """How many of a sequence's ``num_drafts`` leading draft tokens to verify."""
        if self._threshold <= 0.0:
            return num_drafts
        rate = self.rate(request_id)
        chance = rate
        n = 0
        while n < num_drafts and chance >= self._threshold:
            n += 1
            chance *= rate
        if n == 0 and self.idle.get(request_id, 0) > self.waits.get(request_id, EXPLORE):
            n = min(num_drafts, PROBE)
            self.probing.add(request_id)
        if n:
            self.idle[request_id] = 0
        return n
