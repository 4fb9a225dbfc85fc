"""One local two-node Ray cluster for every cluster test (Ray starts in seconds; the models take longer).

Every node listens on 127.0.0.1 only (agora.cluster.loopback_only, set before Ray is imported), and
`agora serve --ray` runs as a real subprocess that joins the cluster by its address."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from agora.cluster import loopback_only, require_ray  # noqa: E402

try:
    require_ray()
except ImportError as exc:
    pytest.skip(str(exc), allow_module_level=True)
loopback_only()  # before ray is imported: every node of the test cluster on 127.0.0.1

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from agora.router.replicas import free_port  # noqa: E402

MODEL = "smollm2-135m-instruct"
SERVED = "SmolLM2-135M-Instruct"


@dataclass
class RayCluster:
    cluster: Cluster
    worker: object  # the non-head node (the node-kill test replaces it)

    @property
    def address(self) -> str:
        return self.cluster.address

    def replace_worker(self) -> None:
        self.cluster.remove_node(self.worker)
        self.worker = self.cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False})  # fmt: skip
    worker = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield RayCluster(cluster, worker)
    finally:
        ray.shutdown()
        cluster.shutdown()


@dataclass
class App:
    """A running `agora serve --ray` process and its gateway."""

    proc: subprocess.Popen
    url: str
    address: str
    app_name: str
    log: Path

    def status(self) -> dict:
        out = subprocess.run([sys.executable, "-m", "agora.cli", "status", "--address", self.address,
                              "--ray-app-name", self.app_name, "--json"],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout)

    def wait_replicas(self, n: int, timeout: float = 180, new_than: set[str] | None = None) -> list[dict]:
        """Until the gateway routes over exactly ``n`` healthy replicas (and the registry lists them)."""
        deadline = time.monotonic() + timeout
        while True:
            rows = [r for r in self.status()["replicas"] if r["state"] == "running"]
            healthy = _healthy(self.url)
            if len(rows) == n and healthy == n and (new_than is None or {r["replica"] for r in rows} - new_than):
                return rows
            assert time.monotonic() < deadline, f"wanted {n} replicas, have {rows} ({healthy} healthy)\n" + self.tail()
            time.sleep(0.5)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _healthy(url: str) -> float:
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return -1
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("agora_gateway_endpoint_healthy{"))  # fmt: skip


def start_app(ray_cluster: RayCluster, tmp_path: Path, app_name: str, *flags: str) -> App:
    from agora.router.replicas import prepare_model

    prepare_model(MODEL)  # fetched once (the real SmolLM2), before any replica starts
    port = free_port()
    log = tmp_path / f"{app_name}.log"
    cmd = [sys.executable, "-m", "agora.cli", "serve", MODEL, "--ray", "--address", ray_cluster.address,
           "--ray-app-name", app_name, "--port", str(port), "--max-model-len", "2048",
           "--kv-cache-memory", "256MiB", "--router-config", str(tmp_path / "router.yaml"), *flags]  # fmt: skip
    (tmp_path / "router.yaml").write_text("gateway:\n  scrape_interval_s: 0.2\n  eject_after_failures: 1\n")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "AGORA_LOG_LEVEL": "INFO"}
        )
    app = App(proc, f"http://127.0.0.1:{port}", ray_cluster.address, app_name, log)
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, "agora serve --ray exited:\n" + app.tail()
        try:
            if httpx.get(f"{app.url}/health", timeout=5).status_code == 200:
                return app
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the gateway did not come up:\n" + app.tail()
        time.sleep(0.5)


def control_actors(app_name: str) -> dict[str, tuple[str, bool]]:
    """The app's Registry and AgoraApp replicas that are alive: class name -> (actor id, on the head node)."""
    heads = {n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"]}
    out = {}
    for actor_id, a in ray._private.state.actors().items():  # no dashboard in the test cluster: ask the GCS
        for name in ("Registry", "AgoraApp"):
            if a["State"] == "ALIVE" and a["ActorClassName"] == f"ServeReplica:{app_name}:{name}":
                out[name] = (actor_id, a["Address"]["NodeID"] in heads)
    return out
