"""SuffixDecoding (Oliaro et al., NeurIPS 2025) over token arrays instead of explicit trees.

A suffix tree answers two questions: how long is the longest earlier match of the context's
suffix, and which continuations followed it how often. Both are answered here directly on
the token array: the set of earlier positions matching the last ``n`` tokens shrinks as ``n``
grows (numpy, one comparison per level), and walking the tree's most frequent child is
counting the tokens that follow the surviving matches. Two corpora are searched:

- the request's own prompt and output (an agent rewriting a file it was shown, quoting a
  tool result, repeating its own earlier structure);
- a bounded corpus of recent outputs of finished requests (an agent's later turns, or other
  agents, producing the same shapes), with a separator between outputs; one corpus per
  prefix-cache salt (tenant), so no tenant's outputs draft, and time, another's.

The draft is the walk with the higher score (the sum of each draft token's path
probability: the expected number of accepted tokens). Its length adapts to the context: at
most ``max_spec_factor`` x the match length, and it stops where the path probability falls
under ``min_token_prob``; how each request's drafts have done trims it further, for every
method alike (``spec.policy``).
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque

import numpy as np

from agora.config import SpeculativeConfig
from agora.engine.spec.history import History
from agora.engine.spec.ngram import continuation

SEPARATOR = -1  # between outputs in the global corpus: never a continuation
GLOBAL_TOKENS = 1 << 16  # a corpus's size cap, in tokens (besides max_cached_requests)
MAX_CORPORA = 64  # corpora of recent outputs kept (one per salt), the least recently used dropped first
MIN_MATCH = 2  # a match shorter than this does not draft (one shared token predicts little)


def longest_match(corpus: np.ndarray, query: np.ndarray, max_depth: int) -> tuple[int, np.ndarray]:
    """The longest ``n <= max_depth`` such that ``query[-n:]`` occurs in ``corpus`` followed by at least one
    token, and the end offsets ``e`` of those occurrences (``corpus[e - n : e] == query[-n:]``, ``e < len``)."""
    size = len(corpus)
    if size < 2 or not len(query):
        return 0, np.empty(0, dtype=np.int64)
    ends = np.flatnonzero(corpus[: size - 1] == query[-1]) + 1
    if not ends.size:
        return 0, ends
    n = 1
    depth = min(max_depth, len(query))
    while n < depth:
        before = ends[ends > n]  # corpus[e - n - 1] exists
        before = before[corpus[before - n - 1] == query[-n - 1]]
        if not before.size:
            break
        ends = before
        n += 1
    return n, ends


def walk(corpus: np.ndarray, ends: np.ndarray, max_len: int, min_prob: float,
         own: bool = False) -> tuple[list[int], float]:  # fmt: skip
    """Follow the most frequent continuation of the matches at ``ends`` while its path probability stays
    at least ``min_prob``; returns the draft and its score (the sum of its tokens' path probabilities).
    ``own``: the corpus is the sequence itself, so a continuation that reaches its end repeats its tail."""
    size = len(corpus)
    draft: list[int] = []
    prob, score = 1.0, 0.0
    while len(draft) < max_len and ends.size:
        if ends.size == 1:  # one match left: its continuation, as far as it goes
            e = int(ends[0])
            if own:
                tail = continuation(corpus, e, max_len - len(draft))
            else:
                cut = corpus[e : e + max_len - len(draft)]
                stop = np.flatnonzero(cut == SEPARATOR)
                tail = (cut[: stop[0]] if stop.size else cut).tolist()
            draft.extend(tail)
            score += prob * len(tail)
            break
        following = corpus[ends]
        values, counts = np.unique(following, return_counts=True)
        best = int(counts.argmax())
        token = int(values[best])
        prob *= counts[best] / ends.size
        if token == SEPARATOR or prob < min_prob:
            break
        draft.append(token)
        score += prob
        ends = ends[following == token] + 1
        ends = ends[ends < size]
    return draft, score


class _Recent:
    """Outputs of finished requests, newest last, bounded in count and in tokens."""

    def __init__(self, max_requests: int) -> None:
        self.max_requests = max_requests
        self.outputs: deque[np.ndarray] = deque()
        self.tokens = 0
        self._corpus: np.ndarray | None = None

    def add(self, output: list[int]) -> None:
        arr = np.asarray(output[-GLOBAL_TOKENS:], dtype=np.int64)
        self.outputs.append(arr)
        self.tokens += len(arr) + 1
        while len(self.outputs) > self.max_requests or self.tokens > GLOBAL_TOKENS:
            self.tokens -= len(self.outputs.popleft()) + 1
        self._corpus = None

    def corpus(self) -> np.ndarray:
        if self._corpus is None:
            sep = np.array([SEPARATOR], dtype=np.int64)
            parts = [p for arr in self.outputs for p in (arr, sep)]
            self._corpus = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
        return self._corpus


class SuffixProposer:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.k = int(config.num_speculative_tokens)  # type: ignore[arg-type]
        self.depth = config.suffix_decoding_max_tree_depth
        self.factor = config.suffix_decoding_max_spec_factor
        self.min_prob = config.suffix_decoding_min_token_prob
        self.histories: dict[str, History] = {}
        self.max_cached_requests = config.suffix_decoding_max_cached_requests
        self.recent: OrderedDict[str | None, _Recent] = OrderedDict()  # salt -> its outputs, least recent first

    def _recent_of(self, salt: str | None) -> _Recent | None:
        recent = self.recent.get(salt)
        if recent is not None:
            self.recent.move_to_end(salt)
        return recent

    def propose(self, request_id: str, token_ids: list[int], max_tokens: int, salt: str | None = None) -> list[int]:
        if max_tokens <= 0:
            return []
        hist = self.histories.get(request_id)
        if hist is None:
            hist = self.histories[request_id] = History()
        tokens = hist.sync(token_ids)
        query = tokens[-self.depth :]
        best: tuple[list[int], float] = ([], 0.0)
        recent = self._recent_of(salt)
        corpora = [(True, tokens)] + ([(False, recent.corpus())] if recent is not None else [])
        for own, corpus in corpora:
            n, ends = longest_match(corpus, query, self.depth)
            if n < MIN_MATCH:
                continue
            limit = min(max_tokens, self.k, math.ceil(self.factor * n))
            draft = walk(corpus, ends, limit, self.min_prob, own)
            if draft[1] > best[1]:
                best = draft
        return best[0]

    def finish(self, request_id: str, token_ids: list[int], num_prompt_tokens: int, salt: str | None = None) -> None:
        self.histories.pop(request_id, None)
        output = token_ids[num_prompt_tokens:]
        if self.max_cached_requests == 0 or len(output) < 2:
            return  # nothing a draft could follow (and no other salt's corpus dropped to make room for it)
        recent = self.recent.pop(salt, None) or _Recent(self.max_cached_requests)
        self.recent[salt] = recent  # the most recently used last
        while len(self.recent) > MAX_CORPORA:
            self.recent.popitem(last=False)
        recent.add(output)
