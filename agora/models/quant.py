"""Linear layers for the CPU: GGUF blocks multiplied directly, and bf16 GEMM weights.

A Q4_1 weight is 5 bits per value instead of 32, so a decode step that streams every
weight once (memory-bound) reads about 6x fewer bytes. The fp32 weight the rest of
the engine uses is kept too: large batches (prefill) still go to PyTorch's matmul,
which is faster there, and the block kernel computes the same dequantized values
(``d * q + m``) in fp32, so both paths agree up to summation order.

With ``--dtype bfloat16`` on a CPU (``cast_gemm_weights``, ``cast_lm_head``) those GEMM weights are bf16:
activations stay fp32 and are rounded to bf16 only as a GEMM's input (oneDNN accumulates
in fp32), while the block kernel's steps keep their fp32 math.
"""

from __future__ import annotations

import logging
import threading

import torch
import torch.nn.functional as F
from torch import nn

from agora import kernels
from agora.kernels import mkl
from agora.models import gguf_repack

logger = logging.getLogger(__name__)

# Rows of x up to which the block kernel is used (MAX_KERNEL_ROWS, by host below). In the engine a
# step's fp32 weights come from memory (they do not fit in cache), so the kernel, reading 5-bit blocks,
# beats fp32 sgemm well past a decode batch (2-core Zen 4, SmolLM2, 1,400 tokens of context, medians
# of 3 alternating rounds: benchmarks/cpu_verify_steps.py --max-kernel-rows 64,192 --rounds 3): 8
# sequences verifying 8 drafts each (72 rows) take 227 ms a step instead of 265, 16 x 5 rows 259
# instead of 292, 16 x 9 rows 438 instead of 510. A fresh prompt's prefill (one step, measured apart)
# was 15-20% faster at 100 tokens, level at 200 and 5% slower at 250: MKL's sgemm wins on longer chunks.
MAX_KERNEL_ROWS_DEFAULT = 192
# On an Intel CPU with AVX-512, PyTorch's sgemm (MKL, which takes its AVX-512 paths on Intel's own
# CPUs) wins earlier even with the weights coming from memory. Intel Xeon with AMX (48 KB L1, so the
# kernels' 16-row tiles), 2 cores, SmolLM2, 1,400 tokens of context, medians of 2 alternating rounds of
# benchmarks/cpu_verify_steps.py --batches 8,16 --drafts 4,6,8 --max-kernel-rows 64,128,192: 8 x 9 rows
# 220-233 ms a step on the kernels against 244 on sgemm, 16 x 7 rows 355-371 against 340, 16 x 9 rows
# 405 on sgemm against 455. (With 8-row tiles sgemm had won from 64 rows: 16 x 9 rows 349 against 435.)
MAX_KERNEL_ROWS_INTEL_AVX512 = 96
# An Intel CPU whose L1 is too small for 16-row tiles (32 KB: Skylake, Cascade Lake) keeps the limit
# measured with 8-row tiles on the host above; no such host was measured.
MAX_KERNEL_ROWS_INTEL_AVX512_8ROW_TILES = 64
_INTEL_AVX512 = kernels.cpu_vendor() == "GenuineIntel" and "avx512f" in kernels.cpu_flags()
if not _INTEL_AVX512:
    MAX_KERNEL_ROWS = MAX_KERNEL_ROWS_DEFAULT
elif kernels.tile_rows() >= 16:
    MAX_KERNEL_ROWS = MAX_KERNEL_ROWS_INTEL_AVX512
else:
    MAX_KERNEL_ROWS = MAX_KERNEL_ROWS_INTEL_AVX512_8ROW_TILES
# The fp32 GEMMs (steps past the kernels' rows: prompt chunks, verification at 16 agents) on weights packed
# once for MKL (agora.kernels.mkl) instead of sgemm repacking every weight on every call. Measured on Intel
# (Xeon with AMX, 2 cores, SmolLM2's linears over 30 layers): 20-25% faster at 112-175 rows, the same fp32
# math (sgemm's bits for most shapes, else a last bit on a few elements: tests/kernels/test_mkl.py).
# MKL takes other code paths on other vendors' CPUs. On an AMD Zen 3 (2 cores, benchmarks/cpu_verify_steps.py
# --batches 16 --drafts 0,2,4,6,8 --max-kernel-rows 48,192 --pack-gemm on,off --rounds 2) packing with the GEMM
# from 48 rows gained nothing past the host's noise over the block kernels to 192 rows (16 x 5 rows 408 ms a step
# against 365, 16 x 9 rows 633 against 619-659), so AMD keeps F.linear.
PACK_GEMM_WEIGHTS = kernels.cpu_vendor() == "GenuineIntel"
# Against a packed weight the GEMM wins from fewer rows: past 48 (same host, medians of 2 alternating rounds of
# benchmarks/cpu_verify_steps.py --batches 8,16 --drafts 2,3,4,5 --max-kernel-rows 16,32,48 and --drafts 3,5,7
# --max-kernel-rows 48,96: 16 x 4 rows 167 ms a step on the GEMM against 170 on the kernels, 16 x 6 rows 182
# against 222, 8 x 8 rows 127 against 143; level at 40-48 rows, the kernels ahead at 24-32). The int8 kernel,
# faster per row, keeps MAX_KERNEL_ROWS.
MAX_KERNEL_ROWS_PACKED_GEMM = 48
# With the blocks only (--gguf-weights blocks) a long step's GEMM first dequantizes the weight (kernels.dequantize),
# which moves the crossing later than against a kept fp32 weight, but not as far as MAX_KERNEL_ROWS on Intel. Intel
# Xeon with AMX, 2 cores, medians of 7 calls per layer of layer 0 (kernel against dequantize + F.linear): SmolLM2's
# Q4_1 gate_up 64 rows 1.08 ms against 1.17, 96 rows 1.62 against 1.26; down 64 rows 0.60 against 0.55; Gemma 3's
# QU8 gate_up 64 rows 1.56 against 1.72, 96 rows 2.32 against 1.95; down 64 rows 1.02 against 0.84. Elsewhere
# (no such host measured) MAX_KERNEL_ROWS holds.
MAX_KERNEL_ROWS_BLOCKS_ONLY = 64 if _INTEL_AVX512 and kernels.tile_rows() >= 16 else MAX_KERNEL_ROWS
# Against bf16 GEMM weights (--dtype bfloat16), about twice as fast per row as fp32 ones, the
# kernels keep the earlier limit (benchmarks/cpu_linear_rows.py: level from 64 to 128 rows).
MAX_KERNEL_ROWS_BF16_GEMM = 64
# The lm_head's bf16 GEMM (cast_lm_head; MKL's, whose products stay fp32) wins sooner: its blocks are Q8_0
# (1.06 bytes a weight, the layers' Q4_1 0.63), so its bf16 weight reads not even twice their bytes, and the
# int8 kernel is slow on its 49,152 rows. Intel Xeon with AMX, 2 cores, medians of 15 alternating calls
# (benchmarks/cpu_linear_rows.py --lm-head, benchmarks/results/cpu_lm_head.json): 8 rows 2.4 ms on the int8
# kernel against 4.0, 16 rows 3.7 against 4.3, 32 rows 6.7 against 5.7, 64 rows 13.1 against 7.3, 144 rows
# 27.9 (the fp32 GEMM, packed for MKL, that took them before) against 15.7.
MAX_KERNEL_ROWS_BF16_LM_HEAD = 16
# The lm_head's bf16 GEMM keeps its products in fp32 (MKL's cblas_gemm_bf16bf16f32) on Intel, where it was
# measured; MKL takes other code paths on other vendors' CPUs, so there it stays on oneDNN (products rounded to bf16).
LM_HEAD_FP32_PRODUCTS = kernels.cpu_vendor() == "GenuineIntel"


class GGUFLinear(nn.Linear):
    """``nn.Linear`` (same parameters, same names) plus the weight's GGUF blocks."""

    def __init__(self, base: nn.Linear, blocks: torch.Tensor, qtype: str, int8: bool = False) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # shared: a tied lm_head stays tied to the embedding
        self.bias = base.bias
        self.qtype = qtype
        # --gguf-activations int8: the kernel quantizes x to int8 first, and `blocks` holds the
        # weight rows in its layout (kernels.repack_i8: groups of 8 rows, [N / 8, ...]).
        self.int8 = int8
        self.register_buffer("blocks", kernels.repack_i8(blocks, qtype) if int8 else blocks, persistent=False)
        self.packed: mkl.PackedWeight | None = None  # the fp32 weight in MKL's layout (pack_gemm_weights)
        self.is_lm_head = False  # (its own limit against a bf16 weight)

    @property
    def blocks_only(self) -> bool:
        """No fp32 weight of its own or packed for MKL (``drop_fp32_weights``): its blocks are all it has."""
        return self.packed is None and self.weight.numel() == 0

    @property
    def kernel_rows(self) -> int:
        """Rows of x up to which the block kernel runs (past them, the GEMM on ``weight``)."""
        if self.weight.dtype != torch.float32:
            return MAX_KERNEL_ROWS_BF16_LM_HEAD if self.is_lm_head else MAX_KERNEL_ROWS_BF16_GEMM
        if self.blocks_only and not self.is_lm_head:
            return MAX_KERNEL_ROWS_BLOCKS_ONLY
        return MAX_KERNEL_ROWS_PACKED_GEMM if self.packed is not None and not self.int8 else MAX_KERNEL_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled():
            if x.numel() <= self.kernel_rows * self.in_features:
                return kernels.linear(x, self.blocks, self.qtype, self.bias, self.int8)
            if self.blocks_only:
                if self.is_lm_head:  # (the largest weight: no buffer for it)
                    return kernels.linear(x, self.blocks, self.qtype, self.bias, self.int8)
                # a long step: the weight in fp32 for this GEMM only, in a buffer every such layer reuses
                w = kernels.dequantize(
                    self.blocks, self.qtype, self.in_features, _scratch(self.weight_numel), self.int8
                )
                return F.linear(x, w, self.bias)
        if self.packed is not None and x.dtype == torch.float32 and x.device.type == "cpu":
            return mkl.linear(x, self.packed, self.bias)  # (inference only: no autograd through it)
        if self.weight.numel() == 0:
            raise RuntimeError(
                f"{self}: it has no fp32 weight (packed for MKL by pack_gemm_weights, or dropped by drop_fp32_weights: "
                "--gguf-weights blocks), so it takes fp32 inputs on the CPU, without autograd, only"
            )
        return gemm(x, self.weight, self.bias, fp32_products=self.is_lm_head and LM_HEAD_FP32_PRODUCTS)

    @property
    def weight_numel(self) -> int:
        return self.in_features * self.out_features

    def extra_repr(self) -> str:
        packed = ", GEMM weight packed for MKL" if self.packed is not None else ""
        return f"{super().extra_repr()}, gguf={self.qtype}{', int8 activations' if self.int8 else ''}{packed}"


_scratch_local = threading.local()


def _scratch(numel: int) -> torch.Tensor:
    """An fp32 buffer of at least ``numel`` floats, this thread's, kept for the next long step (a fresh one
    each call would fault its pages in again: as long as the dequantization itself)."""
    buf = getattr(_scratch_local, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _scratch_local.buf = torch.empty(numel, dtype=torch.float32)
    return buf


def gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fp32_products: bool = False) -> torch.Tensor:
    """``x @ weight.T + bias``; a weight in a lower precision than ``x`` (bf16 on a CPU) gets
    ``x`` rounded to its dtype, and the product comes back in ``x``'s dtype before the bias.
    ``fp32_products`` (an lm_head's logits): a bf16 weight's products returned in fp32 where MKL
    can (``mkl.linear_bf16``), not rounded to bf16 first."""
    if weight.dtype == x.dtype:
        return F.linear(x, weight, bias)
    if fp32_products and weight.dtype == torch.bfloat16 and x.dtype == torch.float32 and x.device.type == "cpu":
        y = mkl.linear_bf16(x, weight, bias)
        if y is not None:
            return y
    y = F.linear(x.to(weight.dtype), weight).to(x.dtype)
    return y if bias is None else y + bias


class LowPrecisionLinear(nn.Linear):
    """``nn.Linear`` (same parameters, same names) whose weight is in a lower precision than
    the activations it is given: see ``gemm``."""

    def __init__(self, base: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.is_lm_head = False  # (cast_lm_head: its logits' products kept in fp32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemm(x, self.weight, self.bias, fp32_products=self.is_lm_head and LM_HEAD_FP32_PRODUCTS)


def cast_gemm_weights(layers: nn.Module, dtype: torch.dtype) -> int:
    """Give every ``nn.Linear`` under ``layers`` (a model's decoder layers; ``cast_lm_head`` does the
    lm_head) a ``dtype`` weight, its bias kept, and a forward that rounds its input to match. Call it
    before ``attach_gguf_blocks``, which keeps the weight it finds."""
    count = 0
    for name, module in list(layers.named_modules()):
        if type(module) is not nn.Linear:
            continue
        module.weight = nn.Parameter(module.weight.detach().to(dtype), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(layers.get_submodule(parent_name) if parent_name else layers, child, LowPrecisionLinear(module))
        count += 1
    return count


def cast_lm_head(model: nn.Module, dtype: torch.dtype) -> bool:
    """Give the model's ``lm_head`` a ``dtype`` weight, as ``cast_gemm_weights`` gives the layers': a copy
    where it is tied to the embedding, which keeps its own (SmolLM2-135M: 57 MB more; Gemma 3 1B: 600 MB).
    A verification step's logits are its largest GEMM: 144 rows (16 agents, 8 drafts) take 15.7 ms on a
    bf16 weight where fp32 took 27.9 (Intel Xeon with AMX, 2 cores). Its products stay fp32 (``gemm``'s
    ``fp32_products``): rounded to bf16, logits flipped 3 of 139 greedy tokens. Returns whether it did."""
    head = getattr(model, "lm_head", None)
    if type(head) is not nn.Linear:
        return False
    head.weight = nn.Parameter(head.weight.detach().to(dtype), requires_grad=False)  # unties only the head
    model.lm_head = LowPrecisionLinear(head)
    model.lm_head.is_lm_head = True
    return True


def pack_gemm_weights(model: nn.Module) -> int:
    """Pack the fp32 GEMM weight of each GGUFLinear the model calls for MKL (``agora.kernels.mkl``) and
    free the fp32 copy where nothing else reads it (a tied lm_head's is the embedding's; the q/k/v or
    gate/up layers that ``fuse_projections`` merged view the fused weight, and go with it: the model
    calls only the fused one). Call it after ``fuse_projections``. Returns the count packed."""
    if not mkl.available():
        return 0
    layers = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    owners: dict[int, GGUFLinear] = {}  # storage -> the layer whose weight is all of it
    views: dict[int, list[GGUFLinear]] = {}
    for m in layers:
        w = m.weight
        if w.dtype != torch.float32 or w.device.type != "cpu" or w.numel() == 0:
            continue
        key = w.untyped_storage().data_ptr()
        views.setdefault(key, []).append(m)
        if w.storage_offset() == 0 and w.numel() * w.element_size() == w.untyped_storage().nbytes():
            owners[key] = m
    others = {t.untyped_storage().data_ptr() for m in model.modules() if not isinstance(m, GGUFLinear)
              for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))}  # fmt: skip
    for key, owner in owners.items():
        owner.packed = mkl.pack(owner.weight)
        if key in others:
            continue
        for m in views[key]:  # the fused layer and the parts it merged
            m.weight = nn.Parameter(torch.empty(0, m.in_features), requires_grad=False)
    mkl.release_freed_memory()
    logger.debug("%d GEMM weights packed for MKL", len(owners))
    return len(owners)


class GGUFEmbedding(nn.Module):
    """An embedding that keeps its GGUF blocks only (``--gguf-weights blocks``): a step dequantizes the rows
    of its tokens (``kernels.dequantize``), the values ``nn.Embedding`` holds with an fp32 copy."""

    def __init__(self, blocks: torch.Tensor, qtype: str, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.qtype = num_embeddings, embedding_dim, qtype
        self.register_buffer("blocks", blocks, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.blocks.index_select(0, input_ids.reshape(-1))
        return kernels.dequantize(rows, self.qtype, self.embedding_dim).view(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, gguf={self.qtype}"


def drop_fp32_weights(model: nn.Module, blocks: dict[str, tuple[str, torch.Tensor]]) -> int:
    """``--gguf-weights blocks``: the embedding whose blocks ``blocks`` (HF name -> (qtype, rows)) holds becomes a
    ``GGUFEmbedding``, and each GGUFLinear gets an empty fp32 weight: short steps multiply with its blocks as
    before, a long step's GEMM with the weight dequantized into a buffer the layers share (but the lm_head's,
    on the kernel at any size: its weight is the largest). A weight another module still reads stays. Call it
    after ``attach_gguf_blocks``, before ``fuse_projections``. Returns the count of layers changed."""
    changed = 0
    for name, module in list(model.named_modules()):
        if type(module) is nn.Embedding and f"{name}.weight" in blocks and kernels.available():
            qtype, rows = blocks[f"{name}.weight"]
            if qtype in kernels.QTYPES:
                parent, _, child = name.rpartition(".")
                embedding = GGUFEmbedding(rows, qtype, module.num_embeddings, module.embedding_dim)
                setattr(model.get_submodule(parent) if parent else model, child, embedding)
                changed += 1
    others = {t.untyped_storage().data_ptr() for m in model.modules() if not isinstance(m, GGUFLinear)
              for t in m.parameters(recurse=False)}  # fmt: skip
    for m in model.modules():
        if isinstance(m, GGUFLinear) and m.weight.untyped_storage().data_ptr() not in others:
            m.weight = nn.Parameter(torch.empty(0, m.in_features), requires_grad=False)
            changed += 1
    return changed


def attach_gguf_blocks(
    model: nn.Module, blocks: dict[str, tuple[str, torch.Tensor]], tied: bool, int8: bool = False
) -> int:
    """Swap each ``nn.Linear`` whose weight came from a supported GGUF block format for a
    GGUFLinear (``int8``: with int8 activations). ``blocks`` maps HF weight names to (qtype,
    uint8 rows). Returns the count."""
    if tied and "model.embed_tokens.weight" in blocks and "lm_head.weight" not in blocks:
        blocks = {**blocks, "lm_head.weight": blocks["model.embed_tokens.weight"]}
    swapped = 0
    for name, (qtype, rows) in blocks.items():
        module_name = name.removesuffix(".weight")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            continue
        if type(module) not in (nn.Linear, LowPrecisionLinear) or module.in_features % 32:
            continue
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        # else this layer keeps fp32 math
        int8_here = int8 and qtype in kernels.I8_QTYPES and module.out_features % kernels.I8_GROUP == 0
        layer = GGUFLinear(module, rows, qtype, int8_here)
        layer.is_lm_head = module_name == "lm_head"
        setattr(parent, child, layer)
        swapped += 1
    logger.debug("%d linear layers read their GGUF blocks directly", swapped)
    return swapped


def _fused(parts: list[GGUFLinear]) -> GGUFLinear | None:
    if len({(p.in_features, p.int8, p.bias is None) for p in parts}) != 1:
        return None
    if len({p.qtype for p in parts}) > 1:
        # block formats differ (Gemma's Q4_K_M: q, k in Q5_0, v in Q8_0 in half the layers): all to one, exactly,
        # QU4 where every part has 4-bit codes (Q4_1 beside Q4_K), else QU8 (int8 parts: back from the int8
        # kernel's tiles, repacked, and tiled again)
        common = "QU4" if all(p.qtype in gguf_repack.FOUR_BIT for p in parts) else "QU8"
        for p in parts:
            if p.qtype != common:
                rows = kernels.unrepack_i8(p.blocks, p.qtype) if p.int8 else p.blocks
                rows = torch.from_numpy(gguf_repack.repack(rows.numpy(), p.qtype, to=common))
                p.blocks = kernels.repack_i8(rows, common) if p.int8 else rows
                p.qtype = common
    # (on the meta device: its own weights are replaced below, and drawing random ones took 0.4 s of a SmolLM2 load)
    base = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=parts[0].bias is not None,
                     device="meta")  # fmt: skip
    with torch.no_grad():
        base.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=False)
        if base.bias is not None:
            base.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)  # type: ignore[misc]
    fused = GGUFLinear(base, torch.cat([p.blocks for p in parts]), parts[0].qtype)
    if parts[0].int8:  # the parts' blocks are repacked already: whole groups of 8 rows, concatenated as they are
        fused.int8 = True
    # The separate layers now view the fused tensors, so nothing is stored twice.
    start, per_entry = 0, kernels.I8_GROUP if fused.int8 else 1  # weight rows per row of `blocks`
    for p in parts:
        end = start + p.out_features
        p.weight = nn.Parameter(fused.weight[start:end], requires_grad=False)
        if p.bias is not None:
            p.bias = nn.Parameter(fused.bias[start:end], requires_grad=False)  # type: ignore[index]
        p.blocks = fused.blocks[start // per_entry : end // per_entry]
        start = end
    return fused


def fuse_projections(model: nn.Module) -> int:
    """Merge the q/k/v (and gate/up) GGUFLinears of each layer into one, where the model
    declares a ``qkv_proj`` (``gate_up_proj``) slot and the parts share a block format: a
    decode step then makes one kernel call where it made three (two). Returns the count."""
    count = 0
    for module in model.modules():
        for slot, names in (("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("gate_up_proj", ("gate_proj", "up_proj"))):
            if not hasattr(module, slot) or getattr(module, slot) is not None:
                continue
            parts = [getattr(module, n, None) for n in names]
            if all(isinstance(p, GGUFLinear) for p in parts):
                fused = _fused(parts)  # type: ignore[arg-type]
                if fused is not None:
                    setattr(module, slot, fused)
                    count += 1
    return count
