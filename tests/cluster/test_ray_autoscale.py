"""Autoscaling on the engines' own load: 1 -> 2 replicas under a ramp, back to 1 when idle, without a
failed request (the replica that leaves drains first)."""

from __future__ import annotations

import time

import pytest

from tests.cluster.conftest import RayCluster, start_app
from tests.cluster.test_ray_serve import Load

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_scales_up_under_load_and_down_when_idle(ray_cluster: RayCluster, tmp_path) -> None:
    app = start_app(ray_cluster, tmp_path, "auto", "--min-replicas", "1", "--max-replicas", "2",
                    "--target-ongoing-requests", "2", "--upscale-delay-s", "1", "--downscale-delay-s", "4")  # fmt: skip
    try:
        app.wait_replicas(1)
        with Load(app.url, agents=6) as load:
            app.wait_replicas(2, timeout=240)
            load.wait_ok(6)  # both serve
        assert load.outcomes["failed"] == 0 and load.outcomes["clean_stream_error"] == 0, load.failures
        t = time.monotonic()
        with Load(app.url, agents=1) as trickle:  # one agent: under the target, so one replica is enough
            app.wait_replicas(1, timeout=240)
            trickle.wait_ok(3)
        assert trickle.outcomes["failed"] == 0 and trickle.outcomes["clean_stream_error"] == 0, trickle.failures
        assert time.monotonic() - t < 240
    finally:
        app.stop()
