"""Filters: drop endpoints before scoring. A filter never drops every endpoint."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from agora.router.endpoints import Endpoint
from agora.router.plugins.base import Filter
from agora.router.request import RequestInfo


class LoadBalanceFilter(Filter):
    """Keeps affinity from piling every request onto one endpoint.

    When the busiest endpoints carry more than ``max_imbalance`` requests above the
    least busy one, and more than ``max_ratio`` times its load, they are dropped
    for this request. Below that, affinity scorers are free to choose.
    """

    type_name = "load-balance-filter"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        max_imbalance: int = Field(2, ge=0, description="requests above the least loaded endpoint")
        max_ratio: float = Field(1.25, ge=1.0, description="times the least loaded endpoint's load")

    def filter(self, req: RequestInfo, endpoints: list[Endpoint]) -> list[Endpoint]:
        if len(endpoints) < 2:
            return endpoints
        least = min(ep.load for ep in endpoints)
        p = self.params
        kept = [ep for ep in endpoints if ep.load - least <= p.max_imbalance or ep.load <= p.max_ratio * least]
        return kept or endpoints
