"""Async front of the engine: a background step loop and one stream per request.

The engine runs in its own thread (torch releases the GIL inside its kernels, so
the event loop stays responsive). The event loop never touches the engine
directly: it posts commands (add, abort) to an inbox that the engine thread
drains before each step, and receives outputs through per-request asyncio
queues, fed with one ``call_soon_threadsafe`` per step.

Give it a factory (``AsyncEngine(lambda: Engine(config))``) and the engine is also
built in that thread. On CPU this matters: libgomp throttles its spin-waiting as soon
as more OpenMP threads exist than cores, so if the main thread had run parallel
torch ops (loading the model) its idle worker counts against the engine thread's
team, whose workers then sleep between the hundreds of parallel regions of a step.
Measured on 2 cores: SmolLM2 single-stream decode steps take 74 ms when the model
is loaded in the main thread and 39 ms when it is loaded in the engine thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from agora.engine.client import ModelInfo
from agora.engine.engine import Engine, EngineStats, RequestOutput
from agora.engine.sampling import ParamError, SamplingParams
from agora.engine.structured import Constraint, GrammarError

logger = logging.getLogger(__name__)


class QueueFullError(Exception):
    """The waiting queue is at its bound; the client should retry later."""


class EngineDeadError(Exception):
    """The engine thread failed or was shut down."""


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: str | None
    constraint: Constraint | None
    priority: int = 0


@dataclass
class _Abort:
    request_id: str


class AsyncEngine:
    """The in-process `EngineClient` (agora.engine.client)."""

    def __init__(self, engine: Engine | Callable[[], Engine], max_waiting_requests: int = 256) -> None:
        self.max_waiting_requests = max_waiting_requests
        self._inbox: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._pending_adds = 0  # adds posted but not yet taken by the engine thread
        self._pending_lock = threading.Lock()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._error: BaseException | None = None
        built = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self.engine = engine() if callable(engine) and not isinstance(engine, Engine) else engine
                self._stats = self.engine.stats()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the constructing thread
                failure.append(exc)
                return
            finally:
                built.set()
            self._run()

        self._thread = threading.Thread(target=run, name="agora-engine", daemon=True)
        self._thread.start()
        built.wait()
        if failure:
            raise failure[0]

    # -- event-loop side -------------------------------------------------------

    @property
    def model_info(self) -> ModelInfo:
        e = self.engine
        return ModelInfo(e.served_model_name, e.config.model.model, e.max_model_len, e.vocab_size, e.tokenizer,
                         e.priority_scheduling)  # fmt: skip

    @property
    def stats(self) -> EngineStats:
        """Snapshot taken after the last step (cheap, never blocks)."""
        return self._stats

    @property
    def is_healthy(self) -> bool:
        return self._thread.is_alive() and self._error is None

    async def compile(self, params: SamplingParams, timeout: float | None = None) -> Constraint | None:
        """The compiled ``params.structured_outputs`` (None without one), from the cache or a worker
        thread: the step loop never waits for it. ParamError for a constraint that cannot work or
        that takes longer than ``timeout`` (default: the engine's ``compile_timeout_s``) to compile."""
        spec = params.structured_outputs
        if spec is None:
            return None
        grammars = self.engine.grammars
        if grammars is None:
            raise ParamError("structured_outputs", "structured outputs need a tokenizer, and this model has none")
        limit = grammars.config.compile_timeout_s if timeout is None else timeout
        try:
            return await asyncio.wait_for(asyncio.wrap_future(grammars.compile(spec)), limit)
        except GrammarError as exc:
            raise ParamError("structured_outputs", str(exc)) from None
        except TimeoutError:
            raise ParamError("structured_outputs", f"the constraint took longer than {limit:g} s to compile; "
                                                   "simplify it") from None  # fmt: skip

    def submit(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
        constraint: Constraint | None = None,
        priority: int = 0,
    ) -> RequestStream:
        """Queue a request and return its stream; errors are raised here, before any
        output: ValueError for a request that can never run, QueueFullError when the
        waiting queue is full, EngineDeadError if the engine stopped. A request with
        ``structured_outputs`` needs its ``constraint`` (from :meth:`compile`)."""
        if params.structured_outputs is not None and constraint is None:
            raise ValueError("compile the request's structured_outputs first (AsyncEngine.compile)")
        if not self.is_healthy:
            raise EngineDeadError("the engine is not running")
        if request_id in self._streams:
            raise ValueError(f"duplicate request id {request_id!r}")
        self.engine.validate(prompt_token_ids, params)
        self.engine.check_priority(priority)
        with self._pending_lock:
            if self._stats.num_waiting + self._pending_adds >= self.max_waiting_requests:
                raise QueueFullError(
                    f"the server is at capacity ({self.max_waiting_requests} requests waiting); retry later"
                )
            self._pending_adds += 1
        stream = RequestStream(self, request_id, params.n)
        self._streams[request_id] = (asyncio.get_running_loop(), stream.queue)
        self._inbox.put(_Add(request_id, prompt_token_ids, params, cache_salt, constraint, priority))
        return stream

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Compile, submit and stream in one call (closing the iterator early aborts)."""
        constraint = await self.compile(params)
        stream = self.submit(request_id, prompt_token_ids, params, cache_salt, constraint)
        try:
            async for out in stream:
                yield out
        finally:
            await stream.aclose()

    def _close_stream(self, request_id: str, finished: bool) -> None:
        self._streams.pop(request_id, None)
        if not finished:
            self._inbox.put(_Abort(request_id))

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopped = True
        self._inbox.put(None)
        self._thread.join(timeout)
        if self.engine.grammars is not None:
            self.engine.grammars.shutdown()

    # -- engine-thread side --------------------------------------------------------

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        entry = self._streams.get(request_id)
        if entry is not None:
            loop, stream = entry
            loop.call_soon_threadsafe(stream.put_nowait, item)

    def _drain(self, block: bool) -> None:
        while True:
            try:
                cmd = self._inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if cmd is None:
                self._stopped = True
                return
            if isinstance(cmd, _Add):
                with self._pending_lock:
                    self._pending_adds -= 1
                if cmd.request_id not in self._streams:
                    continue  # the client left before the engine saw it
                try:
                    self.engine.add_request(cmd.request_id, cmd.prompt_token_ids, cmd.params, cmd.cache_salt,
                                            cmd.constraint, cmd.priority)  # fmt: skip
                except Exception as exc:  # noqa: BLE001 - surfaced to the client
                    self._deliver(cmd.request_id, exc)
            else:
                self.engine.abort_request(cmd.request_id)

    def _run(self) -> None:
        while not self._stopped:
            self._drain(block=not self.engine.has_unfinished_requests())
            if self._stopped:
                break
            if not self.engine.has_unfinished_requests():
                self._stats = self.engine.stats()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # noqa: BLE001
                logger.exception("engine step failed; failing the requests in flight")
                for rid in list(self.engine.children):
                    self.engine.abort_request(rid)
                    self._deliver(rid, EngineDeadError(f"engine step failed: {exc}"))
                self._stats = self.engine.stats()
                continue
            self._stats = self.engine.stats()
            by_stream: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
            for out in outputs:
                entry = self._streams.get(out.request_id)
                if entry is None:
                    continue
                by_stream.setdefault(entry[0], []).append((entry[1], out))
            for loop, items in by_stream.items():
                loop.call_soon_threadsafe(_put_all, items)
        for rid in list(self._streams):
            self._deliver(rid, EngineDeadError("the server is shutting down; retry the request"))


class RequestStream:
    """Outputs of one submitted request. ``aclose()`` (always call it) aborts the
    request in the engine if it has not finished, freeing its KV blocks."""

    def __init__(self, owner: AsyncEngine, request_id: str, n: int) -> None:
        self.owner = owner
        self.request_id = request_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.remaining = n
        self.closed = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.remaining == 0 or self.closed:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.remaining = 0
            raise item
        if item.finished:
            self.remaining -= 1
        return item

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.owner._close_stream(self.request_id, finished=self.remaining == 0)

    async def aclose(self) -> None:
        self.close()


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for stream, out in items:
        stream.put_nowait(out)
