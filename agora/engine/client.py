"""`EngineClient`: what the HTTP server needs of an engine, wherever the engine runs.

The server (agora.server) is written against this protocol only. `AsyncEngine` implements it
for an engine in the same process; `agora.cluster.client.RayEngineClient` implements it for an
engine in a Ray actor (the server keeps the tokenizer and chat templates, the actor the
weights and the KV cache).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from agora.engine.engine import EngineStats, RequestOutput
    from agora.engine.sampling import SamplingParams


@dataclass(frozen=True)
class ModelInfo:
    """The model an engine serves, as the API reports and checks it."""

    served_model_name: str
    model: str  # as configured: packaged name, HF folder or .gguf file
    max_model_len: int  # resolved against the model and the KV cache
    vocab_size: int
    tokenizer: Any  # agora.engine.tokenizer.Tokenizer, or None for a model loaded without one
    priority_scheduling: bool = False  # whether requests' priorities order them (else any priority but 0 is a 400)


class OutputStream(Protocol):
    """One submitted request's outputs; closing it early aborts the request."""

    def __aiter__(self) -> AsyncIterator[RequestOutput]: ...

    def close(self) -> None: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class EngineClient(Protocol):
    @property
    def model_info(self) -> ModelInfo: ...

    @property
    def stats(self) -> EngineStats:
        """The latest snapshot (cheap, never blocks): running, waiting, KV usage, counters."""
        ...

    @property
    def is_healthy(self) -> bool: ...

    async def compile(self, params: SamplingParams, timeout: float | None = None) -> Any:
        """The request's compiled constraint (None without structured outputs); ParamError if it cannot work."""
        ...

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               cache_salt: str | None = None, constraint: Any = None, priority: int = 0) -> OutputStream:  # fmt: skip
        """Queue a request: ParamError / ValueError for one that can never run (a ``priority`` other than 0
        without priority scheduling among them), QueueFullError at capacity, EngineDeadError when the engine
        is gone; all raised here, before any output."""
        ...

    def abort(self, request_id: str) -> None: ...

    def shutdown(self) -> None: ...
