"""The three kinds of scheduling plugin.

A profile runs ``filters`` (drop endpoints), then ``scorers`` (0..1 per endpoint,
weighted and summed), then one ``picker``. Each plugin is configured by its own
pydantic ``Params`` (unknown keys are refused) and has a name, so one type can
appear twice with different parameters.
"""

from __future__ import annotations

import random
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from agora.router.endpoints import Endpoint
from agora.router.request import RequestInfo


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Plugin:
    type_name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = NoParams

    def __init__(self, name: str, params: BaseModel | None = None) -> None:
        self.name = name
        self.params = params if params is not None else self.Params()

    def on_pick(self, req: RequestInfo, endpoint: Endpoint) -> None:
        """Called once the request is sent to ``endpoint`` (e.g. to remember its prefix there)."""

    def on_done(self, req: RequestInfo, endpoint: Endpoint, status: int) -> None:
        """Called once the answer from ``endpoint`` has ended (``status`` its HTTP status, 499 if the client left)."""

    def on_eject(self, endpoint: Endpoint) -> None:
        """Called when ``endpoint`` is ejected: whatever was remembered about it may be gone."""


class Filter(Plugin):
    def filter(self, req: RequestInfo, endpoints: list[Endpoint]) -> list[Endpoint]:
        raise NotImplementedError


class Scorer(Plugin):
    def score(self, req: RequestInfo, endpoints: list[Endpoint]) -> list[float]:
        """One score in 0..1 per endpoint, in order; higher is better."""
        raise NotImplementedError


class Picker(Plugin):
    def pick(self, req: RequestInfo, endpoints: list[Endpoint], scores: list[float], rng: random.Random) -> Endpoint:
        raise NotImplementedError
