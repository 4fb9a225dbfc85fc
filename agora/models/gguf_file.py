"""A GGUF file's header and tensors, read straight from the mapped file.

gguf-py's ``GGUFReader`` builds a numpy view for every element of every metadata
array: for a 262k-token vocabulary (Gemma 3) that is about 15 s per open, paid by
every engine start. agora reads only a handful of keys and the tensors, so this
reader decodes scalars and strings, keeps number arrays as one numpy view each,
and reads string arrays (the vocabulary) lazily: one pass records where each
string starts, a string is decoded only when asked for.

Tensors come back shaped as gguf-py shapes them, so ``gguf.quants.dequantize`` and
the CPU kernels read them unchanged::

    float types (F32, F16, ...): dims reversed, e.g. [n_out, n_in], that element type
    block types (Q4_1, Q4_K, ...): [n_out, n_in / block_size * block_bytes] as uint8

File layout (little-endian; GGUF v2 and v3)::

    "GGUF" u32 version | u64 n_tensors | u64 n_kv
    n_kv x      (string key, u32 value type, value)
    n_tensors x (string name, u32 n_dims, u64 dims[n_dims], u32 ggml type, u64 offset)
    padding to `general.alignment` (32) | tensor data (each offset from here)
    string = u64 length + UTF-8 bytes; array = u32 element type, u64 count, elements
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# GGUF value type → struct format of one scalar (8 is a string, 9 an array).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# Tensor types stored as plain elements; anything else (BF16 too, as gguf-py keeps it) is read as byte rows.
_ELEMENT_DTYPES = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


class GGUFFormatError(ValueError):
    """The file is not a GGUF file agora can read, or it is truncated or corrupt."""


class StringArray(Sequence[str]):
    """A metadata array of strings, decoded one element at a time when read."""

    def __init__(self, buf: memoryview, starts: np.ndarray, lengths: np.ndarray) -> None:
        self._buf, self._starts, self._lengths = buf, starts, lengths

    def __len__(self) -> int:
        return len(self._starts)

    def raw(self, i: int) -> bytes:
        start = int(self._starts[i])
        return bytes(self._buf[start : start + int(self._lengths[i])])

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.raw(i).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    qtype: GGMLQuantizationType
    dims: tuple[int, ...]  # GGUF's order: the fastest-moving dimension first
    data: np.ndarray  # a read-only view of the mapped file, shaped as gguf-py shapes it


class GGUFFile:
    """The metadata (``metadata``: key → value) and tensors (``tensors``) of one GGUF file.
    Tensor data stays in the mapped file until someone reads it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError as exc:  # an empty file cannot be mapped
                raise GGUFFormatError(f"{self.path} is not a GGUF file: it is empty") from exc
        self._buf = memoryview(self._map)
        self._pos = 0
        if bytes(self._buf[:4]) != MAGIC:
            raise GGUFFormatError(f"{self.path} is not a GGUF file (no GGUF magic)")
        self._pos = 4
        version = self._scalar("I")
        if version not in VERSIONS:
            swapped = struct.unpack("<I", struct.pack(">I", version))[0]
            hint = " (a big-endian file)" if swapped in VERSIONS else ""
            raise GGUFFormatError(f"{self.path}: GGUF version {version} is not supported{hint}; supported: 2, 3")
        self.version = version
        n_tensors, n_kv = self._scalar("Q"), self._scalar("Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._scalar("I"))
        infos = [self._tensor_info() for _ in range(n_tensors)]
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFFormatError(f"{self.path}: general.alignment {alignment!r} is not a power of two")
        data_start = -(-self._pos // alignment) * alignment
        self.tensors = [self._tensor(data_start, *info) for info in infos]

    # -- reading the header --------------------------------------------------------

    def _take(self, n: int) -> int:
        start = self._pos
        if n < 0 or start + n > len(self._buf):
            raise GGUFFormatError(f"{self.path} is truncated or corrupt (a field runs past the end at byte {start})")
        self._pos = start + n
        return start

    def _scalar(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        return struct.unpack_from("<" + fmt, self._buf, self._take(size))[0]

    def _string(self) -> str:
        n = self._scalar("Q")
        start = self._take(n)
        return bytes(self._buf[start : start + n]).decode("utf-8", errors="replace")

    def _value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self._scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            etype, count = self._scalar("I"), self._scalar("Q")
            if etype in _SCALARS:
                dtype = np.dtype("<" + _SCALARS[etype])
                start = self._take(count * dtype.itemsize)
                return np.frombuffer(self._buf, dtype=dtype, count=count, offset=start)
            if etype == _STRING:
                return self._string_array(count)
            if etype == _ARRAY:
                return [self._value(_ARRAY) for _ in range(count)]
        raise GGUFFormatError(f"{self.path}: unknown metadata value type {vtype} at byte {self._pos}")

    def _string_array(self, count: int) -> StringArray:
        """Walk the (length, bytes) pairs once, recording where each string starts."""
        starts = np.empty(count, dtype=np.int64)
        lengths = np.empty(count, dtype=np.int64)
        buf, pos, end = self._buf, self._pos, len(self._buf)
        unpack = struct.Struct("<Q").unpack_from
        for i in range(count):
            if pos + 8 > end:
                raise GGUFFormatError(f"{self.path} is truncated or corrupt (a string array runs past the end)")
            (n,) = unpack(buf, pos)
            starts[i], lengths[i] = pos + 8, n
            pos += 8 + n
        if pos > end:
            raise GGUFFormatError(f"{self.path} is truncated or corrupt (a string array runs past the end)")
        self._pos = pos
        return StringArray(buf, starts, lengths)

    def _tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self._string()
        n_dims = self._scalar("I")
        if n_dims > 8:
            raise GGUFFormatError(f"{self.path}: tensor {name!r} has {n_dims} dimensions")
        dims = tuple(self._scalar("Q") for _ in range(n_dims))
        return name, dims, self._scalar("I"), self._scalar("Q")

    def _tensor(self, data_start: int, name: str, dims: tuple[int, ...], raw_type: int, offset: int) -> GGUFTensor:
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise GGUFFormatError(f"{self.path}: tensor {name!r} has an unknown type {raw_type}") from None
        shape = tuple(reversed(dims)) or (1,)
        dtype = _ELEMENT_DTYPES.get(qtype)
        if dtype is not None:
            count = int(np.prod(shape))
        else:
            block, block_bytes = GGML_QUANT_SIZES[qtype]
            if shape[-1] % block:
                raise GGUFFormatError(
                    f"{self.path}: tensor {name!r} rows of {shape[-1]} are not whole {qtype.name} blocks"
                )
            shape = (*shape[:-1], shape[-1] // block * block_bytes)
            dtype, count = np.uint8, int(np.prod(shape))
        start = data_start + offset
        if start + count * np.dtype(dtype).itemsize > len(self._buf):
            raise GGUFFormatError(f"{self.path} is truncated: tensor {name!r} runs past the end of the file")
        data = np.frombuffer(self._buf, dtype=dtype, count=count, offset=start).reshape(shape)
        return GGUFTensor(name, qtype, dims, data)


# gguf-py applies a block type's formula to 16 rows at a time: for SmolLM2's rows of 576 values that is tens of
# thousands of small numpy calls per model. Groups of this many values (1 MiB of fp32, which stays in cache) take
# the same formula's same values 2-2.5x sooner: 1.8 -> 0.8 s for SmolLM2, 1.7-3.8 -> 0.9 s for Gemma 3 270M on
# two Zen 3 cores, paid at every engine start.
_DEQUANTIZE_GROUP = 1 << 18


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """``gguf.quants.dequantize(data, qtype)``, the same fp32 values: gguf-py's own per-block formula
    (``dequantize_rows``) applied over groups of ``_DEQUANTIZE_GROUP`` values instead of 16 rows."""
    from gguf import quants

    kind = getattr(quants, qtype.name, None)
    if data.ndim != 2 or not hasattr(kind, "dequantize_rows"):  # element types have no such class
        return quants.dequantize(data, qtype)
    kind.init_grid()
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    cols = data.shape[1] // block_bytes * block
    out = np.empty((data.shape[0], cols), np.float32)
    step = max(1, _DEQUANTIZE_GROUP // cols)
    for i in range(0, data.shape[0], step):
        out[i : i + step] = kind.dequantize_rows(data[i : i + step])
    return out
