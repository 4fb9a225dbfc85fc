"""Building blocks shared by the model families."""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch import nn

from agora import kernels
from agora.models.native import NativeLlamaLayers


class PagedAttention(Protocol):
    """What a model's attention layer calls; implemented by the engine's backend.

    ``q`` is ``[T, num_heads, head_dim]``, ``k``/``v`` are ``[T, num_kv_heads, head_dim]``
    for the T tokens of this step (all requests flattened). The backend writes k/v
    into the paged cache of layer ``layer`` and returns ``[T, num_heads, head_dim]``.
    """

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...

    def native(self) -> kernels.Attention | None:
        """This step's attention as the native decoder layers read it (``models.native``), or
        None where the kernels cannot (a GPU cache, a cache dtype they do not read)."""
        ...


def kernel_rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor | None:
    """``x`` normalized and multiplied by ``scale`` through the CPU kernel (one call where torch's CPU rms_norm
    runs five ops), or None where the kernel does not apply (not fp32 on the CPU, autograd on, no kernels)."""
    if (
        x.dtype == scale.dtype == torch.float32
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and kernels.available()
    ):
        return kernels.rms_norm(x, scale, eps)
    return None


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op; the cast below is HF's rule for half types
            y = kernel_rms_norm(x, self.weight, self.eps)
            return y if y is not None else torch.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_len = scaling.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_len / low_freq_factor
    high_freq_wavelen = old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# The shape of every Llama 3.x release's scaling (3.1: factor 8, 3.2: factor 32).
LLAMA3_ROPE_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def llama3_scaling_from_factors(factors: torch.Tensor, theta: float, head_dim: int) -> dict[str, Any] | None:
    """The Llama 3 rope scaling that divides each frequency by ``factors`` (llama.cpp's ``rope_freqs``
    tensor, which a GGUF stores instead of the config's four numbers), as ``_llama3_inv_freq`` computes it;
    None where every factor is 1. A ValueError where no Llama 3 scaling divides by these factors."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    f = factors.detach().to(torch.float64).flatten()
    if f.shape != inv_freq.shape or not bool(torch.isfinite(f).all()) or float(f.min()) <= 0:
        raise ValueError(
            f"rope_freqs holds {f.numel()} factors; a head of {head_dim} has {inv_freq.numel()} frequencies"
        )
    if bool((f == 1).all()):
        return None
    factor = float(f.max())
    candidates = [{"rope_type": "llama3", "factor": factor, **LLAMA3_ROPE_DEFAULTS}]
    between = (f > 1 + 1e-6) & (f < factor * (1 - 1e-6))
    if int(between.sum()) >= 2 and factor > 1:
        # Between the bands, s = (old / wavelen - low) / (high - low) is linear in 1 / wavelen, where
        # 1 / f = (1 - s) / factor + s. Only old / (high - low) and low / (high - low) matter: low is set to 1.
        x = inv_freq.to(torch.float64)[between] / (2 * math.pi)
        s = (1 / f[between] - 1 / factor) / (1 - 1 / factor)
        slope = float(((x - x.mean()) * (s - s.mean())).sum() / ((x - x.mean()) ** 2).sum())
        intercept = float(s.mean() - slope * x.mean())  # = -low / (high - low)
        if slope > 0 and intercept < 0:
            span = -1 / intercept  # high - low, with low = 1
            old = slope * span
            candidates.append({"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                               "high_freq_factor": round(1 + span, 4),
                               "original_max_position_embeddings": round(old)})  # fmt: skip
    want = inv_freq.to(torch.float64) / f
    for scaling in candidates:
        got = _llama3_inv_freq(inv_freq, scaling).to(torch.float64)
        if torch.allclose(got, want, rtol=1e-4, atol=0.0):
            return scaling
    raise ValueError("the rope_freqs tensor is not a Llama 3 rope scaling (the only kind of rope_freqs supported)")


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (the "rotate half" layout of HF Llama).

    cos/sin are precomputed for every position up to ``max_positions`` and
    gathered by position, so mixed batches of any positions cost one index.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope scaling {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        t = torch.arange(max_positions, dtype=torch.int64).float()
        if rope_type == "linear":
            t = t / scaling["factor"]  # type: ignore[index]
        elif rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)  # type: ignore[arg-type]
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [T, H, D], k: [T, Hkv, D]
        if (
            q.dtype == k.dtype == torch.float32
            and q.device.type == "cpu"
            and q.stride()[1:] == (q.shape[2], 1)
            and k.stride()[1:] == (k.shape[2], 1)
            and not torch.is_grad_enabled()
            and kernels.available()
        ):
            kernels.rope_(q, k, positions, self.cos, self.sin)  # in place: q and k are this step's own
            return q, k
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def load_named_weights(
    model: nn.Module, weights: dict[str, torch.Tensor], tied_embeddings: bool, elsewhere: frozenset[str] = frozenset()
) -> None:
    """Copy an HF-named state dict into ``model``; a missing or unexpected tensor is an error, but for the
    ``elsewhere`` ones (a GGUF's blocks only: their layers never read the fp32 weight, left unwritten)."""
    params = dict(model.named_parameters())
    skip = {"lm_head.weight"} if tied_embeddings else set()
    missing = set(params) - set(weights) - skip - elsewhere
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    for name, tensor in weights.items():
        if name.endswith("rotary_emb.inv_freq") or (name in skip):
            continue
        param = params.get(name)
        if param is None:
            raise ValueError(f"checkpoint has an unexpected tensor {name!r}")
        if param.shape != tensor.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(tensor)


class PagedCausalLM(nn.Module):
    """What every model family shares: HF-named ``model`` + ``lm_head`` (tied when the
    config says so) and the properties the engine sizes the KV cache and attention by.
    Families set ``config_class`` and define ``attention_scale`` and ``layer_sliding_windows``."""

    config_class: type

    def __init__(self, cfg: Any, model: nn.Module) -> None:
        super().__init__()
        self.config = cfg
        self.model = model
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # type: ignore[union-attr]

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def kv_shape(self) -> tuple[int, int]:
        """(num_kv_heads, head_dim) of every layer's KV cache."""
        return self.config.num_key_value_heads, self.config.head_dim

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: PagedAttention) -> torch.Tensor:
        """Hidden states ``[T, hidden]`` of the T flattened tokens."""
        return self.model(input_ids, positions, attn)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_weights(self, weights: dict[str, torch.Tensor], elsewhere: frozenset[str] = frozenset()) -> None:
        load_named_weights(self, weights, self.config.tie_word_embeddings, elsewhere)

    def build_native_layers(self) -> bool:
        """Run each decoder layer as one native call where the family can (its model has a
        ``native`` slot: Llama, Gemma 3; called once the weights are final: GGUF blocks attached
        and fused); returns whether it does."""
        if not hasattr(self.model, "native"):
            return False
        self.model.native = NativeLlamaLayers.build(self.model)
        return self.model.native is not None
