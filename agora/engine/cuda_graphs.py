"""CUDA graphs for decode and verification steps.

A small model's decode step is a few hundred tiny kernels; launched one by one
from Python, the GPU waits on the host. For steps where every request computes
its one due token, and under speculative decoding the drafts after it, the whole
forward is captured once per (batch bucket, queries-per-request bucket,
block-table width bucket) and replayed. Inputs live in static buffers that the
host fills before each replay; the attention masks are computed inside the graph
from the positions, so only ids, positions, slots and block tables move.

Every request gets the bucket's number of query rows. Rows past a request's own
tokens (fewer drafts than the bucket) are padding at its last position, and rows
of requests beyond the real batch are padding at position 0 with a block table of
zeros; padding writes its keys and values to a scratch block that the block pool
never hands out, so it touches no one's KV, and its hidden states are dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from agora.engine.attention import AttentionGroup, AttentionMetadata, TorchPagedAttention
from agora.engine.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
QUERY_BUCKETS = (1, 2, 4, 8, 16, 32)  # tokens per request: the due one, then drafts
MAX_VERIFY_TOKENS = 512  # batch x queries of a captured verification step (decode steps: the batch buckets)


def _bucket(n: int, buckets: tuple[int, ...]) -> int | None:
    return next((b for b in buckets if b >= n), None)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph | None  # None: run eagerly on the static buffers (capture=False)
    ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    tables: torch.Tensor
    hidden: torch.Tensor


class CudaGraphDecoder:
    def __init__(
        self,
        model: nn.Module,
        attention: TorchPagedAttention,
        block_size: int,
        max_batch: int,
        max_blocks_per_seq: int,
        scratch_slot: int,
        device: torch.device,
        capture: bool = True,
    ) -> None:
        self.model = model
        self.attention = attention
        self.block_size = block_size
        self.max_batch = _bucket(max_batch, BATCH_BUCKETS) or BATCH_BUCKETS[-1]
        self.block_buckets = tuple(sorted({min(2**i, max_blocks_per_seq) for i in range(2, 32)}))
        self.scratch_slot = scratch_slot
        self.device = device
        self.windows = sorted(set(attention.layer_windows), key=lambda w: -1 if w is None else w)
        self.graphs: dict[tuple[int, int, int], _Graph] = {}
        self.capture = capture  # False: the same padded steps, run eagerly (how the CPU tests check them)
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def _shape(self, out: SchedulerOutput) -> tuple[int, int, int] | None:
        """(batch, queries per request, blocks) buckets of a step, or None where no graph serves it."""
        queries = 0
        for s in out.scheduled:
            # Only each request's due token and its drafts, and a token sampled from every row: not a
            # prompt chunk, whose rows would be sampled as if it had reached the prompt's end.
            if s.num_tokens != 1 + len(s.draft_token_ids) or not s.samples:
                return None
            queries = max(queries, s.num_tokens)
        batch = _bucket(len(out.scheduled), BATCH_BUCKETS)
        q = _bucket(queries, QUERY_BUCKETS)
        blocks = _bucket(max(len(s.block_ids) for s in out.scheduled), self.block_buckets)
        if batch is None or q is None or blocks is None or batch > self.max_batch:
            return None
        if q > 1 and batch * q > MAX_VERIFY_TOKENS:
            return None
        return batch, q, blocks

    def _forward(self, g: _Graph) -> torch.Tensor:
        batch, blocks = g.tables.shape
        k_pos = torch.arange(blocks * self.block_size, device=self.device)
        q_pos = g.positions.view(batch, -1)[:, :, None]  # [batch, q, 1]
        causal = k_pos <= q_pos
        masks = {w: (causal if w is None else causal & (k_pos > q_pos - w))[:, None] for w in self.windows}
        group = AttentionGroup(None, None, g.tables, masks, batch, q_pos.shape[1])
        meta = AttentionMetadata(g.slots, [group])
        return self.model(g.ids, g.positions, self.attention.bind(meta))

    def _build(self, batch: int, q: int, blocks: int) -> _Graph:
        """A step shape's static buffers, and its graph captured over them (with capture=False, the buffers only)."""
        dev = self.device
        rows = batch * q
        g = _Graph(
            torch.cuda.CUDAGraph() if self.capture else None,
            torch.zeros(rows, dtype=torch.long, device=dev),
            torch.zeros(rows, dtype=torch.long, device=dev),
            torch.full((rows,), self.scratch_slot, dtype=torch.long, device=dev),
            torch.zeros(batch, blocks, dtype=torch.long, device=dev),
            torch.empty(0, device=dev),
        )
        if g.graph is None:
            return g
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):  # warm-up: lazy initialization must not happen during capture
                self._forward(g)
        torch.cuda.current_stream(dev).wait_stream(stream)
        with torch.inference_mode(), torch.cuda.graph(g.graph, pool=self.pool):
            g.hidden = self._forward(g)
        logger.info("captured a CUDA graph for batch %d x %d queries x %d blocks", batch, q, blocks)
        return g

    @torch.inference_mode()
    def run(self, out: SchedulerOutput) -> torch.Tensor | None:
        """Hidden states of the step, one row per token, request by request (a request's due token,
        then its drafts), as the eager step's sampling rows are; None where no graph serves it."""
        shape = self._shape(out)
        if shape is None:
            return None
        batch, q, blocks = shape
        g = self.graphs.get(shape)
        if g is None:
            g = self.graphs[shape] = self._build(batch, q, blocks)
        bs = self.block_size
        # One host->device copy per buffer; plain (pageable) memory: pinning per step costs more than it saves.
        ids = [0] * (batch * q)
        pos = [0] * (batch * q)
        slots = [self.scratch_slot] * (batch * q)
        tables = [0] * (batch * blocks)
        rows: list[int] = []
        for i, s in enumerate(out.scheduled):
            start = s.request.num_computed_tokens
            table = s.block_ids
            first = i * q
            ids[first] = s.request.all_token_ids[start]
            ids[first + 1 : first + s.num_tokens] = s.draft_token_ids
            for j in range(s.num_tokens):
                p = start + j
                pos[first + j] = p
                slots[first + j] = table[p // bs] * bs + p % bs
            pos[first + s.num_tokens : first + q] = [start + s.num_tokens - 1] * (q - s.num_tokens)
            rows.extend(range(first, first + s.num_tokens))
            tables[i * blocks : i * blocks + len(table)] = table
        staged = torch.tensor([ids, pos, slots], dtype=torch.long)
        g.ids.copy_(staged[0])
        g.positions.copy_(staged[1])
        g.slots.copy_(staged[2])
        g.tables.copy_(torch.tensor(tables, dtype=torch.long).view(batch, blocks))
        if g.graph is None:
            g.hidden = self._forward(g)
        else:
            g.graph.replay()
        if q == 1:
            return g.hidden[: len(rows)]
        return g.hidden[torch.tensor(rows, device=self.device)]
