"""One source of configuration: the serve flags are the config fields, and a config travels as JSON."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from agora.cli import build_parser, serve_config
from agora.config import (
    CacheConfig,
    ClusterConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    ServeConfig,
    ServerConfig,
    SpeculativeConfig,
    from_dict,
    resolve_speculative,
    to_dict,
    with_options,
)


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_flag_defaults_are_the_config_defaults(monkeypatch) -> None:
    args = _args("--api-key", "k")
    assert serve_config(args) == ServeConfig(server=ServerConfig(api_key="k"))
    assert (
        ClusterConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ClusterConfig)}) == ClusterConfig()
    )


def test_flags_set_their_fields_and_bad_values_name_the_flag() -> None:
    config = serve_config(_args("m", "--kv-cache-memory", "64MiB", "--max-num-seqs", "3", "--no-enable-prefix-caching",
                                "--served-model-name", "a", "b", "--model-alias", "claude-*=a", "--max-body-bytes", "1MiB",
                                "--enforce-eager", "--dtype", "float32", "--gguf-activations", "int8"))  # fmt: skip
    assert config.engine.cache == CacheConfig(kv_cache_memory_bytes=64 << 20, enable_prefix_caching=False)
    assert config.engine.scheduler == SchedulerConfig(max_num_seqs=3)
    assert config.engine.model == ModelConfig(
        model="m", served_model_name="a", enforce_eager=True, dtype="float32", gguf_activations="int8"
    )
    assert config.server.served_model_aliases == ("b",) and config.server.model_aliases == (("claude-*", "a"),)
    assert config.server.max_body_bytes == 1 << 20
    with pytest.raises(SystemExit):
        _args("--dtype", "float8")
    with pytest.raises(SystemExit):
        _args("--gguf-activations", "int4")
    with pytest.raises(ValueError, match="gguf_activations must be one of float32, int8"):
        ModelConfig(gguf_activations="fp8")
    assert serve_config(_args("--gguf-weights", "blocks")).engine.model.gguf_weights == "blocks"
    assert ModelConfig().gguf_weights == "auto"
    with pytest.raises(SystemExit):
        _args("--gguf-weights", "int4")
    with pytest.raises(ValueError, match="gguf_weights must be one of auto, fp32, blocks"):
        ModelConfig(gguf_weights="none")
    with pytest.raises(ValueError, match="max_num_seqs"):
        serve_config(_args("--max-num-seqs", "0"))
    assert not hasattr(SchedulerConfig(), "max_model_len")  # the context length lives in ModelConfig only


def test_a_config_round_trips_through_json_and_refuses_unknown_fields() -> None:
    config = ServeConfig(engine=EngineConfig(model=ModelConfig(model="x", max_model_len=512),
                                             cache=CacheConfig(num_blocks=7), max_waiting_requests=3),
                         server=ServerConfig(port=1234, model_aliases=(("a*", "x"),)))  # fmt: skip
    assert ServeConfig.from_json(config.to_json()) == config
    data = to_dict(config)
    data["engine"]["cache"]["blocks"] = 3
    with pytest.raises(ValueError, match="CacheConfig: unknown field"):
        from_dict(ServeConfig, data)


def test_options_by_name_reach_their_part() -> None:
    config = with_options(ServeConfig(), {"max_num_seqs": 4, "kv_cache_memory_bytes": "1GiB",
                                          "served_model_name": "smol", "port": 9, "max_waiting_requests": 5})  # fmt: skip
    assert config.engine.scheduler.max_num_seqs == 4 and config.engine.cache.kv_cache_memory_bytes == 1 << 30
    assert config.engine.model.served_model_name == "smol" and config.server.port == 9
    assert config.engine.max_waiting_requests == 5
    with pytest.raises(ValueError, match=r"d\.options\.nope: not an engine or server option"):
        with_options(ServeConfig(), {"nope": 1}, "d.options")
    with pytest.raises(ValueError, match="api_key"):
        with_options(ServeConfig(), {"api_key": "k"})
    with pytest.raises(ValueError, match="block_size"):
        with_options(ServeConfig(), {"block_size": 0})


def test_cluster_config_checks_its_bounds() -> None:
    with pytest.raises(ValueError, match="together"):
        ClusterConfig(min_replicas=1)
    with pytest.raises(ValueError, match="min-replicas"):
        ClusterConfig(min_replicas=3, max_replicas=2)


def test_speculative_config_flag_takes_vllm_json_and_travels_to_replicas(capsys) -> None:
    config = serve_config(_args("--speculative-config", '{"method": "suffix", "num_speculative_tokens": 6}'))
    assert config.engine.speculative_config == SpeculativeConfig(method="suffix", num_speculative_tokens=6)
    assert ServeConfig.from_json(config.to_json()) == config
    assert serve_config(_args()).engine.speculative_config == "auto"
    with pytest.raises(SystemExit):
        _args("--speculative-config", '{"method": "eagle"}')
    assert "needs a draft model" in capsys.readouterr().err
    spec = with_options(ServeConfig(), {"speculative_config": {"method": "ngram"}}).engine.speculative_config
    assert spec == SpeculativeConfig(method="ngram", num_speculative_tokens=5, prompt_lookup_min=5, prompt_lookup_max=5)
    with pytest.raises(ValueError, match="unknown key"):
        with_options(ServeConfig(), {"speculative_config": {"method": "ngram", "k": 1}})


def test_speculation_is_suffix_by_default_on_a_cpu_and_can_be_turned_off() -> None:
    auto = serve_config(_args()).engine
    assert resolve_speculative(auto.speculative_config, "cpu") == SpeculativeConfig(method="suffix")
    assert resolve_speculative(auto.speculative_config, "cuda") is None  # not measured there: off
    assert ServeConfig.from_json(ServeConfig(engine=auto).to_json()).engine == auto
    for off in ("off", "OFF", "none", "null", " off "):
        engine = serve_config(_args("--speculative-config", off)).engine
        assert engine.speculative_config is None and resolve_speculative(engine.speculative_config, "cpu") is None
        assert ServeConfig.from_json(ServeConfig(engine=engine).to_json()).engine.speculative_config is None
    assert EngineConfig(speculative_config=None).speculative_config is None  # LLM(speculative_config=None)
    assert with_options(ServeConfig(), {"speculative_config": "off"}).engine.speculative_config is None
    with pytest.raises(ValueError, match="JSON"):
        EngineConfig(speculative_config="sufix")
