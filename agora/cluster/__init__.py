"""Scale-out on Ray Serve: the only package of agora that imports ``ray``.

``agora serve --ray`` deploys one Ray Serve application: a `Registry` and, per model, an
`EngineReplica` deployment that Ray places, restarts and autoscales. Each replica runs an
ordinary agora engine server on its node and registers its address; agora's gateway
(in the ``agora serve`` process, or in the `AgoraApp` ingress under KubeRay) routes over
whatever the registry lists, with its profiles, semantic stage and governance.

Nothing here imports ``ray`` at module level except the deployment modules (``registry``,
``replica``, ``app``), so `loopback_only` can still act before Ray is first imported.
"""

from __future__ import annotations

import importlib.util
import os

# A replica registers at once when it starts and when it starts draining; the heartbeat in between only
# refreshes its load for `agora status` and proves it alive. Each call is a Serve handle call (a few ms of
# Python on both sides), which on a small machine is CPU the engines do not get: keep them rare.
HEARTBEAT_S = 2.0
TTL_S = 6.0  # an entry this old is gone (a killed replica never says goodbye; the gateway ejects it sooner)
DISCOVERY_S = 1.0  # how often a gateway asks the registry

# Ray turns a node address of 127.0.0.1 into the machine's routable address unless it believes it runs on a
# laptop (where clusters are off); this is that belief's switch. Read by Ray when it is imported and by every
# Ray process it starts, which inherit it.
_RAY_LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def require_ray() -> None:
    """ImportError with the install command where Ray Serve is missing (without importing it)."""
    spec = importlib.util.find_spec("ray")  # find_spec("ray.serve") would import ray itself
    dirs = spec.submodule_search_locations if spec is not None else None
    if not dirs or not any(os.path.isdir(os.path.join(d, "serve")) for d in dirs):
        raise ImportError("agora serve --ray needs Ray Serve: pip install 'agora[ray]'")


def loopback_only() -> None:
    """Make a Ray instance started from this process listen on 127.0.0.1 only (local mode and tests).

    Ray's ports run code for anyone who reaches them, and a local instance has no peers: keep them off the
    network. Must run before ``ray`` is imported (its constants are read at import)."""
    import sys

    if "ray" in sys.modules and os.environ.get(_RAY_LOOPBACK_SWITCH) != "0":
        raise RuntimeError("loopback_only() must run before ray is imported")
    os.environ[_RAY_LOOPBACK_SWITCH] = "0"


def light_local_ray() -> None:
    """Settings for a Ray instance this process starts for itself (``agora serve --ray`` without
    ``--address``): no usage report, and Serve's control loop at 0.5 s instead of 0.1 s (on a small
    machine its polling is CPU the engines do not get; autoscaling and restarts still react within a
    second). Explicit settings in the environment win. Must run before Ray starts."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.5")
