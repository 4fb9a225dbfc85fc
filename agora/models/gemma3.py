"""Gemma 3 (text) as a plain ``nn.Module``, with Hugging Face parameter names.

What sets it apart from Llama: local sliding-window layers interleaved with global
ones (each with its own RoPE base), RMSNorm of q and k per head, norms that scale by
``1 + weight``, a norm after attention and after the MLP as well as before, a
GELU-tanh MLP, embeddings scaled by ``sqrt(hidden_size)``, and an attention scale
of ``query_pre_attn_scalar ** -0.5``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from agora import kernels
from agora.models.layers import PagedAttention, PagedCausalLM, RotaryEmbedding, kernel_rms_norm
from agora.models.native import NativeLlamaLayers

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass(frozen=True)
class Gemma3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    sliding_window: int
    layer_types: tuple[str, ...]
    rope: dict[str, tuple[float, dict[str, Any] | None]]  # layer type -> (theta, scaling)
    query_pre_attn_scalar: float
    final_logit_softcapping: float | None = None
    tie_word_embeddings: bool = True

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> Gemma3Config:
        if cfg.get("attn_logit_softcapping"):
            raise ValueError("Gemma attention logit soft-capping is not supported")
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"unsupported Gemma 3 activation {act!r}")
        n_layers = cfg["num_hidden_layers"]
        layer_types = cfg.get("layer_types")
        if not layer_types:
            pattern = cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6
            layer_types = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n_layers)]
        params = cfg.get("rope_parameters") or {}
        rope: dict[str, tuple[float, dict[str, Any] | None]] = {}
        for kind, default_theta in (
            (FULL, cfg.get("rope_theta", 1e6)),
            (SLIDING, cfg.get("rope_local_base_freq", 1e4)),
        ):
            p = params.get(kind) or {}
            theta = float(p.get("rope_theta", default_theta))
            scaling = p if p.get("rope_type", "default") != "default" else None
            if kind == FULL and scaling is None and cfg.get("rope_scaling"):
                scaling = cfg["rope_scaling"]
            rope[kind] = (theta, scaling)
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position_embeddings=cfg.get("max_position_embeddings", 32768),
            sliding_window=cfg.get("sliding_window") or 4096,
            layer_types=tuple(layer_types),
            rope=rope,
            query_pre_attn_scalar=cfg.get("query_pre_attn_scalar") or head_dim,
            final_logit_softcapping=cfg.get("final_logit_softcapping"),
            tie_word_embeddings=cfg.get("tie_word_embeddings", True),
        )


class GemmaRMSNorm(nn.Module):
    """RMSNorm scaling by ``1 + weight`` (zero-initialized), computed in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps
        self._scale: tuple[tuple[int, int], torch.Tensor] | None = None  # (the weight's storage and version, 1 + w)

    def scale(self) -> torch.Tensor:
        """``1 + weight``, computed again only when the weight changed."""
        key = (self.weight.data_ptr(), self.weight._version)
        if self._scale is None or self._scale[0] != key:
            self._scale = key, (1.0 + self.weight).detach().contiguous()
        return self._scale[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:  # a step of the 270M model has 108 of these norms
            y = kernel_rms_norm(x, self.scale(), self.eps)
            if y is not None:
                return y
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class Gemma3Attention(nn.Module):
    def __init__(self, cfg: Gemma3Config, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)
        self.q_norm = GemmaRMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(d, cfg.rms_norm_eps)
        self.rotary = rotary
        self.qkv_proj: nn.Module | None = None  # q, k and v in one layer, set by models.quant.fuse_projections
        self.qkv_sizes = [self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d]

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attn: PagedAttention) -> torch.Tensor:
        t = x.shape[0]
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self.qkv_sizes, -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = self.q_norm(q.reshape(t, self.num_heads, self.head_dim))
        k = self.k_norm(k.reshape(t, self.num_kv_heads, self.head_dim))
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(attn(self.layer_idx, q, k, v).reshape(t, self.num_heads * self.head_dim))


class Gemma3MLP(nn.Module):
    def __init__(self, cfg: Gemma3Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_proj: nn.Module | None = None  # gate and up in one layer, set by models.quant.fuse_projections

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate_up = self.gate_up_proj(x)
            if gate_up.dtype == torch.float32 and gate_up.device.type == "cpu" and not torch.is_grad_enabled():
                return self.down_proj(kernels.gelu_tanh_mul(gate_up))  # fused: set only where the kernels load
            gate, up = gate_up.chunk(2, -1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: Gemma3Config, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        eps = cfg.rms_norm_eps
        self.self_attn = Gemma3Attention(cfg, layer_idx, rotary)
        self.mlp = Gemma3MLP(cfg)
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attn: PagedAttention) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), positions, attn))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3Model(nn.Module):
    def __init__(self, cfg: Gemma3Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = nn.ModuleDict(
            {
                kind: RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, theta, scaling)
                for kind, (theta, scaling) in cfg.rope.items()
            }
        )
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(cfg, i, self.rotary[kind]) for i, kind in enumerate(cfg.layer_types)
        )
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.embed_scale = cfg.hidden_size**0.5
        # Every layer as one native call, set by the loader where every linear reads GGUF blocks (models.native).
        self.native: NativeLlamaLayers | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: PagedAttention) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        if self.native is not None and (out := self.native.try_forward(x, positions, attn)) is not None:
            return self.norm(out)
        for layer in self.layers:
            x = layer(x, positions, attn)
        return self.norm(x)


class Gemma3ForCausalLM(PagedCausalLM):
    config_class = Gemma3Config

    def __init__(self, cfg: Gemma3Config) -> None:
        super().__init__(cfg, Gemma3Model(cfg))

    @property
    def attention_scale(self) -> float:
        return self.config.query_pre_attn_scalar**-0.5

    @property
    def layer_sliding_windows(self) -> list[int | None]:
        return [self.config.sliding_window if t == SLIDING else None for t in self.config.layer_types]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        cap = self.config.final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap else logits
