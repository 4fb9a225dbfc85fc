"""One native call per decoder layer (models.native) gives bit for bit what the module path gives:
the same hidden states and the same KV cache, for every kind of step it takes over (decode,
chunks of drafts, both at once), for fp32, fp16 and bf16 caches, and for the Llama family's switches."""

from __future__ import annotations

import types
from unittest import mock

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf.quants import dequantize, quantize
from torch import nn

from agora import kernels
from agora.engine.attention import AttentionMetadata, TorchPagedAttention, build_group
from agora.models import gguf_repack
from agora.models.gemma3 import Gemma3Config, Gemma3ForCausalLM
from agora.models.llama import LlamaConfig, LlamaForCausalLM
from agora.models.quant import (
    MAX_KERNEL_ROWS,
    MAX_KERNEL_ROWS_BF16_GEMM,
    GGUFLinear,
    attach_gguf_blocks,
    cast_gemm_weights,
    fuse_projections,
)

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler: CPU kernels unavailable")
CPU = torch.device("cpu")
BLOCK = 4  # tokens per KV block: a request's keys span many blocks


def as_gguf(w: np.ndarray, qtype: str) -> tuple[np.ndarray, tuple[str, torch.Tensor]]:
    """A weight as a GGUF file of ``qtype`` holds it: the dequantized values (what the model multiplies by) and
    the blocks as the loader keeps them (the formats gguf_repack reads, repacked to QU8 or QU4)."""
    t = getattr(gguf.GGMLQuantizationType, qtype)
    rows = quantize(w, t)
    w = dequantize(rows, t).astype(np.float32)
    if qtype in gguf_repack.FORMATS:
        return w, (gguf_repack.target(qtype), torch.from_numpy(gguf_repack.repack(rows, qtype, w)))
    return w, (qtype, torch.from_numpy(rows))


def quantized_llama(
    seed: int = 0,
    qtypes: tuple[str, ...] = ("Q4_1", "Q8_0"),
    gemm_dtype: torch.dtype | None = None,
    int8: bool = False,
    head_dim: int = 32,
    **switches,
) -> LlamaForCausalLM:
    """A random Llama whose linears are GGUF blocks (weights = the blocks dequantized), fused and native."""
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=128, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=head_dim, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
        max_position_embeddings=256, tie_word_embeddings=False, **switches,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    blocks = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
                continue
            w = (torch.randn_like(p) * 0.15).numpy()
            if name.startswith("model.layers."):  # layer i in qtypes[i % 2]: both block formats
                w, blocks[name] = as_gguf(w, qtypes[int(name.split(".")[2]) % len(qtypes)])
            p.copy_(torch.from_numpy(w))
    if gemm_dtype is not None:  # as the loader does for --dtype bfloat16 on a CPU
        cast_gemm_weights(model.model.layers, gemm_dtype)
    assert attach_gguf_blocks(model, blocks, tied=False, int8=int8) == len(blocks)
    assert fuse_projections(model) == 2 * cfg.num_hidden_layers
    return model


def caches(
    model: LlamaForCausalLM, dtype: torch.dtype, num_blocks: int = 64
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    hkv, d = model.kv_shape
    return [
        (
            torch.zeros(num_blocks + 1, BLOCK, hkv, d, dtype=dtype),
            torch.zeros(num_blocks + 1, BLOCK, hkv, d, dtype=dtype),
        )
        for _ in range(model.num_layers)
    ]


def step(
    model: LlamaForCausalLM,
    kv,
    query_lens: list[int],
    starts: list[int],
    tables: list[list[int]],
    native: bool,
    seed: int,
    bf16_attention: bool = False,
) -> torch.Tensor:
    """One step: request b computes query_lens[b] tokens from position starts[b]; decode requests
    (1 token) and chunks go to separate groups when both are present, as the runner does."""
    ids, pos, slots = [], [], []
    for n, s, t in zip(query_lens, starts, tables, strict=True):
        g = torch.Generator().manual_seed(seed + s)
        ids += torch.randint(0, 64, (n,), generator=g).tolist()
        pos += list(range(s, s + n))
        slots += [t[p // BLOCK] * BLOCK + p % BLOCK for p in range(s, s + n)]
    windows = set(model.layer_sliding_windows)
    decode = [b for b, n in enumerate(query_lens) if n == 1]
    chunks = [b for b, n in enumerate(query_lens) if n > 1]
    offsets = np.cumsum([0, *query_lens])

    def group(members: list[int], flat: bool):
        index = None if flat else [r for b in members for r in range(offsets[b], offsets[b + 1])]
        return build_group(
            index, [query_lens[b] for b in members], [starts[b] for b in members], [tables[b] for b in members],
            BLOCK, windows, CPU, paged_kernels=True,
        )  # fmt: skip

    groups = [group(decode, False), group(chunks, False)] if decode and chunks else [group(decode or chunks, True)]
    attention = TorchPagedAttention(kv, model.attention_scale, model.layer_sliding_windows, bf16=bf16_attention)
    bound = attention.bind(AttentionMetadata(torch.tensor(slots), groups))
    saved = model.model.native
    model.model.native = saved if native else None
    module_calls: list[int] = []
    hook = model.model.layers[0].register_forward_pre_hook(lambda *_: module_calls.append(1))
    try:
        with torch.inference_mode():
            out = model(torch.tensor(ids), torch.tensor(pos), bound)
    finally:
        model.model.native = saved
        hook.remove()
    assert bool(module_calls) != native, "the step did not take the path asked for"
    return out


SWITCHES = {
    "llama": {},
    "qwen2 biases": {"qkv_bias": True},
    "biases everywhere": {"qkv_bias": True, "o_bias": True, "mlp_bias": True},
    "qwen3 q/k norms": {"qk_norm": True},
    "mistral window": {"sliding_window": 7},
}


@pytest.mark.parametrize(
    ("int8", "qtypes"),
    [(False, ("Q4_1", "Q8_0")), (True, ("Q4_1", "Q8_0")), (False, ("Q5_0", "Q4_0")), (True, ("Q5_0", "Q4_0"))],
    ids=["fp32 activations", "int8 activations", "QU8 and QU4 blocks", "int8 activations on QU8 and QU4 blocks"],
)
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("switches", list(SWITCHES), ids=list(SWITCHES))
def test_native_layers_equal_the_module_path_bit_for_bit(
    switches: str, kv_dtype: torch.dtype, int8: bool, qtypes: tuple[str, ...]
) -> None:
    assert_native_steps_equal_module_steps(quantized_llama(int8=int8, qtypes=qtypes, **SWITCHES[switches]), kv_dtype)


def assert_native_steps_equal_module_steps(model: nn.Module, kv_dtype: torch.dtype) -> None:
    assert model.build_native_layers() and model.model.native is not None
    # Four requests with prompts of 9, 30, 17 and 3 tokens, cached by a (module path) prefill.
    prompts = [9, 30, 17, 3]
    tables = [list(range(b * 12, b * 12 + 12)) for b in range(4)]
    a, b = caches(model, kv_dtype), caches(model, kv_dtype)
    for kv in (a, b):
        step(model, kv, prompts, [0] * 4, tables, native=False, seed=1)
    steps = [
        ([1, 1, 1, 1], prompts),  # decode: one flat group
        ([1, 5, 1, 1], [p + 1 for p in prompts]),  # a request verifying 4 drafts beside decodes: two groups
        ([3, 4, 2, 6], [p + 2 for p in prompts[:1]] + [p + 6 for p in prompts[1:2]] + [p + 2 for p in prompts[2:]]),
    ]
    for i, (lens, starts) in enumerate(steps):
        ref = step(model, a, lens, starts, tables, native=False, seed=10 + i)
        got = step(model, b, lens, starts, tables, native=True, seed=10 + i)
        assert torch.equal(got, ref), f"step {i}: hidden states differ by {(got - ref).abs().max()}"
        for (ka, va), (kb, vb) in zip(a, b, strict=True):
            assert torch.equal(ka, kb) and torch.equal(va, vb), f"step {i}: caches differ"
        assert ref.abs().max() > 0


def test_native_layers_take_only_small_cpu_fp32_steps() -> None:
    model = quantized_llama()
    assert model.build_native_layers()
    native = model.model.native
    n = MAX_KERNEL_ROWS  # decode batches and verification steps
    x, pos = torch.zeros(n, 128), torch.arange(n)
    with torch.inference_mode():
        assert native.runs(x, pos)
        assert not native.runs(torch.zeros(n + 1, 128), torch.arange(n + 1))  # prefill chunks: fp32 GEMMs
        assert not native.runs(x.half(), pos)
    assert not native.runs(x, pos)  # autograd on: the module path
    bf16 = quantized_llama(gemm_dtype=torch.bfloat16)  # bf16 GEMMs are faster past a decode batch
    assert bf16.build_native_layers() and bf16.model.native.max_rows == MAX_KERNEL_ROWS_BF16_GEMM
    # Without a cache the kernels read, the backend describes nothing and the model keeps its modules.
    f64 = TorchPagedAttention(caches(model, torch.float64), model.attention_scale, model.layer_sliding_windows)
    assert f64.bind(AttentionMetadata(torch.tensor([0]), [])).native() is None


def test_bf16_gemm_weights_leave_the_native_layers_exact() -> None:
    """--dtype bfloat16 on a CPU changes the prefill GEMMs' weights, not what the block kernels read."""
    fp32, bf16 = quantized_llama(), quantized_llama(gemm_dtype=torch.bfloat16)
    assert bf16.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.bfloat16
    assert fp32.build_native_layers() and bf16.build_native_layers()
    tables = [list(range(12))]
    a, b = caches(fp32, torch.float32), caches(bf16, torch.float32)
    step(fp32, a, [9], [0], tables, native=True, seed=1)
    step(bf16, b, [9], [0], tables, native=True, seed=1)
    assert torch.equal(
        step(fp32, a, [1], [9], tables, native=True, seed=2), step(bf16, b, [1], [9], tables, native=True, seed=2)
    )


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bf16_attention_is_the_same_in_the_native_layers(kv_dtype: torch.dtype) -> None:
    """--dtype bfloat16's attention (its products on AMX where the CPU has it, else the fp32 kernel): the one-call
    layers pass it to the kernel as the module path does, so both give the same bits; chunks and drafts alike."""
    model = quantized_llama(gemm_dtype=torch.bfloat16, head_dim=64)
    assert model.build_native_layers()
    tables = [list(range(0, 32, 2)), list(range(1, 32, 2))]  # (interleaved blocks)
    outs = {}
    for native in (True, False):
        for bf16 in (True, False):
            kv = caches(model, kv_dtype)
            step(model, kv, [40, 30], [0, 0], tables, native=False, seed=1, bf16_attention=bf16)  # the prompts
            outs[native, bf16] = step(model, kv, [5, 7], [40, 30], tables, native=native, seed=2, bf16_attention=bf16)
    assert torch.equal(outs[True, True], outs[False, True])
    assert torch.equal(outs[True, False], outs[False, False])
    if kernels.amx_available():  # bf16 products: close to fp32's, not the same
        assert not torch.equal(outs[True, True], outs[True, False])
        ref = outs[True, False]
        assert (outs[True, True] - ref).abs().max() < 0.1 * ref.abs().max()  # three random layers: errors compound
    else:
        assert torch.equal(outs[True, True], outs[True, False])


def test_a_layer_without_blocks_keeps_the_module_path() -> None:
    model = quantized_llama()
    model.model.layers[1].mlp.down_proj = torch.nn.Linear(96, 128)  # e.g. a tensor type the kernels cannot read
    assert not model.build_native_layers() and model.model.native is None


def test_int8_activations_change_the_numbers_only_slightly() -> None:
    exact, int8 = quantized_llama(), quantized_llama(int8=True)
    assert exact.build_native_layers() and int8.build_native_layers()
    tables = [list(range(12))]
    a, b = caches(exact, torch.float32), caches(int8, torch.float32)
    ref = step(exact, a, [9], [0], tables, native=True, seed=1)
    got = step(int8, b, [9], [0], tables, native=True, seed=1)
    assert not torch.equal(got, ref)
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()  # three layers of random weights: errors compound


def quantized_gemma(seed: int = 0, int8: bool = False) -> Gemma3ForCausalLM:
    """A random Gemma 3 (local and global layers, each with its own RoPE base; q/k norms; a norm before and after
    attention and the MLP) whose linears are GGUF blocks as a Q4_K_M file mixes them: Q5_0 read through QU8, and
    v in Q8_0 every other layer, so q/k/v fuse only once repacked to one format; in the even layers gate in Q4_0 and
    up in Q4_1 (fused as QU4), in the last q and k in Q4_0 (fused with its Q8_0 v as QU8). ``int8``: with int8
    activations (the parts repacked for the int8 kernel first, so fusing takes their tiles apart and back)."""
    cfg = Gemma3Config.from_hf({
        "vocab_size": 64, "hidden_size": 128, "intermediate_size": 96, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "sliding_window": 7,
        "sliding_window_pattern": 2, "rope_theta": 1e6, "rope_local_base_freq": 1e4, "max_position_embeddings": 256,
        "query_pre_attn_scalar": 24,
    })  # fmt: skip
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(cfg).eval()
    blocks = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0.0, 0.3)  # the norms scale by 1 + weight
                continue
            w = (torch.randn_like(p) * 0.15).numpy()
            if name.startswith("model.layers."):
                layer = int(name.split(".")[2])
                qtype = "Q5_0"
                if "v_proj" in name and layer % 2:
                    qtype = "Q8_0"
                elif name.endswith(("q_proj.weight", "k_proj.weight")) and layer == cfg.num_hidden_layers - 1:
                    qtype = "Q4_0"
                elif name.endswith(("gate_proj.weight", "up_proj.weight")) and layer % 2 == 0:
                    qtype = "Q4_0" if "gate" in name else "Q4_1"
                w, blocks[name] = as_gguf(w, qtype)
            p.copy_(torch.from_numpy(w))
    assert attach_gguf_blocks(model, blocks, tied=True, int8=int8) == len(blocks)
    assert fuse_projections(model) == 2 * cfg.num_hidden_layers  # the Q8_0 v layers too, as QU8
    formats = [(layer.self_attn.qkv_proj.qtype, layer.mlp.gate_up_proj.qtype) for layer in model.model.layers]
    assert formats == [("QU8", "QU4"), ("QU8", "QU8"), ("QU8", "QU4"), ("QU8", "QU8")]
    return model


@pytest.mark.parametrize("int8", [False, True], ids=["fp32 activations", "int8 activations"])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gemma_native_layers_equal_the_module_path_bit_for_bit(kv_dtype: torch.dtype, int8: bool) -> None:
    # prompts of 9 to 30 tokens pass the sliding window of 7: the local layers see only their window
    model = quantized_gemma(int8=int8)
    assert all(m.int8 == int8 for m in model.modules() if isinstance(m, GGUFLinear) and m.out_features % 8 == 0)
    assert_native_steps_equal_module_steps(model, kv_dtype)


def test_gemma_fused_int8_layers_hold_the_tiles_of_their_parts_in_one_format() -> None:
    """Fusing int8 layers of different formats (Q5_0 q/k with a Q8_0 v: QU8) takes each part's tiles back to
    blocks, repacks them exactly, and tiles them again: the same tiles as fusing the fp32 layers, then tiling."""
    exact, int8 = quantized_gemma(seed=2), quantized_gemma(seed=2, int8=True)
    for a, b in zip(exact.model.layers, int8.model.layers, strict=True):
        for slot in (a.self_attn.qkv_proj, b.self_attn.qkv_proj), (a.mlp.gate_up_proj, b.mlp.gate_up_proj):
            fp32, tiled = slot
            assert tiled.int8 and tiled.qtype == fp32.qtype
            assert torch.equal(tiled.blocks, kernels.repack_i8(fp32.blocks, fp32.qtype))


def test_gemma_layers_on_the_kernels_match_the_torch_module_path() -> None:
    """The kernels Gemma's module path calls (its norms' 1 + w, GELU-tanh-and-mul, QU8 linears) against plain
    PyTorch math on the same weights: close, as fp32 in another summation order."""
    model = quantized_gemma(seed=3)
    prompts, tables = [9, 30], [list(range(0, 12)), list(range(12, 24))]
    got = step(model, caches(model, torch.float32), prompts, [0, 0], tables, native=False, seed=1)
    plain = quantized_gemma(seed=3)
    for module in plain.modules():  # every linear unfused, on F.linear and its fp32 weight; norms and GELU in torch
        if isinstance(module, nn.Linear):
            module.forward = types.MethodType(lambda self, x: F.linear(x, self.weight, self.bias), module)
        for slot in ("qkv_proj", "gate_up_proj"):
            if hasattr(module, slot):
                setattr(module, slot, None)
    with mock.patch.object(kernels, "available", lambda: False):
        ref = step(plain, caches(plain, torch.float32), prompts, [0, 0], tables, native=False, seed=1)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
