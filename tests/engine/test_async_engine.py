"""AsyncEngine built from a factory: the engine lives in the step thread."""

from __future__ import annotations

import threading

import pytest

from agora.engine.async_engine import AsyncEngine


def test_a_failing_factory_raises_in_the_caller() -> None:
    def factory():  # noqa: ANN202
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        AsyncEngine(factory)


def test_the_factory_runs_in_the_engine_thread() -> None:
    seen: list[str] = []

    class Stub:
        grammars = None

        def stats(self):  # noqa: ANN202
            seen.append(threading.current_thread().name)
            return None

        def has_unfinished_requests(self) -> bool:
            return False

    engine = AsyncEngine(Stub)  # type: ignore[arg-type]
    assert seen and set(seen) == {"agora-engine"}
    engine.shutdown()
