"""`agora serve --ray` on a two-node local Ray cluster with the real SmolLM2: replicas on both nodes,
routed by agora's gateway, surviving a killed replica and a killed node under load."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator

import openai
import pytest
import ray

from tests.cluster.conftest import SERVED, App, RayCluster, control_actors, start_app

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def app(ray_cluster: RayCluster, tmp_path_factory) -> Iterator[App]:  # noqa: ANN001
    a = start_app(ray_cluster, tmp_path_factory.mktemp("ray-fixed"), "fixed", "--replicas", "2")
    try:
        a.wait_replicas(2)
        yield a
    finally:
        a.stop()


class Load:
    """Agents sending chat requests (half streamed) until stopped; every outcome is kept."""

    def __init__(self, url: str, agents: int = 4) -> None:
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        self.stop = threading.Event()
        self.outcomes: Counter[str] = Counter()
        self.failures: list[str] = []
        self.endpoints: Counter[str] = Counter()
        self.threads = [threading.Thread(target=self._agent, args=(i,), daemon=True) for i in range(agents)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(180)

    def _agent(self, i: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            messages = [{"role": "user", "content": f"Agent {i}, turn {n}: name three colors of the sea."}]
            try:
                if i % 2:
                    raw = self.client.chat.completions.with_raw_response.create(
                        model=SERVED, messages=messages, max_tokens=24, temperature=0)  # fmt: skip
                    assert raw.parse().choices[0].message.content
                    self.endpoints[raw.headers["x-agora-endpoint"]] += 1
                    self.outcomes["ok"] += 1
                else:
                    chunks = list(self.client.chat.completions.create(
                        model=SERVED, messages=messages, max_tokens=24, temperature=0, stream=True))  # fmt: skip
                    assert chunks and chunks[-1].choices[0].finish_reason is not None
                    self.outcomes["ok"] += 1
            except openai.APIError as exc:
                if "stopped mid-answer" in str(exc):  # a stream that had started on the killed replica
                    self.outcomes["clean_stream_error"] += 1
                else:
                    self.outcomes["failed"] += 1
                    self.failures.append(_failure(i, exc))
            except Exception as exc:  # noqa: BLE001 - anything else is a failure the test reports
                self.outcomes["failed"] += 1
                self.failures.append(_failure(i, exc))

    def wait_ok(self, n: int, timeout: float = 120) -> None:
        target = self.outcomes["ok"] + n
        deadline = time.monotonic() + timeout
        while self.outcomes["ok"] < target:
            assert time.monotonic() < deadline, f"load stalled: {self.outcomes} {self.failures[-3:]}"
            time.sleep(0.2)


def _failure(agent: int, exc: BaseException) -> str:
    """What went wrong, with the transport error underneath the SDK's (a reset, a short body, a refusal)."""
    kind = "streamed" if agent % 2 == 0 else "whole"
    return f"{kind} request: {type(exc).__name__}: {exc} (cause: {exc.__cause__!r}) at {time.strftime('%H:%M:%S')}"


def test_replicas_run_on_both_nodes_and_answer_like_one_engine(app: App) -> None:
    rows = app.wait_replicas(2)
    assert len({r["node_id"] for r in rows}) == 2  # one replica per node (1 CPU each)
    assert {r["node"] for r in rows} == {"127.0.0.1"}  # every Ray node on loopback
    client = openai.OpenAI(base_url=f"{app.url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "The tide comes in and goes out. " * 20 + "Write one sentence about it."}]
    first = client.chat.completions.with_raw_response.create(model=SERVED, messages=messages, max_tokens=16,
                                                             temperature=0)  # fmt: skip
    again = client.chat.completions.with_raw_response.create(model=SERVED, messages=messages, max_tokens=16,
                                                             temperature=0)  # fmt: skip
    # the prefix-aware profile sends the same prompt where it is cached, and greedy output is the same
    assert again.headers["x-agora-endpoint"] == first.headers["x-agora-endpoint"]
    assert again.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert again.parse().usage.prompt_tokens_details.cached_tokens > 0
    names = {r["deployment"] + "#" + r["replica"] for r in rows}
    assert first.headers["x-agora-endpoint"] in names


def test_killed_replica_loses_no_request_and_comes_back(app: App) -> None:
    before = {r["replica"]: r for r in app.wait_replicas(2)}
    with Load(app.url) as load:
        load.wait_ok(6)
        victim = next(iter(before.values()))
        ray.kill(ray.get_actor(victim["actor"], namespace="serve"), no_restart=True)
        load.wait_ok(8)  # served by the other replica meanwhile
        rows = app.wait_replicas(2, new_than=set(before))  # Ray started a new one; the gateway took it in
        new = next(r for r in rows if r["replica"] not in before)
        name = f"{new['deployment']}#{new['replica']}"
        deadline = time.monotonic() + 120
        while load.endpoints[name] == 0:  # the new replica gets traffic
            assert time.monotonic() < deadline, f"no request reached {name}: {load.endpoints}"
            time.sleep(0.2)
    assert load.outcomes["failed"] == 0, f"{load.failures}\n{app.tail()}"
    assert victim["replica"] not in {r["replica"] for r in rows}


def test_killed_worker_node_loses_no_request(app: App, ray_cluster: RayCluster) -> None:
    app.wait_replicas(2)
    control = control_actors(app.app_name)
    # the registry and the ingress hold no CPU: Serve would spread them, and a worker's death would take them along
    assert control == {name: (control[name][0], True) for name in ("Registry", "AgoraApp")}
    with Load(app.url) as load:
        load.wait_ok(6)
        ray_cluster.replace_worker()  # the node dies with its replica; a fresh node joins
        load.wait_ok(8)
        rows = app.wait_replicas(2, timeout=240)
        assert len({r["node_id"] for r in rows}) == 2
    assert load.outcomes["failed"] == 0, f"{load.failures}\n{app.tail()}"
    assert control_actors(app.app_name) == control  # never restarted
