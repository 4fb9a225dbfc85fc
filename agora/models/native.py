"""Llama-family decoder layers as one native call each (``agora.kernels.llama_layer``).

On a CPU, a single-stream decode step is small enough that dispatch dominates: each
layer made about a dozen calls (norm, QKV, RoPE, cache write, attention, o_proj,
residual, norm, gate/up, SiLU, down, residual), each through ctypes or PyTorch's
dispatcher and each with a fresh output tensor. Here a layer is one call over
preallocated scratch that runs the very same kernels in the same order, so the
hidden states are bit for bit those of the module path; it only takes over where
that path would use the kernels anyway:

- every linear of every layer reads GGUF blocks (Q4_1, Q8_0, or QU8 / QU4 repacked from the
  other formats), q/k/v and gate/up fused (``models.quant``), the weights fp32 on the CPU;
- the step has at most as many tokens as every linear's ``kernel_rows`` (beyond that the
  linears use GEMMs, which win on prefill chunks);
- the attention backend can describe the step to the kernels (``PagedAttention.native``:
  a CPU cache in fp32 or fp16).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from agora import kernels
from agora.models.quant import GGUFLinear

if TYPE_CHECKING:
    from agora.models.layers import PagedAttention


def _blocks(layer: nn.Module | None, in_features: int) -> kernels.QLinear | None:
    if not isinstance(layer, GGUFLinear) or layer.qtype not in kernels.QTYPES or layer.in_features != in_features:
        return None
    return kernels.qlinear(layer.blocks, layer.qtype, layer.in_features, layer.bias, layer.int8)


class NativeLlamaLayers:
    """The layers of a ``LlamaModel`` as structs the kernels read; ``build`` returns None where
    some layer cannot run natively (the model then keeps its module path)."""

    def __init__(self, weights: list[kernels.LlamaWeights], rope: list[tuple[torch.Tensor, torch.Tensor]],
                 max_rows: int) -> None:  # fmt: skip
        self.weights = weights
        self.rope = rope  # each layer's cos and sin tables (Gemma's local and global layers have their own)
        self.max_rows = max_rows  # the most tokens a step may have: where every linear would take its kernel
        self.scratch = kernels.llama_scratch(weights[0], max_rows)

    @classmethod
    def build(cls, model: nn.Module) -> NativeLlamaLayers | None:
        if not kernels.available() or not len(model.layers):  # type: ignore[arg-type]
            return None
        weights, rope, kernel_rows = [], [], []
        for i, layer in enumerate(model.layers):  # type: ignore[arg-type]
            attn, mlp = layer.self_attn, layer.mlp
            hidden = layer.input_layernorm.weight.shape[0]
            qkv, o = _blocks(attn.qkv_proj, hidden), _blocks(attn.o_proj, attn.num_heads * attn.head_dim)
            gate_up, down = _blocks(mlp.gate_up_proj, hidden), _blocks(mlp.down_proj, mlp.down_proj.in_features)
            # Gemma 3 (a norm before and after each block, GELU-tanh) or Llama (a norm before each, SiLU)
            gemma = hasattr(layer, "pre_feedforward_layernorm")
            pre_mlp = layer.pre_feedforward_layernorm if gemma else layer.post_attention_layernorm
            post = (layer.post_attention_layernorm, layer.post_feedforward_layernorm) if gemma else ()
            norms = [layer.input_layernorm, pre_mlp, *post]
            if attn.q_norm is not None:
                norms += [attn.q_norm, attn.k_norm]
            tensors = {id(n): _norm_scale(n) for n in norms}
            if None in (qkv, o, gate_up, down) or any(
                t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() for t in tensors.values()
            ):
                return None
            weights.append(
                kernels.LlamaWeights(
                    i,
                    hidden,
                    attn.num_heads,
                    attn.num_kv_heads,
                    attn.head_dim,
                    mlp.down_proj.in_features,
                    layer.input_layernorm.eps,
                    tensors[id(layer.input_layernorm)].data_ptr(),
                    tensors[id(pre_mlp)].data_ptr(),
                    tensors[id(attn.q_norm)].data_ptr() if attn.q_norm is not None else None,
                    tensors[id(attn.k_norm)].data_ptr() if attn.k_norm is not None else None,
                    qkv,
                    o,
                    gate_up,
                    down,
                    tensors[id(post[0])].data_ptr() if post else None,
                    tensors[id(post[1])].data_ptr() if post else None,
                    int(gemma),
                )  # fmt: skip
            )
            rope.append((attn.rotary.cos, attn.rotary.sin))
            # all four are GGUFLinear (_blocks said so): a step runs natively where each takes its kernel
            kernel_rows += [m.kernel_rows for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
        return cls(weights, rope, min(kernel_rows))

    def runs(self, x: torch.Tensor, positions: torch.Tensor) -> bool:
        """Whether this step goes through the native layers (else the module path)."""
        return (
            x.shape[0] <= self.max_rows
            and x.dtype == torch.float32
            and x.device.type == "cpu"
            and positions.dtype == torch.int64
            and not torch.is_grad_enabled()
        )

    def try_forward(self, x: torch.Tensor, positions: torch.Tensor, attn: PagedAttention) -> torch.Tensor | None:
        """Every layer on ``x`` natively where this step can run so (``runs``, and the attention backend can
        describe it), else None: the caller takes its module path."""
        described = attn.native() if self.runs(x, positions) else None
        return None if described is None else self.forward(x, positions, described)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attention: kernels.Attention) -> torch.Tensor:
        """Every layer on ``x [T, hidden]`` in place (``x`` is the step's own embedding output)."""
        x, positions = x.contiguous(), positions.contiguous()
        for w, (cos, sin) in zip(self.weights, self.rope, strict=True):
            kernels.llama_layer(w, attention, x, positions, cos, sin, self.scratch)
        return x


def _norm_scale(norm: nn.Module) -> torch.Tensor:
    """What a norm multiplies by: its weight, or Gemma's ``1 + weight`` (kept by the norm, so it outlives the struct)."""
    scale = getattr(norm, "scale", None)
    return scale() if callable(scale) else norm.weight
