"""Load a model from a Hugging Face folder (config.json + safetensors) or a GGUF file.

Both paths end in the same place: an HF-style config dict, an HF-named state
dict, a model class from the registry, and a folder of tokenizer files that
``transformers.AutoTokenizer`` reads. GGUF tensors are dequantized to the working
dtype; on CPU in fp32 the blocks are kept too, for the decode kernels (``models.quant``):
Q8_0 as it is (Q4_1 too for int8 activations), the other formats repacked (``models.gguf_repack``). A GGUF's
tokenizer is converted once by transformers and cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from agora import envs
from agora.models.gguf_file import GGUFFile, dequantize
from agora.models.layers import llama3_scaling_from_factors
from agora.models.llama import split_phi3_weights
from agora.models.registry import GGUF_ARCHITECTURES, model_class

logger = logging.getLogger(__name__)


@dataclass
class ModelFiles:
    """Where a model's parts come from, before anything heavy is read."""

    source: Path
    hf_config: dict[str, Any]
    architecture: str
    tokenizer_dir: Path | None
    eos_token_ids: list[int] = field(default_factory=list)
    is_gguf: bool = False
    gguf_arch: str | None = None
    gguf_fp32_bytes: int = 0  # what fp32 copies of a GGUF's 2-D weights (the embedding's too) would take

    @property
    def max_position_embeddings(self) -> int:
        return int(self.hf_config.get("max_position_embeddings") or 2048)


# -- Hugging Face folders ---------------------------------------------------------


def _hf_files(path: Path) -> ModelFiles:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{path} is not a model folder: config.json is missing")
    cfg = json.loads(config_path.read_text())
    archs = cfg.get("architectures") or []
    if not archs:
        raise ValueError(f"{config_path} names no architecture")
    eos: list[int] = []
    gen_path = path / "generation_config.json"
    for source in (json.loads(gen_path.read_text()) if gen_path.is_file() else {}, cfg):
        value = source.get("eos_token_id")
        if value is not None:
            eos = list(value) if isinstance(value, list) else [value]
            break
    has_tok = (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
    return ModelFiles(path, cfg, archs[0], path if has_tok else None, eos)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} has no .safetensors files")
    weights: dict[str, torch.Tensor] = {}
    for f in tqdm(files, desc="loading safetensors", unit="file", disable=len(files) < 2):
        weights.update(load_file(str(f)))
    return weights


# -- GGUF -----------------------------------------------------------------------------

_GGUF_TENSOR_NAMES = [
    (r"^token_embd\.weight$", "model.embed_tokens.weight"),
    (r"^output_norm\.weight$", "model.norm.weight"),
    (r"^output\.weight$", "lm_head.weight"),
    (r"^blk\.(\d+)\.attn_norm\.weight$", r"model.layers.\1.input_layernorm.weight"),
    (r"^blk\.(\d+)\.ffn_norm\.weight$", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"^blk\.(\d+)\.attn_q\.(weight|bias)$", r"model.layers.\1.self_attn.q_proj.\2"),
    (r"^blk\.(\d+)\.attn_k\.(weight|bias)$", r"model.layers.\1.self_attn.k_proj.\2"),
    (r"^blk\.(\d+)\.attn_v\.(weight|bias)$", r"model.layers.\1.self_attn.v_proj.\2"),
    (r"^blk\.(\d+)\.attn_output\.weight$", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"^blk\.(\d+)\.attn_q_norm\.weight$", r"model.layers.\1.self_attn.q_norm.weight"),
    (r"^blk\.(\d+)\.attn_k_norm\.weight$", r"model.layers.\1.self_attn.k_norm.weight"),
    (r"^blk\.(\d+)\.ffn_gate\.weight$", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"^blk\.(\d+)\.ffn_up\.weight$", r"model.layers.\1.mlp.up_proj.weight"),
    (r"^blk\.(\d+)\.ffn_down\.weight$", r"model.layers.\1.mlp.down_proj.weight"),
]
# Phi-3 keeps q/k/v and gate/up fused, as its Hugging Face checkpoints do (split by the model's load_weights).
_GGUF_PHI3_NAMES = [
    (r"^blk\.(\d+)\.attn_qkv\.weight$", r"model.layers.\1.self_attn.qkv_proj.weight"),
    (r"^blk\.(\d+)\.ffn_up\.weight$", r"model.layers.\1.mlp.gate_up_proj.weight"),
]
# Gemma has a norm after attention and around the MLP; llama.cpp's "ffn_norm" is its pre-MLP norm.
_GGUF_GEMMA3_NAMES = [
    (r"^blk\.(\d+)\.ffn_norm\.weight$", r"model.layers.\1.pre_feedforward_layernorm.weight"),
    (r"^blk\.(\d+)\.post_attention_norm\.weight$", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"^blk\.(\d+)\.post_ffw_norm\.weight$", r"model.layers.\1.post_feedforward_layernorm.weight"),
]

# Gemma's chat format, for GGUF files that carry no template (rendered in transformers' sandbox).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def gguf_to_hf_name(name: str, arch: str = "llama") -> str:
    extra = {"gemma3": _GGUF_GEMMA3_NAMES, "phi3": _GGUF_PHI3_NAMES}.get(arch, [])
    table = extra + _GGUF_TENSOR_NAMES
    for pattern, repl in table:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    raise ValueError(f"GGUF tensor {name!r} has no known Hugging Face name")


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q/k rows (it interleaves the two rotary halves).

    HF rows per head:      [x0 x1 ... x31 | y0 y1 ... y31]   (rotate-half layout)
    llama.cpp rows per head: [x0 y0 x1 y1 ... x31 y31]     (interleaved pairs)
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_config(gguf: GGUFFile) -> tuple[str, dict[str, Any]]:
    arch = gguf.metadata.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(sorted(GGUF_ARCHITECTURES))}")

    def meta(key: str, default: Any = None) -> Any:
        return gguf.metadata.get(f"{arch}.{key}", default)

    heads = meta("attention.head_count")
    hidden = meta("embedding_length")
    tensors = {t.name: t for t in gguf.tensors}
    tensor_names = set(tensors)
    vocab = meta("vocab_size") or len(gguf.metadata.get("tokenizer.ggml.tokens", ()))
    cfg: dict[str, Any] = {
        "architectures": [GGUF_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": int(heads),
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "head_dim": int(meta("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": gguf.metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": gguf.metadata.get("tokenizer.ggml.eos_token_id"),
    }
    rotary = meta("rope.dimension_count")
    if rotary is not None and int(rotary) != cfg["head_dim"]:
        raise ValueError(
            f"GGUF rope over {rotary} of a head's {cfg['head_dim']} dimensions (partial rotary) is not supported"
        )
    if arch == "phi3":
        if "rope_factors_long.weight" in tensors:
            raise ValueError(
                "long-context Phi-3 GGUFs (longrope: rope_factors_long) are not supported; the 4k ones are"
            )
        cfg["sliding_window"] = int(meta("attention.sliding_window", 0)) or None  # (0: Phi-4, no window)
    if arch == "gemma3":
        # What llama.cpp hard-codes for Gemma 3: every 6th layer global, local RoPE base 1e4.
        cfg.update(
            model_type="gemma3_text",
            sliding_window=int(meta("attention.sliding_window", 512)),
            sliding_window_pattern=6,
            rope_local_base_freq=10000.0,
            query_pre_attn_scalar=cfg["head_dim"],
            hidden_activation="gelu_pytorch_tanh",
        )
    scaling_type = meta("rope.scaling.type")
    if scaling_type == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(meta("rope.scaling.factor"))}
    elif scaling_type not in (None, "none"):
        raise ValueError(f"unsupported GGUF rope scaling {scaling_type!r}")
    if "rope_freqs.weight" in tensors:  # Llama 3.1 and later: the scaled frequencies' divisors
        if "rope_scaling" in cfg:
            raise ValueError("a GGUF with both rope_freqs and a rope scaling type is not supported")
        factors = torch.from_numpy(np.array(tensors["rope_freqs.weight"].data, dtype=np.float32))
        scaling = llama3_scaling_from_factors(factors, cfg["rope_theta"], cfg["head_dim"])
        if scaling is not None:
            cfg["rope_scaling"] = scaling
    return arch, cfg


# What ends a turn whatever a file names as its EOS: llama.cpp stops at these too (an instruct model's
# file often names only one of them: Llama 3's <|eot_id|> but not <|eom_id|> after a tool call).
END_OF_GENERATION = frozenset(
    s.encode() for s in ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                         "<|end_of_text|>", "<EOT>", "<end_of_utterance>")
)  # fmt: skip


def _end_of_generation_ids(gguf: GGUFFile) -> list[int]:
    """The ids of the special tokens (control or user-defined) that are in ``END_OF_GENERATION``."""
    tokens, types = gguf.metadata.get("tokenizer.ggml.tokens"), gguf.metadata.get("tokenizer.ggml.token_type")
    if tokens is None or types is None or len(types) != len(tokens):
        return []
    special = np.flatnonzero((np.asarray(types) == 3) | (np.asarray(types) == 4))  # CONTROL, USER_DEFINED
    return [int(i) for i in special if tokens.raw(int(i)) in END_OF_GENERATION]


def _gguf_tokenizer_dir(path: Path, arch: str) -> Path:
    """Convert a GGUF's tokenizer to HF files once (transformers does the conversion,
    which takes seconds), then reuse the cached folder."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = envs.cache_dir() / "tokenizers" / f"{path.stem}-{key}"
    if (out / "tokenizer.json").is_file():
        return out
    from transformers import AutoTokenizer

    logger.info("converting the tokenizer of %s (once; cached in %s)", path.name, out)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if not getattr(tok, "chat_template", None) and arch == "gemma3":
        tok.chat_template = GEMMA_CHAT_TEMPLATE
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    tok.save_pretrained(str(tmp))
    try:
        os.replace(tmp, out)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _gguf_files(path: Path) -> ModelFiles:
    gguf = GGUFFile(path)
    arch, cfg = _gguf_config(gguf)
    eos = [cfg["eos_token_id"]] if cfg.get("eos_token_id") is not None else []
    eos += [i for i in _end_of_generation_ids(gguf) if i not in eos]
    fp32_bytes = sum(4 * int(np.prod(t.dims)) for t in gguf.tensors if len(t.dims) == 2)
    return ModelFiles(path, cfg, cfg["architectures"][0], None, eos, True, arch, fp32_bytes)


def _read_gguf(
    path: Path, cfg: dict[str, Any], keep_blocks: bool = False, blocks_only: bool = False, int8: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[str, torch.Tensor]]]:
    """HF-named fp32 tensors, and (with ``keep_blocks``) the raw rows of the tensors stored
    in a block format the CPU kernels read (Q8_0; the other formats repacked to QU8 or QU4, but Q4_1 kept for
    ``int8`` activations, whose kernel reads it), with the same row order. ``blocks_only``: a tensor whose blocks
    are kept has no fp32 copy, each dequantized only while it is read."""
    from agora.models import gguf_repack

    as_stored = gguf_repack.AS_STORED_I8 if int8 else gguf_repack.AS_STORED
    gguf = GGUFFile(path)
    arch = gguf.metadata["general.architecture"]
    weights: dict[str, torch.Tensor] = {}
    blocks: dict[str, tuple[str, torch.Tensor]] = {}
    q_rows = cfg["num_attention_heads"] * cfg["head_dim"]  # (where Phi-3's fused q/k/v rows split)
    kv_rows = cfg["num_key_value_heads"] * cfg["head_dim"]
    for t in tqdm(gguf.tensors, desc=f"dequantizing {path.name}", unit="tensor", leave=False):
        if t.name == "rope_freqs.weight":  # read into the config (_gguf_config)
            continue
        name = gguf_to_hf_name(t.name, arch)
        qtype, raw = t.qtype.name, None
        native = keep_blocks and t.data.ndim == 2 and qtype in as_stored
        repacked = keep_blocks and t.data.ndim == 2 and not native and qtype in gguf_repack.FORMATS
        # with the blocks only, a tensor the kernels read as stored (or widened) needs no fp32 values at all
        widened = repacked and qtype in gguf_repack.WIDENED
        arr = None if (native or widened) and blocks_only else dequantize(t.data, t.qtype)
        if native:
            raw = t.data
        elif repacked:
            expected = None if widened else arr.reshape(t.data.shape[0], -1)
            raw, qtype = gguf_repack.repack(t.data, qtype, expected), gguf_repack.target(qtype)
        if arch == "phi3" and name.endswith(("qkv_proj.weight", "gate_up_proj.weight")):
            # fused rows split into the Llama layers' (whole rows: the blocks split alike)
            arrs, raws = ({} if w is None else split_phi3_weights({name: w}, q_rows, kv_rows) for w in (arr, raw))
            parts = [(part, arrs.get(part), raws.get(part)) for part in arrs or raws]
        else:
            parts = [(name, arr, raw)]
        for name, arr, raw in parts:
            if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = cfg["num_attention_heads"] if name.endswith("q_proj.weight") else cfg["num_key_value_heads"]
                arr = None if arr is None else unpermute_qk(arr, heads)
                raw = None if raw is None else unpermute_qk(raw, heads)  # whole rows move, blocks stay intact
            elif arch == "gemma3" and name.endswith("norm.weight"):
                arr = arr - 1.0  # llama.cpp stores Gemma's (1 + w) norm scale; HF keeps w
            if raw is not None:
                blocks[name] = (qtype, torch.from_numpy(np.array(raw, dtype=np.uint8, order="C")))
                if blocks_only:
                    continue
            weights[name] = torch.from_numpy(_writable_fp32(arr))
    return weights, blocks


def _writable_fp32(arr: np.ndarray) -> np.ndarray:
    """``arr`` as a writable, C-ordered fp32 array: itself where it already is one (what dequantizing makes,
    a fresh array nothing else holds), else a copy (an F32 tensor is a read-only view of the mapped file).
    Copying every tensor took a second of Gemma 3's load (its 671 MB embedding alone)."""
    if arr.dtype == np.float32 and arr.flags.c_contiguous and arr.flags.writeable:
        return arr
    return np.array(arr, dtype=np.float32, order="C")


# --gguf-weights auto keeps fp32 copies of the block layers' weights while they take at most this share
# of the memory available at load.
FP32_COPIES_SHARE = 0.4


def available_memory_bytes() -> int | None:
    """What this process may still take: /proc/meminfo's MemAvailable, less where a cgroup limits memory."""
    try:
        with open("/proc/meminfo") as f:
            meminfo = {line.split(":")[0]: line.split()[1] for line in f}
        available = int(meminfo["MemAvailable"]) * 1024
    except (OSError, KeyError, ValueError, IndexError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def keeps_fp32_copies(files: ModelFiles, gguf_weights: str, processes: int = 1) -> bool:
    """``--gguf-weights``: whether a GGUF's block layers also keep fp32 weights for long steps' GEMMs
    (``auto``: while ``processes`` engines' copies take at most ``FP32_COPIES_SHARE`` of the memory available)."""
    if gguf_weights != "auto":
        return gguf_weights == "fp32"
    need, available = files.gguf_fp32_bytes * processes, available_memory_bytes()
    if available is None or need <= FP32_COPIES_SHARE * available:
        return True
    logger.info(
        "%s: its layers keep their GGUF blocks only (fp32 copies for prefill GEMMs would take %.1f GiB of "
        "%.1f GiB available%s; --gguf-weights fp32 keeps them)", files.source.name, need / 2**30, available / 2**30,
        f", for {processes} engines" if processes > 1 else "",
    )  # fmt: skip
    return False


# -- entry points -----------------------------------------------------------------


@contextmanager
def _weights_uninitialized() -> Iterator[None]:
    """Build linear and embedding layers without their random initialisation: the checkpoint
    overwrites every weight (``load_named_weights`` refuses one it lacks), and drawing them
    took seconds for a large vocabulary (Gemma 3: 5 of a 30 s load)."""
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved  # type: ignore[method-assign]


def inspect_model(path: str | os.PathLike[str]) -> ModelFiles:
    """Read config and tokenizer location without loading weights."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        files = _gguf_files(p)
        files.tokenizer_dir = _gguf_tokenizer_dir(p, files.gguf_arch or "llama")
        return files
    if p.is_dir():
        return _hf_files(p)
    raise ValueError(f"{path} is neither a .gguf file nor a Hugging Face model folder")


def load_model(
    files: ModelFiles,
    dtype: torch.dtype,
    device: torch.device,
    cpu_kernels: bool = True,
    gemm_dtype: torch.dtype | None = None,
    int8_activations: bool = False,
    gguf_weights: str = "auto",
) -> nn.Module:
    """Build the registered model class and load its weights, on ``device`` in ``dtype``;
    ``gemm_dtype`` gives the decoder layers' linear weights and the lm_head's another dtype (bf16 on a CPU);
    ``int8_activations`` has the GGUF block kernels quantize their inputs to int8 (an error where
    no layer runs on them). ``gguf_weights`` (``keeps_fp32_copies``): whether the layers that read GGUF blocks
    keep fp32 weights too, for long steps' GEMMs. ``cpu_kernels=False`` keeps plain ``nn.Linear`` layers
    (for exporting)."""
    cls = model_class(files.architecture)
    config = cls.config_class.from_hf(files.hf_config)  # type: ignore[attr-defined]
    from agora import kernels
    from agora.models.quant import (
        PACK_GEMM_WEIGHTS,
        GGUFEmbedding,
        GGUFLinear,
        attach_gguf_blocks,
        cast_gemm_weights,
        cast_lm_head,
        drop_fp32_weights,
        fuse_projections,
        pack_gemm_weights,
    )

    # Decode on CPU in fp32 reads the GGUF blocks directly (agora/kernels); elsewhere fp32 weights only.
    keep_blocks = (
        cpu_kernels and files.is_gguf and device.type == "cpu" and dtype == torch.float32 and kernels.available()
    )
    blocks: dict[str, tuple[str, torch.Tensor]] = {}
    blocks_only = keep_blocks and not keeps_fp32_copies(files, gguf_weights)
    if blocks_only and gguf_weights == "blocks":  # (auto says why when it chooses so)
        logger.info("%s: its layers keep their GGUF blocks only (--gguf-weights blocks)", files.source.name)
    if files.is_gguf:
        weights, blocks = _read_gguf(files.source, files.hf_config, keep_blocks, blocks_only, int8_activations)
    else:
        weights = _read_safetensors(files.source)
    with _weights_uninitialized():
        model = cls(config)  # (the weights only blocks hold are allocated, never written: no memory taken)
    elsewhere = frozenset(blocks) - set(weights)  # (blocks only: the layers that never read an fp32 weight)
    model.load_weights(weights, elsewhere)  # type: ignore[operator]
    del weights
    model = model.to(device=device, dtype=dtype).eval()
    if gemm_dtype is not None and gemm_dtype != dtype:
        cast_gemm_weights(model.model.layers, gemm_dtype)  # type: ignore[union-attr, arg-type]
        cast_lm_head(model, gemm_dtype)
    if int8_activations and not any(qtype in kernels.I8_QTYPES for qtype, _ in blocks.values()):
        raise ValueError(
            "--gguf-activations int8 needs a GGUF model with block layers on the CPU kernels, in fp32 "
            f"({files.source.name} on {device.type} in {str(dtype).removeprefix('torch.')}"
            f"{'' if kernels.available() else ', no CPU kernels'} has none)"
        )
    if blocks:
        attach_gguf_blocks(model, blocks, bool(files.hf_config.get("tie_word_embeddings")), int8_activations)
        if blocks_only:
            drop_fp32_weights(model, blocks)
            readers = (GGUFLinear, GGUFEmbedding)
            unread = sorted(n for n in elsewhere if not isinstance(model.get_submodule(n.rpartition(".")[0]), readers))
            if unread:  # a tensor with blocks but no layer to read them: its weight was never loaded
                raise ValueError(
                    f"{files.source.name}: no layer reads the blocks of {unread[:3]}; try --gguf-weights fp32"
                )
        fuse_projections(model)
        if PACK_GEMM_WEIGHTS and not blocks_only:
            pack_gemm_weights(model)
        model.build_native_layers()  # type: ignore[operator]
    return model
