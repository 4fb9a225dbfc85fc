"""Scheduler: exact token budgets, chunked prefill, preemption, no model."""

from __future__ import annotations

from agora.engine.kv_cache import KVCacheManager
from agora.engine.request import Request, RequestStatus
from agora.engine.sampling import SamplingParams
from agora.engine.scheduler import Scheduler, SchedulerConfig

EOS = 0


def make(num_blocks: int, block_size: int = 4, budget: int = 64, max_seqs: int = 8, policy: str = "fcfs") -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, scheduling_policy=policy)
    return Scheduler(cfg, KVCacheManager(num_blocks, block_size))


def req(rid: str, n_prompt: int, start: int = 1, max_tokens: int = 100, priority: int = 0, **kw) -> Request:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)
    return Request(rid, list(range(start, start + n_prompt)), params, eos_token_ids=frozenset({EOS}), priority=priority)


def step(s: Scheduler, token: int = 7) -> dict[str, int]:
    """One step where every request that reaches its end samples ``token``."""
    out = s.schedule()
    s.update(out, {x.request.request_id: [token] for x in out.scheduled if x.samples})
    return out.num_scheduled_tokens


def test_chunked_prefill_under_a_token_budget():
    s = make(num_blocks=16, budget=8)
    s.add_request(req("a", 20))
    s.add_request(req("b", 6, start=100))
    assert step(s) == {"a": 8}
    assert step(s) == {"a": 8}
    assert step(s) == {"a": 4, "b": 4}  # a finishes its prompt and samples; b starts
    assert s.requests["a"].output_token_ids == [7]
    assert s.requests["b"].output_token_ids == []
    assert step(s) == {"a": 1, "b": 2}
    assert s.requests["b"].output_token_ids == [7]
    assert step(s) == {"a": 1, "b": 1}
    # b took block 5 for its first chunk before a (23 tokens) needed its sixth block.
    assert s.kv.block_ids("a") == [0, 1, 2, 3, 4, 6]
    assert s.kv.block_ids("b") == [5, 7]


def test_running_requests_come_before_waiting_ones_and_max_num_seqs_holds():
    s = make(num_blocks=32, budget=100, max_seqs=2)
    for i in range(3):
        s.add_request(req(f"r{i}", 5, start=10 * i + 1))
    assert step(s) == {"r0": 5, "r1": 5}
    assert step(s) == {"r0": 1, "r1": 1}
    assert s.num_waiting == 1
    s.finish_requests(["r0"], RequestStatus.FINISHED_ABORTED)
    assert step(s) == {"r1": 1, "r2": 5}


def test_preemption_frees_the_newest_request_and_recomputes_it_later():
    s = make(num_blocks=4, budget=64)
    a, b = req("a", 7), req("b", 7, start=100)
    s.add_request(a)
    s.add_request(b)
    assert step(s) == {"a": 7, "b": 7}  # 2 blocks each: the pool is full
    assert step(s) == {"a": 1, "b": 1}  # position 7 still fits in each second block
    out = s.schedule()  # a's position 8 needs a third block: b is preempted
    assert out.num_scheduled_tokens == {"a": 1}
    assert out.preempted_ids == ["b"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert b.output_token_ids == [7, 7]  # nothing generated is lost
    assert s.kv.block_ids("a") == [0, 1, 3]  # b's blocks went back tail-first: [3, 2]
    s.update(out, {"a": [7]})
    # b (9 tokens) finds its first block cached but needs two more: it keeps waiting.
    assert step(s) == {"a": 1}
    assert list(s.waiting) == [b]
    s.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    out = s.schedule()
    # b is recomputed: 4 of its 9 tokens come from the prefix cache (block 2 survived).
    assert out.num_scheduled_tokens == {"b": 5}
    assert b.num_computed_tokens == 4
    assert s.kv.block_ids("b")[0] == 2
    s.update(out, {"b": [9]})
    assert b.output_token_ids == [7, 7, 9]


def test_a_request_that_cannot_fit_preempts_itself_without_losing_others():
    s = make(num_blocks=2, budget=64)
    a = req("a", 4)
    s.add_request(a)
    assert step(s) == {"a": 4}
    assert step(s) == {"a": 1}  # tokens 0..4 in blocks 0, 1
    for _ in range(3):
        step(s)  # up to 8 tokens
    out = s.schedule()  # the 9th token needs a third block: nothing to preempt but itself
    assert out.num_scheduled_tokens == {}
    assert out.preempted_ids == ["a"]
    assert a.status == RequestStatus.PREEMPTED


def test_prefix_cache_hit_at_admission_skips_computed_tokens():
    s = make(num_blocks=16, budget=64)
    s.add_request(req("a", 10, max_tokens=1))
    assert step(s) == {"a": 10}
    assert "a" not in s.requests  # finished by max_tokens, blocks freed but cached
    s.add_request(req("b", 12))
    assert step(s) == {"b": 4}  # 8 of 12 tokens are cached (two full blocks)
    assert s.requests["b"].num_cached_tokens == 8


def test_stop_conditions_finish_and_free():
    s = make(num_blocks=8)
    s.add_request(req("eos", 3))
    s.add_request(req("len", 3, start=50, max_tokens=2))
    s.add_request(req("stopid", 3, start=60, stop_token_ids=[5]))
    s.add_request(req("min", 3, start=70, min_tokens=2))
    out = s.schedule()
    s.update(out, {"eos": [EOS], "len": [1], "stopid": [5], "min": [EOS]})
    assert set(s.requests) == {"len", "min"}  # min_tokens not reached yet: EOS does not stop
    out = s.schedule()
    s.update(out, {"len": [1], "min": [EOS]})
    assert set(s.requests) == set()
    assert s.kv.num_free_blocks == 8
    s.kv.check_integrity()


# -- speculative decoding: drafts are budget ---------------------------------------------------


def test_drafts_are_granted_as_budget_and_accepted_ones_count_as_computed():
    s = make(num_blocks=16, budget=8)
    a = req("a", 5)
    s.add_request(a)
    assert step(s) == {"a": 5}  # prefill; samples 7
    a.spec_token_ids = [10, 11, 12]
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 4}  # the due token and three drafts
    assert out.scheduled[0].draft_token_ids == [10, 11, 12] and out.scheduled[0].samples
    assert s.kv.block_ids("a") == [0, 1, 2]  # positions 5..8
    # Two drafts accepted, then the model's own token: 3 new tokens, the last not computed yet.
    updated = s.update(out, {"a": [10, 11, 99]})
    assert [(r.request_id, kept) for r, kept in updated] == [("a", 3)]
    assert a.output_token_ids == [7, 10, 11, 99]
    assert a.num_computed_tokens == 8 and a.num_tokens == 9
    assert a.spec_token_ids == []
    assert s.kv.block_ids("a") == [0, 1, 2]  # position 8 (token 99) is in block 2: nothing to give back
    # Drafts past the budget are cut: budget 8, one due token, at most 7 drafts.
    a.spec_token_ids = list(range(20, 40))
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 8} and len(out.scheduled[0].draft_token_ids) == 7


def test_rejected_drafts_give_their_blocks_back():
    s = make(num_blocks=16, budget=16)
    a = req("a", 3)
    s.add_request(a)
    step(s)
    a.spec_token_ids = list(range(20, 30))  # positions 3..13: blocks 0..3
    out = s.schedule()
    assert s.kv.block_ids("a") == [0, 1, 2, 3]
    s.update(out, {"a": [55]})  # the first draft is rejected: only the model's token is kept
    assert a.output_token_ids == [7, 55] and a.num_computed_tokens == 4
    assert s.kv.block_ids("a") == [0, 1]  # 5 tokens: two blocks
    assert s.kv.pool.free_block_ids()[:2] == [2, 3]
    s.kv.check_integrity()


def test_a_stop_token_among_accepted_drafts_ends_the_request_there():
    s = make(num_blocks=16, budget=16)
    a = req("a", 3)
    s.add_request(a)
    step(s)
    a.spec_token_ids = [5, EOS, 6]
    out = s.schedule()
    updated = s.update(out, {"a": [5, EOS, 6, 8]})
    assert [(r.request_id, kept) for r, kept in updated] == [("a", 2)]
    assert a.output_token_ids == [7, 5, EOS] and a.status == RequestStatus.FINISHED_STOPPED
    assert "a" not in s.requests and s.kv.usage() == 0.0


def test_drafts_that_do_not_fit_the_kv_cache_are_dropped_before_anyone_is_preempted():
    s = make(num_blocks=3, budget=64)
    a, b = req("a", 3), req("b", 4, start=100)
    s.add_request(a)
    s.add_request(b)
    step(s)  # a: block 0; b: blocks 1, 2 (its sampled token needs the second)
    a.spec_token_ids = [1, 2, 3, 4, 5]  # would need two more blocks, and none is free
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 1, "b": 1}
    assert out.preempted_ids == [] and out.scheduled[0].draft_token_ids == []


def test_preemption_drops_drafts():
    s = make(num_blocks=4, budget=64)
    a, b = req("a", 7), req("b", 7, start=100)
    s.add_request(a)
    s.add_request(b)
    step(s)
    step(s)
    b.spec_token_ids = [1, 2]
    out = s.schedule()  # a needs a third block: b is preempted
    assert out.preempted_ids == ["b"] and b.spec_token_ids == []


# -- the priority policy ---------------------------------------------------------------------------


def test_priority_admits_the_most_urgent_first_and_arrival_breaks_ties():
    s = make(num_blocks=32, budget=100, max_seqs=2, policy="priority")
    for rid, p in (("low", 5), ("mid1", 1), ("high", -3), ("mid2", 1)):
        s.add_request(req(rid, 5, start=10 * len(s.requests) + 1, priority=p))
    assert [r.request_id for r in s.waiting] == ["high", "mid1", "mid2", "low"]
    assert step(s) == {"high": 5, "mid1": 5}
    s.finish_requests(["high"], RequestStatus.FINISHED_ABORTED)
    assert step(s) == {"mid1": 1, "mid2": 5}
    fcfs = make(num_blocks=32, budget=100, max_seqs=2)
    for rid, p in (("low", 5), ("high", -3)):
        fcfs.add_request(req(rid, 5, priority=p))
    assert [r.request_id for r in fcfs.waiting] == ["low", "high"]  # fcfs: priorities do not reorder


def test_priority_grants_budget_to_the_most_urgent_running_request_first():
    s = make(num_blocks=32, budget=8, max_seqs=4, policy="priority")
    s.add_request(req("low", 20, priority=2))
    assert step(s) == {"low": 8}
    s.add_request(req("high", 12, start=100, priority=0))
    assert step(s) == {"low": 8}  # high is admitted only where budget is left: none
    assert step(s) == {"low": 4, "high": 4}
    assert [r.request_id for r in s.running] == ["high", "low"]  # running kept in priority order
    assert step(s) == {"high": 8}  # the rest of high's prompt comes before low's decode token
    assert step(s) == {"high": 1, "low": 1}


def test_priority_preempts_the_least_urgent_request_not_the_newest():
    s = make(num_blocks=4, budget=64, policy="priority")
    a, b = req("a", 7, priority=1), req("b", 7, start=100, priority=0)
    s.add_request(a)
    s.add_request(b)
    assert step(s) == {"b": 7, "a": 7}  # 2 blocks each: the pool is full
    assert step(s) == {"b": 1, "a": 1}
    out = s.schedule()  # b (the more urgent, admitted second) needs a third block: a goes, though older
    assert out.num_scheduled_tokens == {"b": 1}
    assert out.preempted_ids == ["a"]
    assert a.status == RequestStatus.PREEMPTED and a.output_token_ids == [7, 7]
    s.update(out, {"b": [7]})
    s.add_request(req("c", 3, start=200, priority=1))  # the same priority as a, later: it waits behind a
    assert [r.request_id for r in s.waiting] == ["a", "c"]
    s.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)
    assert step(s) == {"a": 5, "c": 3}  # a's first block survived in the prefix cache
    s.kv.check_integrity()
