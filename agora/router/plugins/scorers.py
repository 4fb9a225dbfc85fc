"""Scorers: each returns 0..1 per endpoint."""

from __future__ import annotations

from collections import OrderedDict
from functools import cached_property
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from agora.router.endpoints import Endpoint
from agora.router.plugins.base import Scorer
from agora.router.request import RequestInfo


class PrefixIndex:
    """Per endpoint, a bounded LRU set of the chained prompt-block hashes sent there.

    Chained hashes mean block i's hash stands for the whole prefix up to block i, so
    the match length is the number of leading hashes present. A prompt's hashes are
    inserted last-block-first, which leaves its leading blocks the most recently used:
    like an engine's prefix cache, the index forgets the tails of old prompts first.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._sets: dict[str, OrderedDict[int, None]] = {}

    def match(self, endpoint: str, hashes: list[int]) -> int:
        seen = self._sets.get(endpoint)
        if not seen:
            return 0
        n = 0
        for h in hashes:
            if h not in seen:
                break
            n += 1
        return n

    def insert(self, endpoint: str, hashes: list[int]) -> None:
        seen = self._sets.setdefault(endpoint, OrderedDict())
        for h in reversed(hashes):
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.capacity:
            seen.popitem(last=False)

    def forget(self, endpoint: str) -> None:
        self._sets.pop(endpoint, None)

    def remove(self, endpoint: str, hashes: list[int]) -> None:
        seen = self._sets.get(endpoint)
        for h in hashes if seen is not None else ():
            seen.pop(h, None)

    def size(self, endpoint: str) -> int:
        return len(self._sets.get(endpoint, ()))


class PrefixCacheScorer(Scorer):
    """Prefix-cache affinity: the fraction of the prompt's leading blocks an endpoint probably holds.

    Blocks are ``block_chars`` characters of the prompt text (or ``block_tokens``
    tokens when a ``tokenizer`` file is configured, or when the client sent token ids).
    Only whole blocks count, as in the engine's cache.
    """

    type_name = "prefix-cache-scorer"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        block_chars: int = Field(64, ge=4, le=65536, description="characters per block without a tokenizer")
        block_tokens: int = Field(16, ge=1, le=4096, description="tokens per block with a tokenizer")
        tokenizer: str | None = Field(None, description="path to a tokenizer.json (tokenizers library)")
        lru_blocks: int = Field(65536, ge=1, description="block hashes remembered per endpoint")
        max_blocks: int = Field(4096, ge=1, description="leading blocks of a prompt considered")

    def __init__(self, name: str, params: BaseModel | None = None) -> None:
        super().__init__(name, params)
        self.index = PrefixIndex(self.params.lru_blocks)

    @cached_property
    def _tokenizer(self) -> Any:
        if self.params.tokenizer is None:
            return None
        from tokenizers import Tokenizer

        return Tokenizer.from_file(self.params.tokenizer)

    def block_hashes(self, req: RequestInfo) -> list[int]:
        cached = req.notes.get(self.name)
        if cached is not None:
            return cached
        p = self.params
        hashes: list[int] = []
        h = hash(req.model)
        if req.prompt_tokens is not None or self._tokenizer is not None:
            ids = req.prompt_tokens
            if ids is None:
                ids = self._tokenizer.encode(req.prompt_text, add_special_tokens=False).ids
            size, seq = p.block_tokens, ids
            for start in range(0, min(len(seq) // size, p.max_blocks) * size, size):
                h = hash((h, tuple(seq[start : start + size])))
                hashes.append(h)
        else:
            size, text = p.block_chars, req.prompt_text
            for start in range(0, min(len(text) // size, p.max_blocks) * size, size):
                h = hash((h, text[start : start + size]))
                hashes.append(h)
        req.notes[self.name] = hashes
        return hashes

    def score(self, req: RequestInfo, endpoints: list[Endpoint]) -> list[float]:
        hashes = self.block_hashes(req)
        if not hashes:
            return [0.0] * len(endpoints)
        return [self.index.match(ep.name, hashes) / len(hashes) for ep in endpoints]

    def on_pick(self, req: RequestInfo, endpoint: Endpoint) -> None:
        hashes = self.block_hashes(req)
        if hashes:
            matched = self.index.match(endpoint.name, hashes)
            req.notes["prefix_blocks"] = (matched, len(hashes))
            req.notes["prefix_new"] = (endpoint.name, hashes[matched:])
            self.index.insert(endpoint.name, hashes)

    def on_done(self, req: RequestInfo, endpoint: Endpoint, status: int) -> None:
        # Refused by the endpoint (a 4xx of its own): the prompt never reached its cache, so the blocks
        # this request added there are forgotten, and the next one is not sent there for them.
        new = req.notes.get("prefix_new")
        if new is not None and new[0] == endpoint.name and 400 <= status < 500 and status != 499:
            self.index.remove(endpoint.name, new[1])

    def on_eject(self, endpoint: Endpoint) -> None:
        self.index.forget(endpoint.name)  # it may come back restarted, with an empty cache


class SessionAffinityScorer(Scorer):
    """1 for the endpoint this session went to last, while it is a candidate and not overloaded.

    The session is the ``x-session-id`` header (configurable), else the request's
    ``user`` field when ``use_user_field`` is on.
    """

    type_name = "session-affinity-scorer"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        max_load: int = Field(64, ge=1, description="beyond this many requests the endpoint is overloaded")
        max_sessions: int = Field(100_000, ge=1)

    def __init__(self, name: str, params: BaseModel | None = None) -> None:
        super().__init__(name, params)
        self.sessions: OrderedDict[str, str] = OrderedDict()

    def score(self, req: RequestInfo, endpoints: list[Endpoint]) -> list[float]:
        target = self.sessions.get(req.session) if req.session else None
        return [1.0 if ep.name == target and ep.load < self.params.max_load else 0.0 for ep in endpoints]

    def on_pick(self, req: RequestInfo, endpoint: Endpoint) -> None:
        if req.session:
            self.sessions[req.session] = endpoint.name
            self.sessions.move_to_end(req.session)
            if len(self.sessions) > self.params.max_sessions:
                self.sessions.popitem(last=False)

    def on_eject(self, endpoint: Endpoint) -> None:
        for key in [k for k, v in self.sessions.items() if v == endpoint.name]:
            del self.sessions[key]


class InFlightScorer(Scorer):
    """Fewer requests in flight is better: 1 - load / the busiest candidate's load.

    Relative, so it ranks endpoints whatever their batch sizes: the least loaded
    scores most, the busiest 0, all idle endpoints 1. Load is the larger of what the
    gateway has sent and not yet seen finish, and what the endpoint reports running
    and waiting (other clients may use it directly).
    """

    type_name = "in-flight-scorer"

    def score(self, req: RequestInfo, endpoints: list[Endpoint]) -> list[float]:
        loads = [ep.load for ep in endpoints]
        busiest = max(loads, default=0)
        return [1.0 - load / busiest if busiest else 1.0 for load in loads]


class QueueScorer(Scorer):
    """Requests waiting in the endpoint's queue (scraped): 1 when none, 0 at ``threshold``."""

    type_name = "queue-scorer"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        threshold: int = Field(8, ge=1)

    def score(self, req: RequestInfo, endpoints: list[Endpoint]) -> list[float]:
        t = self.params.threshold
        return [1.0 - min(ep.waiting, t) / t for ep in endpoints]


class KVCacheScorer(Scorer):
    """Free KV cache (scraped): 1 - usage. Endpoints without metrics score 1."""

    type_name = "kv-cache-scorer"

    def score(self, req: RequestInfo, endpoints: list[Endpoint]) -> list[float]:
        return [1.0 - min(max(ep.kv_usage, 0.0), 1.0) for ep in endpoints]
