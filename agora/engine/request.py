"""One sequence being generated. Pure Python: the scheduler reasons over these."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from agora.engine.kv_cache import BlockHash
from agora.engine.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


@dataclass(eq=False)
class Request:
    """A sequence: prompt tokens, tokens generated so far, and how far the KV cache
    has caught up (``num_computed_tokens``). There is no prefill or decode phase:
    each step the scheduler grants it some number of tokens to compute."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    max_total_tokens: int = 2**31  # context length cap: prompt + output
    cache_salt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0  # under the priority scheduling policy: lower is served first (vLLM's)
    # structured.GrammarState of a constrained sequence. It advances only with sampled tokens, so it
    # needs nothing on chunked prefill, prefix-cache hits or preemption (outputs are kept and recomputed).
    grammar: Any = None

    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    block_hashes: list[BlockHash] = field(default_factory=list)
    # Speculative decoding: guesses of the next tokens, verified in the next step (granted as budget
    # after the one token that is due). Dropped on preemption; never part of all_token_ids until accepted.
    spec_token_ids: list[int] = field(default_factory=list)
    # With ``sampling_params.prompt_logprobs``: the logprobs of prompt tokens 1.. (the runner's TokenLogprobs), in
    # order. Until they are all in, the prompt is computed whole (no prefix-cache hit: a cached token has no logits).
    prompt_logprobs: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.sampling_params.prompt_logprobs is not None and \
            len(self.prompt_logprobs) < len(self.prompt_token_ids) - 1  # fmt: skip

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def budget(self) -> int:
        """Tokens this sequence may still produce (max_tokens and the context length both count)."""
        left = self.max_total_tokens - self.num_tokens
        if self.sampling_params.max_tokens is not None:
            left = min(left, self.sampling_params.max_tokens - self.num_output_tokens)
        return left

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_stop(self, latest: bool = True) -> RequestStatus | None:
        """Stop conditions that depend on tokens only (stop strings are checked by the
        detokenizer). Sets ``status``/``stop_reason`` and returns the new status.
        ``latest``: the token appended is the last the grammar took (not one of several
        accepted in one step, where the grammar's state is already past it)."""
        params = self.sampling_params
        last = self.output_token_ids[-1]
        if self.grammar is not None and latest and self.grammar.is_terminated:  # the grammar took a stop token
            self.status = RequestStatus.FINISHED_STOPPED
            self.stop_reason = None if last in self.eos_token_ids else last
            return self.status
        if self.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and last in self.eos_token_ids:
                self.status = RequestStatus.FINISHED_STOPPED
                self.stop_reason = None
                return self.status
            if last in params.stop_token_ids:
                self.status = RequestStatus.FINISHED_STOPPED
                self.stop_reason = last
                return self.status
        if (params.max_tokens is not None and self.num_output_tokens >= params.max_tokens) or (
            self.num_tokens >= self.max_total_tokens
        ):
            # A constrained output that is whole when the budget ends stopped, it was not cut off.
            whole = self.grammar is not None and self.grammar.is_completed
            self.status = RequestStatus.FINISHED_STOPPED if whole else RequestStatus.FINISHED_LENGTH
            return self.status
        return None
