"""AsyncEngine built from a factory (the engine lives in the step thread), and engine cache options."""

from __future__ import annotations

import threading

import pytest
import torch

from agora import SamplingParams
from agora.engine.async_engine import AsyncEngine


def test_a_failing_factory_raises_in_the_caller() -> None:
    def factory():  # noqa: ANN202
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        AsyncEngine(factory)


def test_the_factory_runs_in_the_engine_thread() -> None:
    seen: list[str] = []

    class Stub:
        def stats(self):  # noqa: ANN202
            seen.append(threading.current_thread().name)
            return None

        def has_unfinished_requests(self) -> bool:
            return False

    engine = AsyncEngine(Stub)  # type: ignore[arg-type]
    assert seen and set(seen) == {"agora-engine"}
    engine.shutdown()


def test_kv_cache_dtype_is_validated_and_sizes_the_cache(tiny_model_dir) -> None:
    from agora import LLM
    from agora.config import CacheConfig

    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        CacheConfig(kv_cache_dtype="fp8")
    budget = 1 << 20
    full = LLM(str(tiny_model_dir), dtype="float32", kv_cache_memory_bytes=budget)
    half = LLM(str(tiny_model_dir), dtype="float32", kv_cache_memory_bytes=budget, kv_cache_dtype="float16")
    assert half.engine.runner.kv_caches[0][0].dtype == torch.float16
    assert half.engine.num_blocks == 2 * full.engine.num_blocks
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    assert len(half.generate([[5, 6, 7, 8]], params)[0].outputs[0].token_ids) == 6
