"""`engine_load_policy`: Ray Serve autoscaling on what the engines hold.

Ray's default policy counts the requests that pass through Serve's own handles; agora's
gateway talks to the replicas' engine servers directly, so each replica reports its engine's
load instead (running + waiting, or the HTTP requests in progress if more:
`EngineReplica.record_autoscaling_stats`). The policy asks for
``ceil(total / target_ongoing_requests)`` replicas; Serve applies the deployment's bounds and
its ``upscale_delay_s`` / ``downscale_delay_s`` around it.
"""

from __future__ import annotations

import math
from typing import Any

METRIC = "engine_load"


def desired_replicas(total_load: float, target: float, lo: int, hi: int) -> int:
    want = math.ceil(total_load / target - 1e-9) if total_load > 0 else lo
    return max(lo, min(hi, want))


def engine_load_policy(ctx: Any) -> tuple[int, dict[str, Any]]:
    per_replica = (ctx.aggregated_metrics or {}).get(METRIC, {})
    total = float(sum(per_replica.values()))
    want = desired_replicas(total, ctx.config.target_ongoing_requests, ctx.capacity_adjusted_min_replicas,
                            ctx.capacity_adjusted_max_replicas)  # fmt: skip
    return want, dict(ctx.policy_state or {})
