"""The padded steps that CUDA graphs replay, decode and verification, run on the CPU.

A graph step gives every request the same number of query rows (its due token, its drafts, then
padding at its last position) and the batch the same number of requests (padding at position 0),
with masks built from the positions inside the step. ``CudaGraphDecoder(capture=False)`` runs those
very steps eagerly, so the CPU checks what a GPU would replay: the staging of ids, positions, slots
and block tables, the padding that must touch no one's KV, and which rows are sampled. Both sides
use the portable attention (gathered blocks, SDPA), the path CUDA takes. The captured graphs
themselves are checked in tests/models/test_cuda.py, where there is a GPU.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from agora import LLM, SamplingParams
from agora.engine.cuda_graphs import QUERY_BUCKETS, CudaGraphDecoder
from agora.engine.request import Request
from agora.engine.scheduler import ScheduledRequest, SchedulerOutput
from tests.conftest import build_tiny_model
from tests.engine.test_spec_decode import NGRAM, SUFFIX, _greedy, _repetitive_prompts, _untimed
from tests.models.test_parity import TINY_VARIANTS


def _portable(llm: LLM, graphs: bool) -> LLM:
    """Attention through gathered blocks and SDPA, as on a GPU; with ``graphs`` the graph steps, uncaptured."""
    runner = llm.engine.runner
    runner.attention.paged_kernels = False
    if graphs:
        num_blocks = runner.kv_caches[0][0].shape[0] - 1  # the last one is the scratch block
        runner.graphs = CudaGraphDecoder(
            runner.model, runner.attention, runner.block_size, max_batch=64, max_blocks_per_seq=512,
            scratch_slot=num_blocks * runner.block_size, device=torch.device("cpu"), capture=False,
        )  # fmt: skip
    return llm


@pytest.fixture(scope="module", params=["llama", "gemma3-local-global"])
def model_and_reference(request, tiny_model_dir, tmp_path_factory):
    if request.param == "llama":
        path = tiny_model_dir
    else:
        model_type, overrides = TINY_VARIANTS[request.param]
        path = build_tiny_model(tmp_path_factory.mktemp("gemma3"), 320, model_type, **overrides)
    llm = _portable(LLM(str(path), dtype="float32", num_blocks=256, block_size=4, speculative_config=None), False)
    prompts = _repetitive_prompts(llm.engine.vocab_size)
    return path, prompts, _greedy(llm, prompts)


@pytest.mark.parametrize("spec", [None, NGRAM, SUFFIX], ids=["decode", "ngram", "suffix"])
@pytest.mark.parametrize(
    "options",
    [
        {"num_blocks": 256},
        {"num_blocks": 256, "max_num_batched_tokens": 3},  # prompt chunks of 1 token beside decode steps
        {"num_blocks": 40, "max_num_batched_tokens": 64},  # preemption
    ],
    ids=["batched", "small-budget", "preemption"],
)
def test_graph_steps_give_the_eager_tokens(model_and_reference, spec, options):
    path, prompts, expected = model_and_reference
    llm = _portable(LLM(str(path), dtype="float32", block_size=4, speculative_config=spec, **options), True)
    _untimed(llm)
    assert _greedy(llm, prompts) == expected
    assert _greedy(llm, prompts) == expected  # again, from the prefix cache (and the suffix corpus)
    queries = {q for _, q, _ in llm.engine.runner.graphs.graphs}
    if spec is None:
        assert queries == {1}
    else:
        assert llm.engine.stats().spec.num_accepted_tokens > 0
        assert 1 in queries and len(queries) >= 3  # decode steps, and verification steps of several sizes
    if options["num_blocks"] == 40:
        assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.stats().kv_cache_usage == 0.0
    llm.engine.kv.check_integrity()


def _step(*rows: tuple[int, int, int, list[int]]) -> SchedulerOutput:
    """Scheduled requests from (prompt length, computed tokens, tokens this step, drafts)."""
    out = SchedulerOutput()
    for i, (prompt, computed, n, drafts) in enumerate(rows):
        req = Request(f"r{i}", list(range(3, 3 + prompt)), SamplingParams(temperature=0))
        req.num_computed_tokens = computed
        out.scheduled.append(ScheduledRequest(req, n, list(range(-(-(computed + n) // 4))), drafts))
    return out


def test_only_steps_that_sample_every_row_take_a_graph():
    graphs = CudaGraphDecoder(None, SimpleNamespace(layer_windows=[None]), 4, max_batch=8, max_blocks_per_seq=64, scratch_slot=0,
                              device=torch.device("cpu"), capture=False)  # fmt: skip
    assert graphs._shape(_step((10, 9, 1, []), (5, 4, 1, []))) == (2, 1, 4)
    assert graphs._shape(_step((10, 9, 3, [7, 8]), (5, 4, 1, []))) == (2, 4, 4)
    assert graphs._shape(_step((10, 9, 1, []), (50, 20, 1, []))) is None  # a 1-token chunk mid-prompt
    assert graphs._shape(_step((10, 9, 1, []), (50, 20, 8, []))) is None  # a prompt chunk
    assert graphs._shape(_step((10, 9, 34, list(range(33))))) is None  # more queries than the largest bucket
    assert graphs._shape(_step(*[(10, 9, 1, [])] * 9)) is None  # more requests than the graphs hold
    assert graphs._shape(_step((300, 299, 1, []))) is None  # a block table wider than the model's length
    assert QUERY_BUCKETS[-1] == 32
