"""Llama-family decoder layers as one native call each (``agora.kernels.llama_layer``).

On a CPU, a single-stream decode step is small enough that dispatch dominates: each
layer made about a dozen calls (norm, QKV, RoPE, cache write, attention, o_proj,
residual, norm, gate/up, SiLU, down, residual), each through ctypes or PyTorch's
dispatcher and each with a fresh output tensor. Here a layer is one call over
preallocated scratch that runs the very same kernels in the same order, so the
hidden states are bit for bit those of the module path; it only takes over where
that path would use the kernels anyway:

- every linear of every layer reads GGUF Q4_1/Q8_0 blocks, q/k/v and gate/up fused
  (``models.quant``), the weights fp32 on the CPU;
- the step has at most ``MAX_KERNEL_ROWS`` tokens (beyond that the linears use fp32
  GEMMs, which win on prefill chunks);
- the attention backend can describe the step to the kernels (``PagedAttention.native``:
  a CPU cache in fp32 or fp16).
"""

from __future__ import annotations

import torch
from torch import nn

from agora import kernels
from agora.models.quant import MAX_KERNEL_ROWS, GGUFLinear


def _blocks(layer: nn.Module | None, in_features: int) -> kernels.QLinear | None:
    if not isinstance(layer, GGUFLinear) or layer.qtype not in kernels.QTYPES or layer.in_features != in_features:
        return None
    return kernels.qlinear(layer.blocks, layer.qtype, layer.in_features, layer.bias, layer.int8)


class NativeLlamaLayers:
    """The layers of a ``LlamaModel`` as structs the kernels read; ``build`` returns None where
    some layer cannot run natively (the model then keeps its module path)."""

    def __init__(self, weights: list[kernels.LlamaWeights], cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.weights = weights
        self.cos, self.sin = cos, sin
        self.scratch = kernels.llama_scratch(weights[0], MAX_KERNEL_ROWS)

    @classmethod
    def build(cls, model: nn.Module) -> NativeLlamaLayers | None:
        if not kernels.available() or not len(model.layers):  # type: ignore[arg-type]
            return None
        weights = []
        for i, layer in enumerate(model.layers):  # type: ignore[arg-type]
            attn, mlp = layer.self_attn, layer.mlp
            hidden = layer.input_layernorm.weight.shape[0]
            qkv, o = _blocks(attn.qkv_proj, hidden), _blocks(attn.o_proj, attn.num_heads * attn.head_dim)
            gate_up, down = _blocks(mlp.gate_up_proj, hidden), _blocks(mlp.down_proj, mlp.down_proj.in_features)
            tensors = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
            if attn.q_norm is not None:
                tensors += [attn.q_norm.weight, attn.k_norm.weight]
            if None in (qkv, o, gate_up, down) or any(
                t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() for t in tensors
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
                    tensors[0].data_ptr(),
                    tensors[1].data_ptr(),
                    attn.q_norm.weight.data_ptr() if attn.q_norm is not None else None,
                    attn.k_norm.weight.data_ptr() if attn.k_norm is not None else None,
                    qkv,
                    o,
                    gate_up,
                    down,
                )  # fmt: skip
            )
        rotary = model.layers[0].self_attn.rotary  # type: ignore[index]
        return cls(weights, rotary.cos, rotary.sin)

    def runs(self, x: torch.Tensor, positions: torch.Tensor) -> bool:
        """Whether this step goes through the native layers (else the module path)."""
        return (
            x.shape[0] <= MAX_KERNEL_ROWS
            and x.dtype == torch.float32
            and x.device.type == "cpu"
            and positions.dtype == torch.int64
            and not torch.is_grad_enabled()
        )

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attention: kernels.Attention) -> torch.Tensor:
        """Every layer on ``x [T, hidden]`` in place (``x`` is the step's own embedding output)."""
        x, positions = x.contiguous(), positions.contiguous()
        for w in self.weights:
            kernels.llama_layer(w, attention, x, positions, self.cos, self.sin, self.scratch)
        return x
