"""The CPU KV cache: zero pages the OS maps as they are first touched, and a size the host cannot hold refused at start."""

from __future__ import annotations

import pytest
import torch

from agora import LLM, SamplingParams
from agora.engine import device as device_mod
from agora.engine.device import kv_cache_budget, zeroed
from agora.models.loader import available_memory_bytes


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_zeroed_is_zero_writable_and_aligned(dtype) -> None:
    t = zeroed((5, 16, 3, 64), dtype, torch.device("cpu"))
    assert t.shape == (5, 16, 3, 64) and t.dtype == dtype and t.is_contiguous()
    assert t.data_ptr() % 4096 == 0  # rows on cache lines
    assert not t.any()
    t[4, 15, 2, 63] = 3.0
    view = t.view(-1)
    assert view[-1].item() == 3.0 and view[:-1].eq(0).all()


@pytest.mark.skipif(available_memory_bytes() is None, reason="needs /proc/meminfo")
def test_zeroed_takes_memory_only_where_touched() -> None:
    before = _resident_bytes()
    t = zeroed((1024, 16, 8, 64), torch.float32, torch.device("cpu"))  # 32 MiB
    assert _resident_bytes() - before < 4 << 20  # nothing written yet
    t[:256].fill_(1.0)  # a quarter of it
    grew = _resident_bytes() - before
    assert 7 << 20 < grew < 12 << 20
    del t


def test_kv_budget_past_available_memory_is_refused(monkeypatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(device_mod, "available_memory_bytes", lambda: 3 << 30)
    assert kv_cache_budget(cpu, None, 0.9) == 2 << 30
    assert kv_cache_budget(cpu, 1 << 30, 0.9) == 1 << 30
    with pytest.raises(ValueError, match=r"a KV cache of 4.0 GiB does not fit the 3.0 GiB .*--kv-cache-memory"):
        kv_cache_budget(cpu, 4 << 30, 0.9)
    monkeypatch.setattr(device_mod, "available_memory_bytes", lambda: None)  # (not Linux: not checked)
    assert kv_cache_budget(cpu, 4 << 30, 0.9) == 4 << 30


def test_engine_on_untouched_cache_matches_a_written_one(tiny_model_dir) -> None:
    """Blocks never touched (zero pages) and blocks reused after other requests (stale values) give the same tokens
    (a 4-token prompt fills no whole block, so the second run takes no prefix-cache hit)."""
    llm = LLM(str(tiny_model_dir), dtype="float32", kv_cache_memory_bytes=1 << 20, speculative_config=None)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    fresh = llm.generate([[5, 6, 7, 8]], params)[0].outputs[0].token_ids
    llm.generate([[9 + i for i in range(40)] for _ in range(3)], params)  # other requests write the blocks
    assert llm.generate([[5, 6, 7, 8]], params)[0].outputs[0].token_ids == fresh
