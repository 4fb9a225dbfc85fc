"""Router config: every mistake is refused with the key it is about."""

from __future__ import annotations

import pytest

from agora.router.config import ConfigError, load_config, parse_config

GOOD = """
endpoints:
  - url: http://127.0.0.1:8001/v1
    models: [m]
  - url: http://127.0.0.1:8002/
    name: second
gateway:
  port: 9000
  max_body_bytes: 1MiB
plugins:
  - name: long-prefix
    type: prefix-cache-scorer
    parameters: {block_chars: 256}
schedulingProfiles:
  - name: mine
    plugins:
      - {pluginRef: long-prefix, weight: 3}
      - {pluginRef: in-flight-scorer}
      - {pluginRef: random-picker}
profile: mine
"""


def test_good_config(tmp_path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(GOOD)
    config = load_config(path)
    endpoints = config.build_endpoints()
    assert [(e.name, e.url, e.declared_models) for e in endpoints] == [
        ("127.0.0.1:8001", "http://127.0.0.1:8001", frozenset({"m"})),
        ("second", "http://127.0.0.1:8002", None),
    ]
    assert config.gateway.max_body_bytes == 1 << 20
    profile = config.build_profile()
    assert [w.scorer.name for w in profile.scorers] == ["long-prefix", "in-flight-scorer"]
    assert [w.weight for w in profile.scorers] == [3, 1]
    assert profile.scorers[0].scorer.params.block_chars == 256
    assert profile.picker.name == "random-picker"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"endpoint": []}, "endpoint: unknown key"),
        ({"gateway": {"retrys": 2}}, "gateway.retrys: unknown key"),
        ({"gateway": {"retries": -1}}, "gateway.retries: Input should be greater than or equal to 0"),
        ({"gateway": {"port": "http"}}, "gateway.port:"),
        ({"endpoints": [{"url": "localhost:8000"}]}, "endpoints[0].url: Value error, endpoint URL must look like"),
        ({"endpoints": [{"url": "http://a:1", "name": "x"}, {"url": "http://b:1", "name": "x"}]},
         "endpoints[1].name: 'x' is used twice"),
        ({"endpoints": [{"url": "http://a:1", "api_key_env": "AGORA_TEST_UNSET_KEY"}]},
         "endpoints[0].api_key_env: the variable AGORA_TEST_UNSET_KEY is not set"),
        ({"plugins": [{"type": "magic-scorer"}]}, "plugins[0].type: unknown plugin type 'magic-scorer'"),
        ({"plugins": [{"type": "prefix-cache-scorer", "parameters": {"block_chars": 0}}]},
         "plugins[0].parameters.block_chars: Input should be greater than or equal to 4"),
        ({"plugins": [{"type": "queue-scorer", "parameters": {"treshold": 3}}]},
         "plugins[0].parameters.treshold: unknown key"),
        ({"plugins": [{"type": "queue-scorer"}, {"type": "queue-scorer"}]}, "plugins[1].name: 'queue-scorer' is defined twice"),
        ({"profile": "fastest"}, "profile: no profile named 'fastest'"),
        ({"schedulingProfiles": [{"name": "p", "plugins": [{"pluginRef": "nope"}]}], "profile": "p"},
         "schedulingProfiles[0].plugins[0].pluginRef: no plugin named 'nope'"),
        ({"schedulingProfiles": [{"name": "p", "plugins": [{"pluginRef": "random-picker"},
                                                           {"pluginRef": "max-score-picker"}]}], "profile": "p"},
         "schedulingProfiles[0].plugins: at most one picker"),
        ({"schedulingProfiles": [{"name": "p", "plugins": [{"pluginRef": "queue-scorer", "weight": -1}]}]},
         "schedulingProfiles[0].plugins[0].weight: Input should be greater than or equal to 0"),
        ([1, 2], "the top level must be a mapping"),
    ],
)  # fmt: skip
def test_bad_config_names_the_key(data, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(data, "router.yaml")
    assert str(exc.value).startswith("router.yaml: ")
    assert message in str(exc.value)


def test_bad_yaml_and_missing_file(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("endpoints: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="No such file"):
        load_config(tmp_path / "missing.yaml")


def test_gateway_key_comes_from_the_flag_then_the_config_then_the_environment(tmp_path, monkeypatch) -> None:
    import argparse

    from agora.router.cli import add_parser, build_config

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    with_key = tmp_path / "with_key.yaml"
    with_key.write_text("endpoints: [{url: 'http://127.0.0.1:8001/v1'}]\ngateway: {api_key: from-config}\n")
    plain = ["route", "--endpoint", "http://127.0.0.1:8001/v1"]

    def key(*argv: str) -> str | None:
        return build_config(parser.parse_args(list(argv))).gateway.api_key

    monkeypatch.delenv("AGORA_API_KEY", raising=False)
    assert key(*plain) is None
    monkeypatch.setenv("AGORA_API_KEY", "-from-env")
    assert key(*plain) == "-from-env"
    assert key("route", "--config", str(with_key)) == "from-config"
    assert key("route", "--config", str(with_key), "--api-key", "from-flag") == "from-flag"


def test_route_flags_override_the_gateway_section(tmp_path) -> None:
    import argparse

    from agora.router.cli import add_parser, build_config

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    path = tmp_path / "router.yaml"
    path.write_text("endpoints: [{url: 'http://127.0.0.1:8001/v1'}]\n"
                    "gateway: {allowed_origins: ['https://a.example'], client_timeout_s: 30, shutdown_timeout_s: 5}\n")  # fmt: skip
    g = build_config(parser.parse_args(["route", "--config", str(path)])).gateway
    assert (g.allowed_origins, g.client_timeout_s, g.shutdown_timeout_s) == (["https://a.example"], 30, 5)
    g = build_config(parser.parse_args(["route", "--config", str(path), "--allowed-origins", '["*"]',
                                        "--client-timeout", "9", "--shutdown-timeout", "0"])).gateway  # fmt: skip
    assert (g.allowed_origins, g.client_timeout_s, g.shutdown_timeout_s) == (["*"], 9, 0)
    with pytest.raises(ConfigError, match="allowed origin 'https://a.example/x'"):
        parse_config({"endpoints": [{"url": "http://x:1/v1"}], "gateway": {"allowed_origins": ["https://a.example/x"]}},
                     "router.yaml")  # fmt: skip
