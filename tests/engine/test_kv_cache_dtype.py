"""--kv-cache-dtype: validated, and it sizes and types the cache."""

from __future__ import annotations

import pytest
import torch

from agora import LLM, SamplingParams
from agora.config import CacheConfig


def test_kv_cache_dtype_is_validated_and_sizes_the_cache(tiny_model_dir) -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        CacheConfig(kv_cache_dtype="fp8")
    budget = 1 << 20
    full = LLM(str(tiny_model_dir), dtype="float32", kv_cache_memory_bytes=budget)
    half = LLM(str(tiny_model_dir), dtype="float32", kv_cache_memory_bytes=budget, kv_cache_dtype="float16")
    assert half.engine.runner.kv_caches[0][0].dtype == torch.float16
    assert half.engine.num_blocks == 2 * full.engine.num_blocks
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    assert len(half.generate([[5, 6, 7, 8]], params)[0].outputs[0].token_ids) == 6
