"""Which endpoints may take a request at all, before any profile runs.

::

    all ──serves model──▶ serving ──healthy, not ejected, not tried──▶ healthy ──below in-flight limit──▶ open
          (none: 404)               (none: 503)                                  (none: 429)

A request is never sent to an endpoint that does not serve its model or is not
healthy, whatever the profile says.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable

from agora.openai.errors import APIError
from agora.router.endpoints import Endpoint


def admit(endpoints: Iterable[Endpoint], model: str | None, max_in_flight: int,
          exclude: Collection[str] = ()) -> list[Endpoint]:  # fmt: skip
    """The endpoints the profile may choose from, or the APIError the client should get."""
    now = time.monotonic()
    endpoints = list(endpoints)
    serving = [ep for ep in endpoints if ep.serves(model)]
    if not serving:
        unknown = any(ep.declared_models is None and not ep.models for ep in endpoints)
        if not unknown:  # every endpoint has told us its models, and none has this one
            known = sorted({m for ep in endpoints for m in ep.models})
            raise APIError(404, f"the model {model!r} does not exist; this gateway serves: {', '.join(known) or 'none'}",
                           "not_found_error", "model", "model_not_found")  # fmt: skip
    healthy = [ep for ep in serving if ep.available(now) and ep.name not in exclude]
    if not healthy:
        what = f"model {model!r}" if model else "requests"
        raise APIError(503, f"no healthy endpoint serves {what} right now ({len(serving)} known, none available)",
                       "service_unavailable", code="no_healthy_endpoint", headers={"Retry-After": "1"})  # fmt: skip
    open_ = [ep for ep in healthy if ep.in_flight < max_in_flight]
    if not open_:
        raise APIError(429, f"every endpoint serving {model!r} is at its limit of {max_in_flight} requests in flight",
                       "rate_limit_error", code="gateway_saturated", headers={"Retry-After": "1"})  # fmt: skip
    return open_
