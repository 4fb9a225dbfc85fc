"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2/2.5, Qwen3) as a plain ``nn.Module``.

The members differ only in switches: q/k/v bias (Qwen2), per-head RMSNorm of q and
k before RoPE (Qwen3), a sliding attention window (Mistral).

Parameter names match Hugging Face's ``LlamaForCausalLM``, so a safetensors
state dict loads as it is. Activations are flat: ``[T, hidden]`` for the T
tokens of every request in the step, with no batch or padding dimension.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from agora import kernels
from agora.models.layers import PagedAttention, PagedCausalLM, RMSNorm, RotaryEmbedding
from agora.models.native import NativeLlamaLayers


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    hidden_act: str = "silu"

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> LlamaConfig:
        heads = cfg["num_attention_heads"]
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r} for the Llama family (only 'silu')")
        model_type = cfg.get("model_type", "llama")
        partial = cfg.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
        if partial != 1.0:
            raise ValueError(
                f"rope over part of each head (partial_rotary_factor {partial}, e.g. Phi-4-mini) is not supported"
            )
        bias = bool(cfg.get("attention_bias", False))
        qkv_bias, o_bias = bias, bias
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        window = cfg.get("sliding_window")
        if model_type in ("qwen2", "qwen3"):
            if cfg.get("use_sliding_window"):
                raise ValueError("Qwen sliding-window attention (use_sliding_window) is not supported")
            window = None
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta", rope.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            qk_norm=model_type == "qwen3",
            mlp_bias=cfg.get("mlp_bias", False),
            sliding_window=window,
            hidden_act=act,
        )


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=cfg.o_bias)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.rotary = rotary
        self.qkv_proj: nn.Module | None = None  # q, k and v in one layer, set by models.quant.fuse_projections
        self.qkv_sizes = [self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d]

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attn: PagedAttention) -> torch.Tensor:
        t = x.shape[0]
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self.qkv_sizes, -1)
            q = q.view(t, self.num_heads, self.head_dim)
            k = k.view(t, self.num_kv_heads, self.head_dim)
            v = v.view(t, self.num_kv_heads, self.head_dim)
        else:
            q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
            k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
            v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        out = attn(self.layer_idx, q, k, v)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.gate_up_proj: nn.Module | None = None  # gate and up in one layer, set by models.quant.fuse_projections

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate_up = self.gate_up_proj(x)
            if gate_up.dtype == torch.float32 and gate_up.device.type == "cpu" and not torch.is_grad_enabled():
                return self.down_proj(kernels.silu_mul(gate_up))  # fused: set only where the kernels load
            gate, up = gate_up.chunk(2, -1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_idx, rotary)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attn: PagedAttention) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i, rotary) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Every layer as one native call, set by the loader where every linear reads GGUF blocks (models.native).
        self.native: NativeLlamaLayers | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: PagedAttention) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.native is not None and (out := self.native.try_forward(x, positions, attn)) is not None:
            return self.norm(out)
        for layer in self.layers:
            x = layer(x, positions, attn)
        return self.norm(x)


class LlamaForCausalLM(PagedCausalLM):
    config_class = LlamaConfig

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__(cfg, LlamaModel(cfg))

    @property
    def attention_scale(self) -> float:
        return self.config.head_dim**-0.5

    @property
    def layer_sliding_windows(self) -> list[int | None]:
        """Per layer: how many most recent positions a query sees (None = all)."""
        return [self.config.sliding_window] * self.config.num_hidden_layers


class Phi3ForCausalLM(LlamaForCausalLM):
    """Phi-3 (and Phi-4): a Llama, or a Mistral with its sliding window, whose checkpoints store q/k/v as one
    ``qkv_proj`` and gate/up as one ``gate_up_proj``: split here into the Llama layers' own weights (fused again
    for the CPU kernels, as any family's are). Long-context Phi-3 (``longrope``) is refused by the rotary."""

    def load_weights(self, weights: dict[str, torch.Tensor], elsewhere: frozenset[str] = frozenset()) -> None:
        cfg = self.config
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        super().load_weights(split_phi3_weights(weights, q, kv), elsewhere)


def split_phi3_weights(weights: dict[str, Any], q: int, kv: int) -> dict[str, Any]:
    """Phi-3's fused ``qkv_proj`` / ``gate_up_proj`` rows as the Llama names ``q_proj``, ``k_proj``, ``v_proj``
    (``q``, ``kv`` and ``kv`` rows) and ``gate_proj``, ``up_proj`` (row slices: a GGUF's block rows split the
    same way)."""
    out: dict[str, Any] = {}
    for name, w in weights.items():
        if name.endswith("self_attn.qkv_proj.weight"):
            base = name.removesuffix("qkv_proj.weight")
            out.update({f"{base}q_proj.weight": w[:q], f"{base}k_proj.weight": w[q : q + kv],
                        f"{base}v_proj.weight": w[q + kv : q + 2 * kv]})  # fmt: skip
        elif name.endswith("mlp.gate_up_proj.weight"):
            base, half = name.removesuffix("gate_up_proj.weight"), w.shape[0] // 2
            out.update({f"{base}gate_proj.weight": w[:half], f"{base}up_proj.weight": w[half:]})
        else:
            out[name] = w
    return out
