"""agora.cluster's pieces without a cluster: deployments from flags and YAML, the autoscaling policy,
the registry's expiry, and discovery's view of it."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from agora.cluster.app import deployment_name, model_deployments
from agora.cluster.autoscale import desired_replicas, engine_load_policy
from agora.cluster.discovery import RegistryDiscovery
from agora.config import ClusterConfig, ServeConfig, with_options
from agora.router.config import ConfigError, parse_config


def test_deployments_from_the_command_line_and_from_yaml() -> None:
    base = with_options(ServeConfig(), {"max_num_seqs": 8})
    [one] = model_deployments(base, ClusterConfig(num_cpus_per_replica=2), 3, [])
    assert (one.name, one.replicas, one.min_replicas, one.num_cpus) == ("smollm2-135m-instruct", 3, None, 2)
    [auto] = model_deployments(base, ClusterConfig(min_replicas=1, max_replicas=4), 3, [])
    assert (auto.replicas, auto.min_replicas, auto.max_replicas) == (None, 1, 4)

    yaml = parse_config({"deployments": [
        {"model": "gemma3-270m", "replicas": 2, "num_gpus_per_replica": 1, "options": {"max_model_len": 1024}},
        {"model": "/models/SmolLM2.gguf", "min_replicas": 1, "max_replicas": 3,
         "options": {"served_model_name": "smol", "max_num_seqs": 4}},
    ]}, "t.yaml")  # fmt: skip
    gemma, smol = model_deployments(base, ClusterConfig(), 1, yaml.deployments)
    assert (gemma.name, gemma.replicas, gemma.num_gpus) == ("gemma3-270m", 2, 1)
    assert gemma.serve.engine.model.model == "gemma3-270m" and gemma.serve.engine.model.max_model_len == 1024
    assert gemma.serve.engine.scheduler.max_num_seqs == 8  # the command line's options are the defaults
    assert (smol.name, smol.replicas, smol.min_replicas, smol.max_replicas) == ("SmolLM2", None, 1, 3)
    assert smol.serve.engine.model.served_model_name == "smol" and smol.serve.engine.scheduler.max_num_seqs == 4

    twice = parse_config({"deployments": [{"model": "a"}, {"model": "x/a"}]}, "t.yaml")
    with pytest.raises(ValueError, match="used twice"):
        model_deployments(base, ClusterConfig(), 1, twice.deployments)
    bad = parse_config({"deployments": [{"model": "a", "options": {"max_num_seq": 4}}]}, "t.yaml")
    with pytest.raises(ValueError, match=r"deployments\[0\]\.options\.max_num_seq"):
        model_deployments(base, ClusterConfig(), 1, bad.deployments)
    with pytest.raises(ConfigError, match="not both"):
        parse_config({"deployments": [{"model": "a", "replicas": 2, "min_replicas": 1, "max_replicas": 2}]}, "t")
    assert deployment_name("hf/Org/Model v2.gguf") == "Model-v2"


def test_the_clients_key_never_travels_to_the_replicas() -> None:
    from agora.cluster.app import replica_json
    from agora.config import ServerConfig

    serve_config = ServeConfig(engine=with_options(ServeConfig(), {"max_num_seqs": 2}).engine,
                               server=ServerConfig(api_key="client-key"))  # fmt: skip
    [d] = model_deployments(serve_config, ClusterConfig(), 1, [])
    text = replica_json(d)
    assert "client-key" not in text and ServeConfig.from_json(text).engine == serve_config.engine


def test_autoscaling_policy_asks_for_load_over_target() -> None:
    assert desired_replicas(0, 4, 1, 5) == 1
    assert desired_replicas(4, 4, 1, 5) == 1
    assert desired_replicas(4.5, 4, 1, 5) == 2
    assert desired_replicas(100, 4, 1, 5) == 5

    def ctx(loads: list[float]) -> SimpleNamespace:
        return SimpleNamespace(aggregated_metrics={"engine_load": dict(enumerate(loads))}, policy_state={},
                               config=SimpleNamespace(target_ongoing_requests=2.0),
                               capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=3)  # fmt: skip

    assert engine_load_policy(ctx([3, 3]))[0] == 3
    assert engine_load_policy(ctx([1, 0]))[0] == 1
    assert engine_load_policy(SimpleNamespace(**{**vars(ctx([])), "aggregated_metrics": None}))[0] == 1


def test_registry_expires_silent_replicas_and_discovery_lists_running_ones() -> None:
    from agora.cluster.registry import Registry

    registry = Registry.func_or_class(ttl_s=0.2)  # the class itself, outside Serve
    entry = {"replica_id": "r1", "actor": "SERVE_REPLICA::a#d#r1", "deployment": "d", "url": "http://10.0.0.1:9",
             "node_id": "n1", "node_ip": "10.0.0.1", "model": "m"}  # fmt: skip
    registry.register(entry)
    registry.register({**entry, "replica_id": "r2", "url": "http://10.0.0.2:9", "state": "draining"})
    assert {e["replica_id"] for e in registry.list()} == {"r1", "r2"}

    class Handle:  # what a DeploymentHandle's method call looks like
        class list:  # noqa: N801
            @staticmethod
            def remote() -> SimpleNamespace:
                return SimpleNamespace(result=lambda timeout_s: registry.list())

    found = asyncio.run(RegistryDiscovery(Handle(), "internal")())
    assert [(ep.name, ep.url, ep.api_key) for ep in found] == [
        ("d#r1", "http://10.0.0.1:9", "internal")
    ]  # not draining
    time.sleep(0.3)
    assert registry.list() == []  # no heartbeat: gone


def test_discovery_keeps_its_replicas_while_a_restarted_registry_refills(monkeypatch) -> None:
    import agora.cluster.discovery as discovery

    answers: list[list[dict]] = []

    class Handle:
        class list:  # noqa: N801
            @staticmethod
            def remote() -> SimpleNamespace:
                return SimpleNamespace(result=lambda timeout_s: answers.pop(0))

    entry = {"replica_id": "r1", "deployment": "d", "url": "http://10.0.0.1:9", "state": "running"}
    clock = [100.0]
    monkeypatch.setattr(discovery.time, "monotonic", lambda: clock[0])
    d = RegistryDiscovery(Handle(), "k")

    def ask(answer: list[dict], at: float) -> list[str]:
        answers.append(answer)
        clock[0] = at
        return [ep.name for ep in asyncio.run(d())]

    assert ask([entry], 100.0) == ["d#r1"]
    assert ask([], 102.0) == ["d#r1"]  # the registry restarted: nobody has heartbeaten yet
    assert ask([], 102.0 + discovery.TTL_S + 1) == []  # nobody came back within a TTL: they are gone
    assert ask([entry], 120.0) == ["d#r1"]
    assert ask([{**entry, "state": "draining"}], 122.0) == []  # the registry knows it, draining: not a restart
