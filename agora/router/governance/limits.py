"""Limits that stop runaway agents: rates, parallelism, token budgets, session caps.

Every request names its subjects (its key, its tenant) and, when it carries an
``x-session-id``, its session. Admission checks all of them first and then reserves
on all of them, in one step of the event loop, so two requests never both take the
last unit of a limit:

- ``max_parallel``: requests in flight;
- ``rpm`` / ``tpm``: a sliding minute of one-second buckets (tokens in + out, plus the
  tokens that requests in flight have reserved);
- ``budget_tokens`` per ``budget_window_s``: fixed windows aligned to the epoch (a day's
  budget resets at 00:00 UTC), shared by every gateway on the store: the counts settled
  here are flushed to the store and read back about every ``sync_interval_s``;
- ``session_requests`` / ``session_tokens``: per (tenant, session), for one agent run.

A request reserves its estimated input plus its ``max_tokens`` before it is dispatched
and settles with what the response really used. A token limit admits while what is
counted and reserved, plus the request's own input, stays under it: concurrent requests
overshoot it by at most one request's output (its ``max_tokens``).
Rates and parallelism are per gateway process; budgets are shared through the store.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from agora.openai.errors import APIError
from agora.router.governance.store import Limits

_MINUTE = 60
_MAX_SESSIONS = 100_000


class Window:
    """A sliding minute of one-second buckets."""

    __slots__ = ("buckets", "sum")

    def __init__(self) -> None:
        self.buckets: deque[list[int]] = deque()  # [second, amount]
        self.sum = 0

    def _expire(self, now: float) -> None:
        edge = int(now) - _MINUTE
        while self.buckets and self.buckets[0][0] <= edge:
            self.sum -= self.buckets.popleft()[1]

    def total(self, now: float) -> int:
        self._expire(now)
        return self.sum

    def add(self, now: float, amount: int) -> None:
        if amount <= 0:
            return
        self._expire(now)
        second = int(now)
        if self.buckets and self.buckets[-1][0] == second:
            self.buckets[-1][1] += amount
        else:
            self.buckets.append([second, amount])
        self.sum += amount

    def retry_after(self, now: float, limit: int, pending: int = 0) -> int:
        """Seconds until the window holds less than ``limit`` again (at least 1)."""
        self._expire(now)
        over = self.sum + pending - limit + 1
        for second, amount in self.buckets:
            over -= amount
            if over <= 0:
                return max(1, math.ceil(second + _MINUTE - now))
        return _MINUTE


@dataclass
class _State:
    parallel: int = 0
    requests: Window = field(default_factory=Window)
    tokens: Window = field(default_factory=Window)
    reserved: int = 0  # tokens reserved by requests in flight


@dataclass
class _Session:
    requests: int = 0
    tokens: int = 0
    reserved: int = 0


@dataclass(frozen=True)
class Subject:
    """One thing limits apply to: ``key:<id>`` or ``tenant:<name>``; ``label`` is what errors say."""

    name: str
    label: str
    limits: Limits


class Budgets:
    """Token counts per (subject, window start): the store's count, plus what this process settled
    and has not flushed yet (``pending``), is flushing right now, or has reserved for requests in flight."""

    def __init__(self) -> None:
        self.stored: dict[tuple[str, int], int] = {}
        self.pending: dict[tuple[str, int], int] = {}
        self.flushing: dict[tuple[str, int], int] = {}
        self.reserved: dict[tuple[str, int], int] = {}

    def used(self, window: tuple[str, int]) -> int:
        return (self.stored.get(window, 0) + self.pending.get(window, 0) + self.flushing.get(window, 0) +
                self.reserved.get(window, 0))  # fmt: skip

    def take_pending(self) -> dict[tuple[str, int], int]:
        """The settled counts to flush; they still count here until the store's counts are read back."""
        self.flushing, self.pending = self.pending, {}
        return self.flushing

    def flush_failed(self) -> None:
        for window, tokens in self.flushing.items():
            self.pending[window] = self.pending.get(window, 0) + tokens
        self.flushing = {}

    def refreshed(self, counts: dict[tuple[str, int], int]) -> None:
        """The store's counts of every window in use, read after the flush (so they include it)."""
        self.stored, self.flushing = counts, {}


def key_subject(key_id: str) -> str:
    return f"key:{key_id}"


def tenant_subject(name: str) -> str:
    return f"tenant:{name}"


def window_of(limits: Limits, subject: str, now: float) -> tuple[str, int] | None:
    if limits.budget_tokens is None or limits.budget_window_s is None:
        return None
    w = limits.budget_window_s
    return subject, int(now // w) * w


class Reservation:
    """What one request holds until it settles."""

    def __init__(self, limiter: Limiter, subjects: list[Subject], session: tuple[str, str] | None,
                 tokens: int, now: float) -> None:  # fmt: skip
        self.limiter, self.subjects, self.session, self.tokens = limiter, subjects, session, tokens
        self.windows = [w for s in subjects if (w := window_of(s.limits, s.name, now)) is not None]
        self.settled = False

    def settle(self, tokens_used: int) -> None:
        """Release the reservation and count what the request really used (once; later calls do nothing)."""
        if self.settled:
            return
        self.settled = True
        lim, now = self.limiter, time.time()
        for s in self.subjects:
            st = lim.state(s.name)
            st.parallel -= 1
            st.reserved -= self.tokens
            st.tokens.add(now, tokens_used)
        for window in self.windows:
            b = lim.budgets
            b.reserved[window] = b.reserved.get(window, 0) - self.tokens
            if b.reserved[window] <= 0:
                del b.reserved[window]
            if tokens_used:
                b.pending[window] = b.pending.get(window, 0) + tokens_used
        if self.session is not None:
            sess = lim.sessions.get(self.session)
            if sess is not None:
                sess.reserved -= self.tokens
                sess.tokens += tokens_used


class Limiter:
    def __init__(self) -> None:
        self.states: dict[str, _State] = {}
        self.sessions: OrderedDict[tuple[str, str], _Session] = OrderedDict()
        self.budgets = Budgets()

    def state(self, name: str) -> _State:
        st = self.states.get(name)
        if st is None:
            st = self.states[name] = _State()
        return st

    def admit(self, subjects: list[Subject], tokens: int, session: tuple[str, str] | None = None,
              session_limits: Limits | None = None, tokens_in: int = 0) -> Reservation:  # fmt: skip
        """Check every limit, then reserve ``tokens`` on all of them; raise the 429 of the first limit hit.

        A token budget admits while its count, the reservations in flight and this request's input
        (``tokens_in``, estimated) stay under it: what may overshoot is one request's output.
        """
        now = time.time()
        for s in subjects:
            self._check(s, tokens_in, now)
        sess = None
        if (
            session is not None
            and session_limits is not None
            and (session_limits.session_requests is not None or session_limits.session_tokens is not None)
        ):
            sess = self.sessions.get(session)
            if sess is None:
                sess = self.sessions[session] = _Session()
                while len(self.sessions) > _MAX_SESSIONS:
                    self.sessions.popitem(last=False)
            self.sessions.move_to_end(session)
            cap = session_limits.session_requests
            if cap is not None and sess.requests >= cap:
                raise _quota(f"session {session[1]!r} has used its {cap} requests", "session_requests")
            cap = session_limits.session_tokens
            if cap is not None and sess.tokens + sess.reserved + tokens_in >= cap:
                raise _quota(f"session {session[1]!r} has used its {cap} tokens", "session_tokens")
        for s in subjects:
            st = self.state(s.name)
            st.parallel += 1
            st.requests.add(now, 1)
            st.reserved += tokens
        res = Reservation(self, subjects, session if sess is not None else None, tokens, now)
        for window in res.windows:
            self.budgets.reserved[window] = self.budgets.reserved.get(window, 0) + tokens
        if sess is not None:
            sess.requests += 1
            sess.reserved += tokens
        return res

    def _check(self, s: Subject, tokens_in: int, now: float) -> None:
        lim, st = s.limits, self.states.get(s.name) or _State()
        if lim.max_parallel is not None and st.parallel >= lim.max_parallel:
            raise _rate(f"{s.label} has {st.parallel} requests in flight, its limit", 1, "max_parallel")
        if lim.rpm is not None and st.requests.total(now) >= lim.rpm:
            raise _rate(f"{s.label} is over its limit of {lim.rpm} requests per minute",
                        st.requests.retry_after(now, lim.rpm), "rpm")  # fmt: skip
        if lim.tpm is not None and st.tokens.total(now) + st.reserved >= lim.tpm:
            raise _rate(f"{s.label} is over its limit of {lim.tpm} tokens per minute",
                        st.tokens.retry_after(now, lim.tpm, st.reserved), "tpm")  # fmt: skip
        window = window_of(lim, s.name, now)
        if window is not None and lim.budget_tokens is not None and \
                self.budgets.used(window) + tokens_in >= lim.budget_tokens:  # fmt: skip
            reset = window[1] + (lim.budget_window_s or 0) - now
            raise _quota(f"{s.label} has used its budget of {lim.budget_tokens} tokens for this window; it resets "
                         f"in {_human(reset)}", "budget", retry=max(1, math.ceil(reset)))  # fmt: skip

    def budget_left(self, subject: str, limits: Limits) -> int | None:
        window = window_of(limits, subject, time.time())
        if window is None or limits.budget_tokens is None:
            return None
        return max(0, limits.budget_tokens - self.budgets.used(window))


class LimitError(APIError):
    """A 429 that names the limit it came from (``limit``), for the audit and the metrics."""

    def __init__(self, *args, limit: str, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.limit = limit


def _rate(message: str, retry: int, limit: str) -> LimitError:
    return LimitError(429, message, "rate_limit_error", code="rate_limit_exceeded",
                      headers={"Retry-After": str(retry)}, limit=limit)  # fmt: skip


def _quota(message: str, limit: str, retry: int | None = None) -> LimitError:
    headers = {"Retry-After": str(retry)} if retry is not None else {}
    return LimitError(429, message, "insufficient_quota", code="insufficient_quota", headers=headers, limit=limit)


def _human(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 86400:
        return f"{seconds // 86400}d {seconds % 86400 // 3600}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    return f"{seconds // 60}m {seconds % 60}s"
