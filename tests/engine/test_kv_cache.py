"""Block pool and prefix cache: exact block ids and free-queue order, no model."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from agora.engine.kv_cache import BlockHash, KVCacheManager, hash_block


@dataclass
class Req:
    request_id: str
    all_token_ids: list[int]
    num_computed_tokens: int = 0
    cache_salt: str | None = None
    block_hashes: list[BlockHash] = field(default_factory=list)


def admit(kv: KVCacheManager, req: Req) -> list[int] | None:
    """What the scheduler does for a new request: prefix lookup, then allocate the rest."""
    computed = kv.computed_blocks(req)
    new = kv.allocate(req, len(req.all_token_ids) - computed.num_tokens, computed)
    if new is not None:
        req.num_computed_tokens = len(req.all_token_ids)
    return new


def test_allocate_takes_blocks_from_the_head_and_free_appends_in_reverse():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = Req("a", list(range(10)))
    assert admit(kv, a) == [0, 1, 2]
    b = Req("b", list(range(100, 105)))
    assert admit(kv, b) == [3, 4]
    assert kv.pool.free_block_ids() == [5, 6, 7, 8, 9]
    kv.free("a")
    # The tail of a freed request is evicted first, its shared head last.
    assert kv.pool.free_block_ids() == [5, 6, 7, 8, 9, 2, 1, 0]
    assert kv.block_ids("b") == [3, 4]
    kv.check_integrity()


def test_prefix_hit_reuses_cached_blocks_and_takes_new_ones_from_the_head():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = Req("a", list(range(10)))
    admit(kv, a)
    kv.free("a")
    b = Req("b", list(range(8)) + [50, 51, 52])
    computed = kv.computed_blocks(b)
    assert [blk.block_id for blk in computed.blocks] == [0, 1]
    assert computed.num_tokens == 8
    assert kv.allocate(b, 3, computed) == [3]
    assert kv.block_ids("b") == [0, 1, 3]
    assert kv.pool.free_block_ids() == [4, 5, 6, 7, 8, 9, 2]
    assert kv.stats.queries == 10 + 11 and kv.stats.hits == 8
    kv.check_integrity()


def test_a_fully_cached_prompt_still_computes_its_last_token():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    admit(kv, Req("a", list(range(8))))
    kv.free("a")
    computed = kv.computed_blocks(Req("b", list(range(8))))
    assert [blk.block_id for blk in computed.blocks] == [0]
    assert computed.num_tokens == 4


def test_shared_blocks_are_reference_counted():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    admit(kv, Req("a", list(range(9))))  # blocks 0, 1 full and cached, 2 partial
    b = Req("b", list(range(8)) + [7, 7])
    assert admit(kv, b) == [3]
    assert kv.block_ids("b") == [0, 1, 3]
    assert [kv.pool.blocks[i].ref_cnt for i in range(4)] == [2, 2, 1, 1]
    kv.free("a")
    assert [kv.pool.blocks[i].ref_cnt for i in range(4)] == [1, 1, 0, 1]
    assert kv.pool.free_block_ids() == [4, 5, 6, 7, 2]
    kv.check_integrity()


def test_reused_blocks_are_evicted_from_the_cache():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    admit(kv, Req("a", list(range(8))))  # blocks 0, 1 cached (block 1 full: tokens 4..7)
    kv.free("a")
    assert kv.pool.free_block_ids() == [2, 3, 1, 0]
    # Three new blocks: 2, 3, then 1 (evicting the hash of tokens 4..7).
    assert admit(kv, Req("c", list(range(200, 212)))) == [2, 3, 1]
    kv.free("c")
    computed = kv.computed_blocks(Req("d", list(range(9))))
    assert [blk.block_id for blk in computed.blocks] == [0]  # block 0 survived, block 1 did not


def test_failed_allocation_changes_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    admit(kv, Req("a", list(range(8))))
    before = kv.pool.free_block_ids()
    b = Req("b", list(range(100, 112)))
    assert admit(kv, b) is None
    assert kv.pool.free_block_ids() == before
    assert kv.block_ids("b") == []
    kv.check_integrity()


def test_allocate_grows_a_running_request_one_block_at_a_time():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = Req("a", list(range(4)))
    assert admit(kv, a) == [0]
    a.all_token_ids.append(99)  # a sampled token, not yet computed
    assert kv.allocate(a, 1) == [1]
    a.num_computed_tokens = 5
    a.all_token_ids.append(98)
    assert kv.allocate(a, 1) == []  # block 1 has room
    assert kv.block_ids("a") == [0, 1]


def test_salt_isolates_the_prefix_cache():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    admit(kv, Req("a", list(range(9)), cache_salt="tenant-1"))
    kv.free("a")
    assert kv.computed_blocks(Req("b", list(range(9)), cache_salt="tenant-2")).num_tokens == 0
    assert kv.computed_blocks(Req("c", list(range(9)), cache_salt="tenant-1")).num_tokens == 8


def test_prefix_caching_disabled_never_hits():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    admit(kv, Req("a", list(range(9))))
    kv.free("a")
    assert kv.computed_blocks(Req("b", list(range(9)))).num_tokens == 0
    assert kv.pool.cached == {}


def test_block_hashes_chain_and_compare_tokens():
    h0 = hash_block(None, [1, 2, 3, 4], None)
    h1 = hash_block(h0, [5, 6, 7, 8], None)
    assert h1 != hash_block(hash_block(None, [9, 9, 9, 9], None), [5, 6, 7, 8], None)
    assert hash_block(None, [1, 2, 3, 4], "s").digest != h0.digest
    kv = KVCacheManager(num_blocks=4, block_size=4)
    admit(kv, Req("a", [1, 2, 3, 4, 5]))
    # A forged hash with the right digest but other tokens is not a hit.
    forged = BlockHash(h0.digest, (0, 0, 0, 0))
    assert kv.pool.lookup(forged) is None
    assert kv.pool.lookup(h0) is kv.pool.blocks[0]


def test_reset_prefix_cache_only_when_idle():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    admit(kv, Req("a", list(range(8))))
    assert kv.reset_prefix_cache() is False
    kv.free("a")
    assert kv.reset_prefix_cache() is True
    assert kv.computed_blocks(Req("b", list(range(9)))).num_tokens == 0


def test_usage():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    assert kv.usage() == 0.0
    admit(kv, Req("a", list(range(5))))
    assert kv.usage() == pytest.approx(0.5)
    kv.free("a")
    assert kv.usage() == 0.0


def test_rollback_gives_back_the_blocks_only_rejected_drafts_reached():
    """Speculative decoding: a step computes 1 due token + 6 drafts; 1 draft is accepted, so the block
    that only the rejected drafts reached goes back, to the head of the free queue, never cached."""
    kv = KVCacheManager(num_blocks=8, block_size=4)
    r = Req("r", list(range(6)))
    assert admit(kv, r) == [0, 1]
    r.all_token_ids.append(6)  # the sampled token, due next step
    r.num_computed_tokens = 6
    assert kv.allocate(r, 1 + 6) == [2, 3]  # positions 6..12: blocks 1 (6, 7), 2 (8..11), 3 (12)
    # Only the known tokens (0..6) are hashed: block 1 is not full of known tokens yet, blocks 2 and 3 never.
    assert kv.num_cached_blocks["r"] == 1
    # One draft accepted plus one sampled token: 9 tokens known, 8 computed.
    r.all_token_ids += [7, 8]
    r.num_computed_tokens = 8
    assert kv.rollback("r", len(r.all_token_ids)) == [3]
    assert kv.block_ids("r") == [0, 1, 2]
    assert kv.pool.free_block_ids() == [3, 4, 5, 6, 7]
    assert kv.rollback("r", len(r.all_token_ids)) == []
    # The next allocation hashes block 1 (tokens 4..7, all known and computed now).
    assert kv.allocate(r, 1) == []
    assert kv.num_cached_blocks["r"] == 2
    kv.check_integrity()
    kv.free("r")
    assert kv.pool.free_block_ids() == [3, 4, 5, 6, 7, 2, 1, 0]
    kv.check_integrity()


def test_blocks_accepted_drafts_fill_are_cached_when_the_step_ends():
    """A verification step's accepted drafts complete blocks 1 and 2; they are cached when the scheduler
    commits the step (cache_computed), not only at a next allocation that may never come: the request can
    finish on this step, and its answer should be a prefix hit for the next turn."""
    kv = KVCacheManager(num_blocks=8, block_size=4)
    r = Req("r", list(range(6)))
    assert admit(kv, r) == [0, 1]
    r.all_token_ids.append(6)  # the sampled token, due next step
    r.num_computed_tokens = 6
    assert kv.allocate(r, 1 + 6) == [2, 3]  # positions 6..12 computed: the due token and 6 drafts
    assert kv.num_cached_blocks["r"] == 1  # only known tokens hashed: drafts are guesses yet
    r.all_token_ids += [7, 8, 9, 10, 11, 12, 99]  # all 6 drafts accepted, then the model's own token
    r.num_computed_tokens = 13
    kv.cache_computed(r, r.num_computed_tokens)
    assert kv.num_cached_blocks["r"] == 3  # blocks 1 and 2 (tokens 4..11); block 3 is not full
    kv.free("r")
    nxt = Req("n", list(range(13)) + [99, 5])
    computed = kv.computed_blocks(nxt)
    assert [b.block_id for b in computed.blocks] == [0, 1, 2] and computed.num_tokens == 12
    kv.check_integrity()
