"""Paged KV-cache bookkeeping: a block pool with prefix caching, over integers only.

The model runner owns the tensors; this module only decides *which* block ids a
request uses. Nothing here imports torch, so every rule is testable in
milliseconds.

Block hashes are chained, so a block's hash names its whole prefix::

    tokens : [t0 .. t15][t16 .. t31][t32 .. t40]
    hash   :   h0 = H(salt, t0..t15)
               h1 = H(h0,  t16..t31)
               (partial block: never hashed, never shared)

A freed block keeps its hash and stays findable in the cache until the pool
hands it out again (LRU order: the free queue's head is evicted first).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple


class BlockHash(NamedTuple):
    """Digest of a full block plus its own tokens (compared on a hit, so a digest
    collision can never hand out the wrong KV)."""

    digest: bytes
    token_ids: tuple[int, ...]


def hash_block(parent: BlockHash | None, token_ids: Sequence[int], salt: str | None) -> BlockHash:
    """Hash one full block, chained from its parent (or from the salt for the first)."""
    h = hashlib.sha256()
    if parent is None:
        h.update(b"root:" + (salt or "").encode())
    else:
        h.update(parent.digest)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return BlockHash(h.digest(), tuple(token_ids))


def hash_request_blocks(
    token_ids: Sequence[int],
    block_size: int,
    salt: str | None,
    existing: list[BlockHash],
    num_tokens: int | None = None,
) -> list[BlockHash]:
    """Extend ``existing`` (the hashes already known for this request) with the hashes
    of every further *full* block among the first ``num_tokens`` of ``token_ids``
    (all of them by default). Returns the same list."""
    num_full = (len(token_ids) if num_tokens is None else num_tokens) // block_size
    for i in range(len(existing), num_full):
        parent = existing[i - 1] if i else None
        existing.append(hash_block(parent, token_ids[i * block_size : (i + 1) * block_size], salt))
    return existing


@dataclass(eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None


class BlockPool:
    """Fixed set of blocks, reference counted, with an LRU free queue and a
    hash -> block map for prefix caching.

    Invariant: a block is in the free queue iff its ``ref_cnt`` is 0.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        # OrderedDict as an O(1) doubly linked list: head = least recently freed.
        self.free_queue: OrderedDict[int, KVCacheBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached: dict[bytes, KVCacheBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def usage(self) -> float:
        """Fraction of blocks held by live requests (0.0 .. 1.0)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def free_block_ids(self) -> list[int]:
        """The free queue in eviction order (head first)."""
        return list(self.free_queue)

    def lookup(self, block_hash: BlockHash) -> KVCacheBlock | None:
        block = self.cached.get(block_hash.digest)
        if block is None or block.block_hash is None or block.block_hash.token_ids != block_hash.token_ids:
            return None
        return block

    def get_new_blocks(self, n: int) -> list[KVCacheBlock]:
        """Take ``n`` blocks from the head of the free queue, evicting their cached hashes."""
        if n > self.num_free_blocks:
            raise ValueError(f"cannot get {n} blocks, only {self.num_free_blocks} free")
        out = []
        for _ in range(n):
            _, block = self.free_queue.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Sequence[KVCacheBlock]) -> None:
        """Take a reference on cached blocks (removing them from the free queue if idle)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Sequence[KVCacheBlock]) -> None:
        """Drop one reference from each block; blocks reaching 0 join the free queue's
        tail in the given order (so pass the ones to evict first, first)."""
        for block in ordered_blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue[block.block_id] = block

    def cache_block(self, block: KVCacheBlock, block_hash: BlockHash) -> None:
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash.digest in self.cached:
            # Another block already holds this content; keep the first one findable.
            return
        block.block_hash = block_hash
        self.cached[block_hash.digest] = block

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash.digest) is block:
                del self.cached[block.block_hash.digest]
            block.block_hash = None

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash. Only possible when no block is in use."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self.cached.clear()
        return True

    def check_integrity(self) -> None:
        """Cheap consistency check (called by the scheduler when idle and by tests)."""
        for block in self.blocks:
            in_free = block.block_id in self.free_queue
            if (block.ref_cnt == 0) != in_free:
                raise AssertionError(f"block {block.block_id}: ref_cnt={block.ref_cnt} in_free={in_free}")
            if block.ref_cnt < 0:
                raise AssertionError(f"block {block.block_id}: negative ref_cnt")
        for digest, block in self.cached.items():
            if block.block_hash is None or block.block_hash.digest != digest:
                raise AssertionError(f"block {block.block_id}: cache map out of sync")


@dataclass
class PrefixCacheStats:
    """Counted in tokens, as vLLM's prefix_cache_queries / prefix_cache_hits."""

    queries: int = 0
    hits: int = 0


class KVCacheRequest:
    """What the manager needs to know about a request (implemented by engine.Request)."""

    request_id: str
    all_token_ids: list[int]
    num_computed_tokens: int
    cache_salt: str | None
    block_hashes: list[BlockHash]


@dataclass
class ComputedBlocks:
    blocks: list[KVCacheBlock] = field(default_factory=list)
    num_tokens: int = 0


class KVCacheManager:
    """The scheduler's only door to KV memory: ``computed_blocks``, ``allocate``, ``free``."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self.req_blocks: dict[str, list[KVCacheBlock]] = {}
        # How many leading blocks of each request were already offered to the cache.
        self.num_cached_blocks: dict[str, int] = {}
        self.stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    def computed_blocks(self, request: KVCacheRequest) -> ComputedBlocks:
        """Longest cached prefix of a new request, in whole blocks.

        At least one token is always left to compute, since the model must run
        on the last token to produce logits.
        """
        if not self.enable_prefix_caching:
            return ComputedBlocks()
        tokens = request.all_token_ids
        hashes = hash_request_blocks(tokens, self.block_size, request.cache_salt, request.block_hashes)
        max_blocks = (len(tokens) - 1) // self.block_size
        hit: list[KVCacheBlock] = []
        for block_hash in hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hit.append(block)
        self.stats.queries += len(tokens)
        self.stats.hits += len(hit) * self.block_size
        return ComputedBlocks(hit, len(hit) * self.block_size)

    def allocate(
        self,
        request: KVCacheRequest,
        num_new_tokens: int,
        computed: ComputedBlocks | None = None,
    ) -> list[int] | None:
        """Make room for ``num_new_tokens`` more tokens of ``request``.

        ``computed`` are the prefix-cache hits of a request being admitted; they
        become the first blocks of its table. Returns the ids of the newly taken
        blocks, or None (changing nothing) when the pool cannot satisfy it.
        """
        blocks = self.req_blocks.setdefault(request.request_id, [])
        hit = computed.blocks if computed else []
        num_computed = request.num_computed_tokens + (computed.num_tokens if computed else 0)
        total_tokens = num_computed + num_new_tokens
        num_required = -(-total_tokens // self.block_size)
        num_new_blocks = max(0, num_required - len(blocks) - len(hit))
        # Cached hits sitting idle in the free queue are taken out of it by touch().
        num_idle_hits = sum(1 for b in hit if b.ref_cnt == 0)
        if num_new_blocks + num_idle_hits > self.pool.num_free_blocks:
            if not blocks:
                del self.req_blocks[request.request_id]
            return None
        self.pool.touch(hit)
        blocks.extend(hit)
        new = self.pool.get_new_blocks(num_new_blocks)
        blocks.extend(new)
        if self.enable_prefix_caching:
            # Only known tokens are hashed: draft tokens (speculative decoding) get slots, never a cache entry,
            # until they are accepted into the sequence and a later allocation finds their block full.
            self._cache_full_blocks(request, blocks, min(total_tokens, len(request.all_token_ids)))
        return [b.block_id for b in new]

    def cache_computed(self, request: KVCacheRequest, num_tokens: int) -> None:
        """Hash the blocks that ``request``'s first ``num_tokens`` tokens fill, their KV computed: after a
        verification step, the blocks its accepted drafts completed. A later allocation would hash them too,
        but the request may end on that step, and its last turn would then be missing from the cache."""
        blocks = self.req_blocks.get(request.request_id)
        if self.enable_prefix_caching and blocks:
            self._cache_full_blocks(request, blocks, min(num_tokens, len(request.all_token_ids)))

    def rollback(self, request_id: str, num_tokens: int) -> list[int]:
        """Give back the blocks of a request that hold nothing of its first ``num_tokens`` tokens (the
        slots of rejected draft tokens); returns their ids. Such blocks were never hashed, so they
        go to the head of the free queue: first to be reused."""
        blocks = self.req_blocks.get(request_id)
        keep = -(-num_tokens // self.block_size)
        if not blocks or len(blocks) <= keep:
            return []
        extra = blocks[keep:]
        del blocks[keep:]
        self.pool.free_blocks(extra)
        for block in reversed(extra):  # leaves them at the head in table order
            if block.ref_cnt == 0:
                self.pool.free_queue.move_to_end(block.block_id, last=False)
        return [b.block_id for b in extra]

    def _cache_full_blocks(self, request: KVCacheRequest, blocks: list[KVCacheBlock], num_tokens: int) -> None:
        num_full = num_tokens // self.block_size
        start = self.num_cached_blocks.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = hash_request_blocks(
            request.all_token_ids, self.block_size, request.cache_salt, request.block_hashes, num_tokens
        )
        for i in range(start, num_full):
            self.pool.cache_block(blocks[i], hashes[i])
        self.num_cached_blocks[request.request_id] = num_full

    def free(self, request_id: str) -> None:
        """Release a request's blocks. The tail goes to the free queue first, so the
        shared head of a prompt is evicted last."""
        blocks = self.req_blocks.pop(request_id, None)
        self.num_cached_blocks.pop(request_id, None)
        if blocks:
            self.pool.free_blocks(list(reversed(blocks)))

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()

    def check_integrity(self) -> None:
        self.pool.check_integrity()
        held: dict[int, int] = {}
        for blocks in self.req_blocks.values():
            for b in blocks:
                held[b.block_id] = held.get(b.block_id, 0) + 1
        for block in self.pool.blocks:
            if held.get(block.block_id, 0) != block.ref_cnt:
                raise AssertionError(
                    f"block {block.block_id}: ref_cnt={block.ref_cnt} but held by {held.get(block.block_id, 0)}"
                )
