"""Continuous batching under a token budget. Pure Python over integers.

Each step hands out ``{request_id: n_tokens}``: a long prompt gets a chunk (chunked
prefill), a generating request gets 1 (plus its draft tokens under speculative
decoding: they are budget like any other token), a prefix-cache hit simply starts
with more tokens already computed. When KV blocks run out, the most recently admitted running
request is preempted: its blocks are freed and it is recomputed later from its
prompt plus what it generated so far (nothing is lost, and its freed blocks stay
in the prefix cache, so recomputing is often cheap).

Under the ``priority`` policy (vLLM's) the waiting and running requests are kept in order of
(priority, arrival): the most urgent are admitted and granted budget first, and the request
preempted is the least urgent (the latest of the lowest priority), which goes back to its
place in the waiting queue. Under ``fcfs`` that order is arrival (admission, for the running).
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from agora.config import SchedulerConfig
from agora.engine.kv_cache import ComputedBlocks, KVCacheManager
from agora.engine.request import Request, RequestStatus

__all__ = ["ScheduledRequest", "Scheduler", "SchedulerConfig", "SchedulerOutput"]


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    num_tokens: int  # tokens to compute this step, starting at request.num_computed_tokens (drafts included)
    block_ids: list[int]
    draft_token_ids: list[int] = field(default_factory=list)  # the last len(...) of num_tokens

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the known tokens (so a token is sampled)."""
        return self.request.num_computed_tokens + self.num_tokens - len(self.draft_token_ids) == self.request.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def num_scheduled_tokens(self) -> dict[str, int]:
        return {s.request.request_id: s.num_tokens for s in self.scheduled}

    @property
    def total_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


def _urgency(request: Request) -> tuple[int, float]:
    """The priority policy's order: priority (lower first), then arrival."""
    return request.priority, request.arrival_time


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager) -> None:
        self.config = config
        self.kv = kv_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.by_priority = config.scheduling_policy == "priority"

    # -- queue management -------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        if self.by_priority:
            self._insert(self.waiting, request)
        else:
            self.waiting.append(request)

    @staticmethod
    def _insert(queue: deque[Request] | list[Request], request: Request) -> None:
        """Into ``queue`` (kept in (priority, arrival) order) after every request at least as urgent."""
        key = _urgency(request)
        queue.insert(bisect.bisect_right(queue, key, key=_urgency), request)  # type: ignore[arg-type]

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """Remove requests (finished or aborted) and free their blocks. Unknown ids are ignored."""
        done = []
        for rid in request_ids:
            request = self.requests.pop(rid, None)
            if request is None:
                continue
            if request in self.running:
                self.running.remove(request)
            elif request in self.waiting:
                self.waiting.remove(request)
            request.status = status
            self.kv.free(rid)
            done.append(request)
        return done

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- the step ------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        granted: dict[str, int] = {}

        drafts: dict[str, list[int]] = {}

        # 1. Running requests first, in admission order (priority order, under that policy).
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            due = request.num_tokens - request.num_computed_tokens
            num_new = min(due, budget)
            if num_new <= 0:
                i += 1
                continue
            spec = request.spec_token_ids[: budget - due] if due == 1 else []
            if spec and self.kv.allocate(request, due + len(spec)) is not None:
                granted[request.request_id] = due + len(spec)
                drafts[request.request_id] = spec
                budget -= due + len(spec)
                i += 1
                continue
            # No room for the drafts: the due token alone (preempting if even that does not fit).
            while self.kv.allocate(request, num_new) is None:
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted_ids.append(victim.request_id)
                if victim is request:
                    break
            else:
                granted[request.request_id] = num_new
                budget -= num_new
                i += 1
                continue
            break  # the current request preempted itself: nothing more fits

        # 2. Admit waiting requests while there is room (not in a step that preempted).
        while self.waiting and budget > 0 and not out.preempted_ids and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            # prompt logprobs need every prompt token's logits: such a prompt takes no prefix-cache hit
            computed = ComputedBlocks() if request.wants_prompt_logprobs else self.kv.computed_blocks(request)
            num_new = min(request.num_tokens - computed.num_tokens, budget)
            if self.kv.allocate(request, num_new, computed) is None:
                break
            self.waiting.popleft()
            request.num_computed_tokens = computed.num_tokens
            if request.num_preemptions == 0:
                request.num_cached_tokens = computed.num_tokens
            request.status = RequestStatus.RUNNING
            if self.by_priority:
                self._insert(self.running, request)
            else:
                self.running.append(request)
            granted[request.request_id] = num_new
            budget -= num_new

        for request in self.running:
            n = granted.get(request.request_id)
            if n:
                ids = self.kv.block_ids(request.request_id)
                out.scheduled.append(ScheduledRequest(request, n, ids, drafts.get(request.request_id, [])))
        if not self.requests:
            self.kv.check_integrity()
        return out

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request.request_id)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.num_preemptions += 1
        self.num_preemptions += 1
        if self.by_priority:
            self._insert(self.waiting, request)
        else:
            self.waiting.appendleft(request)

    def update(self, out: SchedulerOutput, sampled: dict[str, list[int]]) -> list[tuple[Request, int]]:
        """Advance ``num_computed_tokens`` and append sampled tokens (one, or under speculative decoding
        the accepted drafts plus one: ``sampled[rid][:-1]`` equal the step's first drafts).

        Returns each request that received tokens this step with how many it kept (fewer than sampled
        when a stop condition is met on the way); the ones stopped are finished (and freed) here. The
        KV blocks that only rejected drafts reached are given back.
        """
        updated = []
        finished_ids = []
        for s in out.scheduled:
            request = s.request
            if request.is_finished or request.request_id not in self.requests:
                continue  # aborted while the step ran
            tokens = sampled.get(request.request_id)
            request.spec_token_ids = []
            if not tokens:  # a prompt chunk that does not reach the end (drafts always sample)
                request.num_computed_tokens += s.num_tokens - len(s.draft_token_ids)
                continue
            # The due tokens were computed, and so were the drafts that were accepted (all but the last token).
            request.num_computed_tokens += s.num_tokens - len(s.draft_token_ids) + len(tokens) - 1
            kept = 0
            status = None
            for token in tokens:
                request.append_output_token(token)
                kept += 1
                status = request.check_stop(latest=kept == len(tokens))
                if status is not None:
                    break
            updated.append((request, kept))
            if len(tokens) > 1:  # accepted drafts: the blocks they filled are cacheable now
                self.kv.cache_computed(request, request.num_computed_tokens)
            if status is not None:
                finished_ids.append((request.request_id, status))
            elif s.draft_token_ids:
                self.kv.rollback(request.request_id, request.num_tokens)
        for rid, status in finished_ids:
            self.finish_requests([rid], status)
        return updated
