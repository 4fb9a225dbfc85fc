"""A scheduling profile: filters -> weighted scorers -> picker.

::

    candidates ──filter──filter──▶ kept ──scorer×w──scorer×w──▶ totals ──picker──▶ endpoint

Scores are clamped to 0..1 before weighting, so a misbehaving scorer cannot
dominate; each plugin's time is recorded.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

from agora.router.endpoints import Endpoint
from agora.router.plugins import Filter, Picker, Plugin, Scorer
from agora.router.request import RequestInfo

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class WeightedScorer:
    scorer: Scorer
    weight: float


@dataclass(slots=True)
class Decision:
    """The chosen endpoint and why: total and per-scorer scores per candidate."""

    endpoint: Endpoint
    totals: dict[str, float]
    per_scorer: dict[str, list[float]]

    def explain(self) -> str:
        return ",".join(f"{name}={score:.3f}" for name, score in self.totals.items())


@dataclass
class SchedulingProfile:
    name: str
    filters: list[Filter]
    scorers: list[WeightedScorer]
    picker: Picker
    rng: random.Random = field(default_factory=random.Random)
    plugin_seconds: dict[str, float] = field(default_factory=dict)  # cumulative, for /metrics

    @property
    def plugins(self) -> list[Plugin]:
        return [*self.filters, *(w.scorer for w in self.scorers), self.picker]

    def _timed(self, plugin: Plugin, start: float) -> None:
        self.plugin_seconds[plugin.name] = self.plugin_seconds.get(plugin.name, 0.0) + time.perf_counter() - start

    def pick(self, req: RequestInfo, candidates: list[Endpoint]) -> Decision:
        """Run the profile over non-empty ``candidates``; plugins' on_pick hooks are run too."""
        kept = candidates
        for f in self.filters:
            t = time.perf_counter()
            kept = f.filter(req, kept) or kept
            self._timed(f, t)
        totals = [0.0] * len(kept)
        per_scorer: dict[str, list[float]] = {}
        for ws in self.scorers:
            t = time.perf_counter()
            scores = ws.scorer.score(req, kept)
            self._timed(ws.scorer, t)
            clamped = [min(max(s, 0.0), 1.0) for s in scores]
            per_scorer[ws.scorer.name] = clamped
            for i, s in enumerate(clamped):
                totals[i] += ws.weight * s
        t = time.perf_counter()
        chosen = self.picker.pick(req, kept, totals, self.rng)
        self._timed(self.picker, t)
        for plugin in self.plugins:
            plugin.on_pick(req, chosen)
        decision = Decision(chosen, {ep.name: s for ep, s in zip(kept, totals, strict=True)}, per_scorer)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("profile %s picked %s (%s; %s)", self.name, chosen.name, decision.explain(),
                         {k: [round(x, 3) for x in v] for k, v in per_scorer.items()})  # fmt: skip
        return decision

    def on_done(self, req: RequestInfo, endpoint: Endpoint, status: int) -> None:
        for plugin in self.plugins:
            plugin.on_done(req, endpoint, status)

    def on_eject(self, endpoint: Endpoint) -> None:
        for plugin in self.plugins:
            plugin.on_eject(endpoint)
