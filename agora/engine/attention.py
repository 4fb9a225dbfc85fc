"""Paged attention: the portable PyTorch backend and the per-step metadata it reads.

The KV cache of one layer is a pair of tensors ``[num_blocks, block_size, H_kv, D]``.
A token at position ``p`` of a request whose block table is ``bt`` lives in
slot ``bt[p // block_size] * block_size + p % block_size`` of the flattened cache::

    block_size = 4, block table of request r = [7, 2]
    position :  0  1  2  3 | 4  5  6
    slot     : 28 29 30 31 | 8  9 10

Per step, the runner groups requests so padding stays small: one group of
requests computing a single token (decode) and one group of longer chunks
(prefill). Each group gathers its requests' blocks into a padded batch and runs
``scaled_dot_product_attention`` once with a causal mask offset per request.

On CPU with fp32 or fp16 caches, both groups skip all of that: native kernels
(``agora.kernels``) read each request's blocks in place, so a step's attention reads
every cached K/V once instead of copying it into a padded batch first, and a prefill
chunk computes only the causal half of its scores (flash style: no mask, no
``[queries, keys]`` matrix).
"""

from __future__ import annotations

import copy
import ctypes
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from agora import kernels


@dataclass
class AttentionGroup:
    """A padded batch of ``batch`` requests, each with up to ``max_q`` query tokens."""

    token_index: torch.Tensor | None  # [Tg] rows of the step's flat tokens; None = all, in order
    pad_index: torch.Tensor | None  # [Tg] rows of the padded [batch * max_q] queries; None = identity
    block_tables: torch.Tensor  # [batch, max_blocks]
    # Per sliding window (None = full attention): [batch, 1, max_q, max_blocks * block_size], True = attend
    masks: dict[int | None, torch.Tensor]
    batch: int
    max_q: int
    # Set for the CPU kernels' groups (CPU int64): decode groups have seq_lens ([batch] keys per
    # request), prefill groups query_offsets ([batch + 1] cumulative query rows) and
    # context_starts ([batch] position of each request's first query).
    seq_lens: torch.Tensor | None = None
    query_offsets: torch.Tensor | None = None
    context_starts: torch.Tensor | None = None


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    groups: list[AttentionGroup]


def build_group(
    token_index: list[int] | None,
    query_lens: list[int],
    context_starts: list[int],
    block_tables: list[list[int]],
    block_size: int,
    windows: set[int | None],
    device: torch.device,
    paged_kernels: bool = False,
) -> AttentionGroup:
    """Metadata for one group. Request b's queries sit at positions
    ``context_starts[b] .. context_starts[b] + query_lens[b] - 1``; each attends to
    every cached position up to and including its own. ``paged_kernels`` (the CPU
    kernels read the group) needs only the block tables and positions, no masks."""
    batch = len(query_lens)
    max_q = max(query_lens)
    max_blocks = max(len(bt) for bt in block_tables)
    tables = torch.zeros(batch, max_blocks, dtype=torch.long)
    for b, bt in enumerate(block_tables):
        tables[b, : len(bt)] = torch.tensor(bt, dtype=torch.long)
    token_tensor = None if token_index is None else torch.tensor(token_index, dtype=torch.long, device=device)
    if paged_kernels:
        if max_q == 1:
            seq_lens = torch.tensor([s + 1 for s in context_starts], dtype=torch.long)
            return AttentionGroup(token_tensor, None, tables, {}, batch, 1, seq_lens)
        offsets = torch.zeros(batch + 1, dtype=torch.long)
        torch.cumsum(torch.tensor(query_lens, dtype=torch.long), 0, out=offsets[1:])
        starts_t = torch.tensor(context_starts, dtype=torch.long)
        return AttentionGroup(token_tensor, None, tables, {}, batch, max_q, None, offsets, starts_t)
    q_lens = torch.tensor(query_lens)
    starts = torch.tensor(context_starts)
    q_ar = torch.arange(max_q)
    q_pos = starts[:, None] + q_ar[None, :]  # [B, max_q]
    k_pos = torch.arange(max_blocks * block_size)
    causal = k_pos[None, None, :] <= q_pos[:, :, None]
    valid = q_ar[None, :] < q_lens[:, None]  # [B, max_q]
    masks = {}
    for window in windows:
        mask = causal if window is None else causal & (k_pos[None, None, :] > q_pos[:, :, None] - window)
        # Padded query rows attend to key 0 only, so softmax never sees an empty row.
        mask = torch.where(valid[:, :, None], mask, k_pos[None, None, :] == 0)
        masks[window] = mask.unsqueeze(1).to(device)
    pad_index = None  # dense already when every request has exactly max_q tokens
    if any(q != max_q for q in query_lens):
        pad_index = (torch.arange(batch)[:, None] * max_q + q_ar[None, :])[valid]
    return AttentionGroup(
        token_index=token_tensor,
        pad_index=None if pad_index is None else pad_index.to(device),
        block_tables=tables.to(device),
        masks=masks,
        batch=batch,
        max_q=max_q,
    )


def _native_group(g: AttentionGroup, num_tokens: int) -> kernels.AttentionGroup:
    def ptr(t: torch.Tensor | None) -> int | None:
        return None if t is None else t.data_ptr()

    rows = num_tokens if g.token_index is None else g.token_index.shape[0]
    return kernels.AttentionGroup(
        int(g.seq_lens is not None), rows, ptr(g.token_index), g.batch, g.block_tables.data_ptr(),
        g.block_tables.shape[1], ptr(g.seq_lens), ptr(g.query_offsets), ptr(g.context_starts),
    )  # fmt: skip


class TorchPagedAttention:
    """Portable backend: gather blocks, one SDPA call per group. Works on any device."""

    def __init__(
        self,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        scale: float,
        layer_windows: list[int | None],
        bf16: bool = False,
    ) -> None:
        self.kv_caches = kv_caches
        self.scale = scale
        self.layer_windows = layer_windows
        self.metadata: AttentionMetadata | None = None
        cache = kv_caches[0][0] if kv_caches else None
        self.paged_kernels = bool(
            cache is not None
            and cache.device.type == "cpu"
            and cache.dtype in kernels.KV_DTYPES
            and kernels.available()
        )
        # --dtype bfloat16: the prefill kernel's two products in bf16 on AMX, where the CPU has it
        self.bf16 = bool(bf16 and self.paged_kernels and kernels.amx_available())
        self._native: kernels.Attention | None = None
        if self.paged_kernels:  # what every step's native description shares: the caches and windows
            n = len(kv_caches)
            self._k_ptrs = (ctypes.c_void_p * n)(*(k.data_ptr() for k, _ in kv_caches))
            self._v_ptrs = (ctypes.c_void_p * n)(*(v.data_ptr() for _, v in kv_caches))
            self._windows = torch.tensor([w or 0 for w in layer_windows], dtype=torch.int64)

    def bind(self, metadata: AttentionMetadata) -> TorchPagedAttention:
        """A view of this backend for one step (the caches are shared, not copied)."""
        step = copy.copy(self)
        step.metadata = metadata
        step._native = None
        return step

    def native(self) -> kernels.Attention | None:
        """The bound step as the native decoder layers read it (pointers into this step's
        metadata, which the bound view keeps alive), or None where the kernels cannot read the cache."""
        meta = self.metadata
        if not self.paged_kernels or meta is None:
            return None
        if self._native is None:
            k_cache = self.kv_caches[0][0]
            native = kernels.Attention(
                ctypes.cast(self._k_ptrs, ctypes.c_void_p), ctypes.cast(self._v_ptrs, ctypes.c_void_p),
                self._windows.data_ptr(), meta.slot_mapping.data_ptr(), k_cache.shape[1],
                kernels.kv_kind(k_cache.dtype), int(self.bf16), self.scale, len(meta.groups),
            )  # fmt: skip
            for i, g in enumerate(meta.groups):
                native.groups[i] = _native_group(g, meta.slot_mapping.shape[0])
            self._native = native
        return self._native

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta = self.metadata
        assert meta is not None, "bind() the step's metadata first"
        k_cache, v_cache = self.kv_caches[layer]
        _, block_size, num_kv_heads, head_dim = k_cache.shape
        flat_k = k_cache.view(-1, num_kv_heads, head_dim)
        flat_v = v_cache.view(-1, num_kv_heads, head_dim)
        flat_k.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        flat_v.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
        window = self.layer_windows[layer]
        if len(meta.groups) == 1 and meta.groups[0].token_index is None:
            return self._group(meta.groups[0], q, k_cache, v_cache, window)
        out = torch.empty_like(q)
        for group in meta.groups:
            assert group.token_index is not None
            out[group.token_index] = self._group(group, q[group.token_index], k_cache, v_cache, window)
        return out

    def _group(
        self, g: AttentionGroup, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, window: int | None
    ) -> torch.Tensor:
        if g.seq_lens is not None:
            out = kernels.paged_decode_attention(
                q.float(), k_cache, v_cache, g.block_tables, g.seq_lens, window, self.scale
            )  # the kernel computes in fp32 whatever the model's dtype
            return out.to(q.dtype)
        if g.query_offsets is not None and g.context_starts is not None:
            out = kernels.paged_prefill_attention(
                q.float(), k_cache, v_cache, g.block_tables, g.query_offsets, g.context_starts, window, self.scale,
                bf16=self.bf16,
            )  # fmt: skip
            return out.to(q.dtype)
        num_heads, head_dim = q.shape[1], q.shape[2]
        if g.pad_index is not None:
            padded = q.new_zeros(g.batch * g.max_q, num_heads, head_dim)
            padded[g.pad_index] = q
        else:
            padded = q
        qb = padded.view(g.batch, g.max_q, num_heads, head_dim).transpose(1, 2)
        _, block_size, num_kv_heads, _ = k_cache.shape
        kb = k_cache[g.block_tables].view(g.batch, -1, num_kv_heads, head_dim).transpose(1, 2)
        vb = v_cache[g.block_tables].view(g.batch, -1, num_kv_heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            qb,
            kb.to(q.dtype),
            vb.to(q.dtype),
            attn_mask=g.masks[window],
            scale=self.scale,
            enable_gqa=num_kv_heads != num_heads,
        )
        out = out.transpose(1, 2).reshape(g.batch * g.max_q, num_heads, head_dim)
        return out if g.pad_index is None else out[g.pad_index]
