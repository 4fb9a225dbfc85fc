"""A sequence's tokens as a growing numpy array, appended to as the sequence grows (not rebuilt each step)."""

from __future__ import annotations

import numpy as np


class History:
    def __init__(self) -> None:
        self.buf = np.empty(256, dtype=np.int64)
        self.n = 0

    def sync(self, token_ids: list[int]) -> np.ndarray:
        """The array of ``token_ids`` (which only ever grew since the last call, or was replaced)."""
        n = len(token_ids)
        if n < self.n:  # the sequence was cut back (a stop string): start over
            self.n = 0
        if n > len(self.buf):
            grown = np.empty(max(n, 2 * len(self.buf)), dtype=np.int64)
            grown[: self.n] = self.buf[: self.n]
            self.buf = grown
        if n > self.n:
            self.buf[self.n : n] = token_ids[self.n : n]
            self.n = n
        return self.buf[:n]
