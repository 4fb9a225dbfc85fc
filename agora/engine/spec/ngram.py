"""Prompt lookup (vLLM's ``ngram``): find the latest earlier occurrence of the sequence's last
``n`` tokens (``n`` from ``prompt_lookup_max`` down to ``prompt_lookup_min``) and propose the
tokens that followed it. Vectorized over the history with numpy: a few tens of microseconds
for a context of thousands of tokens."""

from __future__ import annotations

import numpy as np

from agora.config import SpeculativeConfig
from agora.engine.spec.history import History


def lookup(tokens: np.ndarray, n_min: int, n_max: int, k: int) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier match of the last n tokens (longest n first)."""
    length = len(tokens)
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        pattern = tokens[length - n :]
        # Start i of a match with a continuation: tokens[i : i + n] == pattern, i + n < length.
        hits = tokens[: length - n] == pattern[0]
        for j in range(1, n):
            hits &= tokens[j : length - n + j] == pattern[j]
        starts = np.flatnonzero(hits)
        if starts.size:
            return continuation(tokens, int(starts[-1]) + n, k)
    return []


def continuation(tokens: np.ndarray, begin: int, k: int) -> list[int]:
    """``k`` tokens from ``begin`` on; where they run into the end of ``tokens`` the match overlaps the
    sequence's own tail (a repeating pattern), so the draft goes on repeating it with the same period."""
    draft = tokens[begin : begin + k].tolist()
    period = len(tokens) - begin
    while len(draft) < k:
        draft.append(draft[len(draft) - period])
    return draft


class NgramProposer:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.k = config.num_speculative_tokens
        self.n_min = config.prompt_lookup_min
        self.n_max = config.prompt_lookup_max
        self.histories: dict[str, History] = {}

    def propose(self, request_id: str, token_ids: list[int], max_tokens: int, salt: str | None = None) -> list[int]:
        k = min(self.k, max_tokens)  # type: ignore[type-var]
        if k <= 0:
            return []
        hist = self.histories.get(request_id)
        if hist is None:
            hist = self.histories[request_id] = History()
        return lookup(hist.sync(token_ids), self.n_min, self.n_max, k)  # type: ignore[arg-type]

    def finish(self, request_id: str, token_ids: list[int], num_prompt_tokens: int, salt: str | None = None) -> None:
        self.histories.pop(request_id, None)
