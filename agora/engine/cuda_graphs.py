"""CUDA graphs for decode steps.

A small model's decode step is a few hundred tiny kernels; launched one by one
from Python, the GPU waits on the host. For steps where every request computes
exactly one token, the whole forward is captured once per (batch bucket,
block-table width bucket) and replayed. Inputs live in static buffers that the
host fills before each replay; the attention masks are computed inside the
graph from the positions, so only ids, positions, slots and block tables move.

Rows beyond the real batch are padding: position 0, block table of zeros, and a
slot in a scratch block that the block pool never hands out, so their writes
touch no one's KV.
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


def _bucket(n: int, buckets: tuple[int, ...]) -> int | None:
    return next((b for b in buckets if b >= n), None)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
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
    ) -> None:
        self.model = model
        self.attention = attention
        self.block_size = block_size
        self.max_batch = _bucket(max_batch, BATCH_BUCKETS) or BATCH_BUCKETS[-1]
        self.block_buckets = tuple(sorted({min(2**i, max_blocks_per_seq) for i in range(2, 32)}))
        self.scratch_slot = scratch_slot
        self.device = device
        self.windows = sorted(set(attention.layer_windows), key=lambda w: -1 if w is None else w)
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def can_run(self, out: SchedulerOutput) -> bool:
        return (
            len(out.scheduled) <= self.max_batch
            and all(s.num_tokens == 1 for s in out.scheduled)
            and max(len(s.block_ids) for s in out.scheduled) <= self.block_buckets[-1]
        )

    def _forward(self, g: _Graph) -> torch.Tensor:
        k_pos = torch.arange(g.tables.shape[1] * self.block_size, device=self.device)
        q_pos = g.positions[:, None]
        causal = k_pos[None, :] <= q_pos
        masks = {
            w: (causal if w is None else causal & (k_pos[None, :] > q_pos - w))[:, None, None, :] for w in self.windows
        }
        batch = g.ids.shape[0]
        group = AttentionGroup(None, None, g.tables, masks, batch, 1)
        meta = AttentionMetadata(g.slots, [group])
        return self.model(g.ids, g.positions, self.attention.bind(meta))

    def _capture(self, batch: int, blocks: int) -> _Graph:
        dev = self.device
        g = _Graph(
            torch.cuda.CUDAGraph(),
            torch.zeros(batch, dtype=torch.long, device=dev),
            torch.zeros(batch, dtype=torch.long, device=dev),
            torch.full((batch,), self.scratch_slot, dtype=torch.long, device=dev),
            torch.zeros(batch, blocks, dtype=torch.long, device=dev),
            torch.empty(0, device=dev),
        )
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):  # warm-up: lazy initialization must not happen during capture
                self._forward(g)
        torch.cuda.current_stream(dev).wait_stream(stream)
        with torch.inference_mode(), torch.cuda.graph(g.graph, pool=self.pool):
            g.hidden = self._forward(g)
        logger.info("captured a CUDA graph for decode batch %d x %d blocks", batch, blocks)
        return g

    @torch.inference_mode()
    def run(self, out: SchedulerOutput) -> torch.Tensor:
        """Hidden states ``[n, hidden]`` of the n requests of a decode-only step."""
        n = len(out.scheduled)
        batch = _bucket(n, BATCH_BUCKETS)
        blocks = _bucket(max(len(s.block_ids) for s in out.scheduled), self.block_buckets)
        assert batch is not None and blocks is not None
        g = self.graphs.get((batch, blocks))
        if g is None:
            g = self.graphs[(batch, blocks)] = self._capture(batch, blocks)
        bs = self.block_size
        # One host->device copy per buffer; plain (pageable) memory: pinning per step costs more than it saves.
        ids = [0] * batch
        pos = [0] * batch
        slots = [self.scratch_slot] * batch
        tables = [0] * (batch * blocks)
        for i, s in enumerate(out.scheduled):
            p = s.request.num_computed_tokens
            ids[i] = s.request.all_token_ids[p]
            pos[i] = p
            slots[i] = s.block_ids[p // bs] * bs + p % bs
            tables[i * blocks : i * blocks + len(s.block_ids)] = s.block_ids
        staged = torch.tensor([ids, pos, slots], dtype=torch.long)
        g.ids.copy_(staged[0])
        g.positions.copy_(staged[1])
        g.slots.copy_(staged[2])
        g.tables.copy_(torch.tensor(tables, dtype=torch.long).view(batch, blocks))
        g.graph.replay()
        return g.hidden[:n]
