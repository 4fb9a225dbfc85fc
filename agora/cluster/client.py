"""`RayEngineClient`: the `EngineClient` of an engine that lives in a Ray actor.

The HTTP server (agora.server) runs where the client is and keeps the tokenizer and chat
templates; the `EngineActor` holds the weights and the KV cache, on whichever node Ray placed
it (a GPU node, say). Outputs come back through Ray's own channel as a streaming generator.

What the protocol promises at ``submit`` (a request that can never run, a full queue, a dead
engine are refused before any output) is checked here against the model's limits and the
last stats snapshot, so the server answers them as the in-process engine's 400/429/503.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import ray

from agora.config import EngineConfig, from_dict, to_dict
from agora.engine.async_engine import EngineDeadError, QueueFullError
from agora.engine.client import ModelInfo
from agora.engine.engine import EngineStats, RequestOutput, check_priority, check_request, tokenize_bad_words
from agora.engine.sampling import ParamError, SamplingParams

_STATS_EVERY_S = 0.2


@ray.remote
class EngineActor:
    """An `AsyncEngine` in a Ray actor, built from a serialized `EngineConfig`."""

    def __init__(self, config: dict) -> None:
        from agora.engine.async_engine import AsyncEngine
        from agora.engine.engine import Engine

        engine_config = from_dict(EngineConfig, config)
        self.engine = AsyncEngine(lambda: Engine(engine_config), engine_config.max_waiting_requests)

    def model_info(self) -> dict:
        e = self.engine.engine
        return {"served_model_name": e.served_model_name, "model": e.config.model.model,
                "max_model_len": e.max_model_len, "vocab_size": e.vocab_size, "has_grammars": e.grammars is not None,
                "max_waiting_requests": self.engine.max_waiting_requests,
                "priority_scheduling": e.priority_scheduling}  # fmt: skip

    def stats(self) -> tuple[EngineStats, bool]:
        return self.engine.stats, self.engine.is_healthy

    async def check_constraint(self, params: SamplingParams) -> None:
        await self.engine.compile(params)  # compiled here and cached: generate() finds it at once

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       cache_salt: str | None, priority: int = 0) -> AsyncIterator[RequestOutput]:  # fmt: skip
        constraint = await self.engine.compile(params)
        stream = self.engine.submit(request_id, prompt_token_ids, params, cache_salt, constraint, priority)
        try:
            async for out in stream:
                yield out
        finally:
            await stream.aclose()  # the client left early: the request is aborted

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def shutdown(self) -> None:
        self.engine.shutdown()


def _unwrap(exc: BaseException) -> BaseException:
    """The engine's own error out of Ray's wrapping (ParamError, QueueFullError...); a dead actor is a dead engine."""
    if isinstance(exc, ray.exceptions.ActorDiedError | ray.exceptions.ActorUnavailableError):
        return EngineDeadError(f"the engine actor is gone: {exc}")
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause
        if isinstance(cause, ParamError | ValueError | QueueFullError | EngineDeadError):
            return cause
    return exc


class _RemoteStream:
    def __init__(self, client: RayEngineClient, request_id: str, gen: Any) -> None:
        self.client, self.request_id, self.gen = client, request_id, gen
        self.done = False

    def __aiter__(self) -> _RemoteStream:
        return self

    async def __anext__(self) -> RequestOutput:
        try:
            ref = await self.gen.__anext__()
            return await ref
        except StopAsyncIteration:
            self.done = True
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised as the engine's own error
            self.done = True
            raise _unwrap(exc) from None

    def close(self) -> None:
        if not self.done:
            self.done = True
            self.client.abort(self.request_id)

    async def aclose(self) -> None:
        self.close()


class RayEngineClient:
    """`EngineClient` over an `EngineActor` (agora.engine.client). ``owns``: shutdown also ends the actor."""

    def __init__(self, actor: Any, owns: bool = False) -> None:
        from agora.engine.tokenizer import Tokenizer
        from agora.models.catalog import resolve_model
        from agora.models.loader import inspect_model

        self.actor, self.owns = actor, owns
        meta = ray.get(actor.model_info.remote())
        files = inspect_model(resolve_model(meta["model"])[0])  # the tokenizer, read where the server runs
        tokenizer = Tokenizer(files.tokenizer_dir, files.eos_token_ids) if files.tokenizer_dir else None
        self._info = ModelInfo(meta["served_model_name"], meta["model"], meta["max_model_len"], meta["vocab_size"],
                               tokenizer, meta.get("priority_scheduling", False))  # fmt: skip
        self._has_grammars = meta["has_grammars"]
        self.max_waiting_requests = meta["max_waiting_requests"]
        self._stats, self._healthy = ray.get(actor.stats.remote())
        self._pending = 0  # submitted since the last snapshot
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="agora-engine-stats", daemon=True)
        self._poller.start()

    @classmethod
    def start(cls, config: EngineConfig, **actor_options: Any) -> RayEngineClient:
        """A new engine actor (``num_cpus``, ``num_gpus``, ... as Ray's options) and its client."""
        actor = EngineActor.options(**actor_options).remote(to_dict(config))
        return cls(actor, owns=True)

    def _poll(self) -> None:
        while not self._stop.wait(_STATS_EVERY_S):
            try:
                self._stats, self._healthy = ray.get(self.actor.stats.remote(), timeout=5)
                self._pending = 0
            except Exception:  # noqa: BLE001 - the actor died or does not answer: not healthy
                self._healthy = False

    # -- EngineClient -----------------------------------------------------------------------

    @property
    def model_info(self) -> ModelInfo:
        return self._info

    @property
    def stats(self) -> EngineStats:
        return self._stats

    @property
    def is_healthy(self) -> bool:
        return self._healthy and not self._stop.is_set()

    async def compile(self, params: SamplingParams, timeout: float | None = None) -> Any:
        if params.structured_outputs is None:
            return None
        try:
            await asyncio.wait_for(self.actor.check_constraint.remote(params), timeout)
        except Exception as exc:  # noqa: BLE001 - its ParamError names the parameter
            raise _unwrap(exc) from None
        return None  # the constraint stays with the actor, which compiled (and cached) it

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               cache_salt: str | None = None, constraint: Any = None, priority: int = 0) -> _RemoteStream:  # fmt: skip
        if not self.is_healthy:
            raise EngineDeadError("the engine actor is not running")
        tokenize_bad_words(self._info.tokenizer, params)
        check_request(self._info.vocab_size, self._info.max_model_len, self._has_grammars, prompt_token_ids, params)
        check_priority(self._info.priority_scheduling, priority)
        if self._stats.num_waiting + self._pending >= self.max_waiting_requests:
            raise QueueFullError(f"the server is at capacity ({self.max_waiting_requests} requests waiting); "
                                 "retry later")  # fmt: skip
        self._pending += 1
        gen = self.actor.generate.options(num_returns="streaming").remote(request_id, prompt_token_ids,
                                                                          params, cache_salt, priority)  # fmt: skip
        return _RemoteStream(self, request_id, gen)

    def abort(self, request_id: str) -> None:
        self.actor.abort.remote(request_id)

    def shutdown(self) -> None:
        self._stop.set()
        if self.owns:
            try:
                ray.get(self.actor.shutdown.remote(), timeout=30)
            finally:
                ray.kill(self.actor)
