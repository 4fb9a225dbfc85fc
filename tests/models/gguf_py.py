"""gguf-py's ``GGUFReader`` over a file's bytes read into memory instead of a numpy memmap.

The reader takes a slice of its data for every length and every string of the header, and a memmap's
slicing runs Python code each time (``memmap.__getitem__``, ``__array_finalize__``): Gemma 3's header, with
its 262k-token vocabulary, took 25 s to parse over a memmap and 8.5 s over a plain array on 2 cores (Zen 3).
The same code parses the same bytes, so what the reader gives (fields, tensors, read-only data) is unchanged.
"""

from __future__ import annotations

import threading
import types

import gguf
import gguf.gguf_reader
import numpy as np

_LOCK = threading.Lock()


def _memmap(path, mode: str = "r") -> np.ndarray:  # noqa: ANN001
    assert mode == "r", mode  # (reader() opens files read-only, as GGUFReader does by default)
    data = np.fromfile(path, dtype=np.uint8)
    data.flags.writeable = False
    return data


# numpy for gguf_reader's module, but for memmap(path, mode="r"): the file's bytes, read-only
_NUMPY_READING_WHOLE_FILES = types.ModuleType("numpy")
_NUMPY_READING_WHOLE_FILES.__dict__.update(vars(np), memmap=_memmap)


def reader(path) -> gguf.GGUFReader:  # noqa: ANN001
    """gguf-py's reader of ``path``, parsed from the file's bytes in memory."""
    with _LOCK:  # gguf_reader's module sees the stand-in numpy only while this parse runs
        gguf.gguf_reader.np = _NUMPY_READING_WHOLE_FILES
        try:
            return gguf.gguf_reader.GGUFReader(str(path))
        finally:
            gguf.gguf_reader.np = np
