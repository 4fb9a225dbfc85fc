"""Pickers: choose one endpoint from the scored candidates."""

from __future__ import annotations

import itertools
import random

from agora.router.endpoints import Endpoint
from agora.router.plugins.base import Picker
from agora.router.request import RequestInfo


class MaxScorePicker(Picker):
    """The highest total score; ties are broken at random so equal endpoints share the load."""

    type_name = "max-score-picker"

    def pick(self, req: RequestInfo, endpoints: list[Endpoint], scores: list[float], rng: random.Random) -> Endpoint:
        best = max(scores)
        top = [ep for ep, s in zip(endpoints, scores, strict=True) if s >= best - 1e-9]
        return top[0] if len(top) == 1 else rng.choice(top)


class RandomPicker(Picker):
    """Any candidate, uniformly; scores are ignored."""

    type_name = "random-picker"

    def pick(self, req: RequestInfo, endpoints: list[Endpoint], scores: list[float], rng: random.Random) -> Endpoint:
        return rng.choice(endpoints)


class RoundRobinPicker(Picker):
    """The candidates in turn (by name, so the order is stable as endpoints come and go)."""

    type_name = "round-robin-picker"

    def __init__(self, name: str, params=None) -> None:  # noqa: ANN001
        super().__init__(name, params)
        self._counter = itertools.count()

    def pick(self, req: RequestInfo, endpoints: list[Endpoint], scores: list[float], rng: random.Random) -> Endpoint:
        ordered = sorted(endpoints, key=lambda ep: ep.name)
        return ordered[next(self._counter) % len(ordered)]
