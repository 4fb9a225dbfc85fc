"""Each scheduling plugin and profile, table-driven over fake endpoint states."""

from __future__ import annotations

import random

import pytest

from agora.router.admission import admit
from agora.router.config import RouterConfig, parse_config
from agora.router.endpoints import Endpoint, parse_vllm_metrics
from agora.router.plugins.filters import LoadBalanceFilter
from agora.router.plugins.pickers import MaxScorePicker, RandomPicker, RoundRobinPicker
from agora.router.plugins.scorers import (
    InFlightScorer,
    KVCacheScorer,
    PrefixCacheScorer,
    PrefixIndex,
    QueueScorer,
    SessionAffinityScorer,
)
from agora.router.request import RequestInfo, chat_prompt_text
from agora.server.http import APIError


def ep(name: str, in_flight: int = 0, running: int = 0, waiting: int = 0, kv: float = 0.0,
       models: tuple[str, ...] = ("m",), healthy: bool = True) -> Endpoint:  # fmt: skip
    e = Endpoint(name=name, url=f"http://{name}", declared_models=frozenset(models))
    e.in_flight, e.running, e.waiting, e.kv_usage, e.healthy = in_flight, running, waiting, kv, healthy
    return e


def req(text: str = "", model: str = "m", session: str | None = None, tokens: list[int] | None = None) -> RequestInfo:
    return RequestInfo(path="/v1/completions", model=model, session=session, prompt_text=text, prompt_tokens=tokens)


# -- scorers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scorer", "states", "expected"),
    [
        (InFlightScorer("s"), [dict(in_flight=0), dict(in_flight=5), dict(in_flight=20)], [1.0, 0.75, 0.0]),
        (InFlightScorer("s"), [dict(in_flight=0), dict(in_flight=0)], [1.0, 1.0]),
        # load is the larger of the gateway's count and what the endpoint reports
        (InFlightScorer("s"), [dict(in_flight=1, running=3, waiting=1), dict(in_flight=8)], [0.5, 0.0]),
        (QueueScorer("s", QueueScorer.Params(threshold=8)), [dict(waiting=0), dict(waiting=4), dict(waiting=8),
                                                             dict(waiting=100)], [1.0, 0.5, 0.0, 0.0]),
        (KVCacheScorer("s"), [dict(kv=0.0), dict(kv=0.25), dict(kv=1.0)], [1.0, 0.75, 0.0]),
    ],
)  # fmt: skip
def test_load_scorers(scorer, states, expected) -> None:
    endpoints = [ep(f"e{i}", **s) for i, s in enumerate(states)]
    assert scorer.score(req(), endpoints) == pytest.approx(expected)


def test_prefix_index_match_and_lru_order() -> None:
    index = PrefixIndex(capacity=3)
    index.insert("a", [1, 2, 3])  # stored tail first: 3, 2, 1 (1 most recent)
    assert index.match("a", [1, 2, 3, 4]) == 3
    assert index.match("a", [7, 2, 3]) == 0  # a prefix must match from its first block
    index.insert("a", [9])  # over capacity: the oldest entry (the tail block 3) goes first
    assert index.match("a", [1, 2, 3]) == 2
    assert index.size("a") == 3
    index.forget("a")
    assert index.match("a", [1]) == 0


@pytest.mark.parametrize(
    ("history", "prompt", "expected"),
    [
        ([], "aaaabbbbcccc", [0.0, 0.0]),
        ([("aaaabbbb", 0)], "aaaabbbbcccc", [2 / 3, 0.0]),
        ([("aaaabbbbcccc", 1)], "aaaabbbbcccc", [0.0, 1.0]),
        ([("aaaaXbbbcccc", 0)], "aaaabbbbcccc", [1 / 3, 0.0]),  # diverges in block 2
        ([("aaaabbbb", 0)], "aaa", [0.0, 0.0]),  # shorter than a block: nothing to match
        ([("zzzzbbbb", 1)], "aaaabbbb", [0.0, 0.0]),  # same block text at another position is no match
    ],
)
def test_prefix_cache_scorer(history: list[tuple[str, int]], prompt: str, expected: list[float]) -> None:
    scorer = PrefixCacheScorer("p", PrefixCacheScorer.Params(block_chars=4))
    endpoints = [ep("a"), ep("b")]
    for text, i in history:
        scorer.on_pick(req(text), endpoints[i])
    assert scorer.score(req(prompt), endpoints) == pytest.approx(expected)


def test_prefix_cache_scorer_token_blocks_models_and_ejection() -> None:
    scorer = PrefixCacheScorer("p", PrefixCacheScorer.Params(block_tokens=2))
    a, b = ep("a"), ep("b")
    first = req(tokens=[1, 2, 3, 4, 5])
    scorer.on_pick(first, a)
    assert first.notes["prefix_blocks"] == (0, 2)
    assert scorer.score(req(tokens=[1, 2, 3, 4, 9, 9]), [a, b]) == pytest.approx([2 / 3, 0.0])
    assert scorer.score(req(tokens=[1, 2, 3, 4], model="other"), [a, b]) == [0.0, 0.0]  # per model
    scorer.on_eject(a)
    assert scorer.score(req(tokens=[1, 2, 3, 4]), [a, b]) == [0.0, 0.0]


def test_session_affinity_scorer() -> None:
    scorer = SessionAffinityScorer("s", SessionAffinityScorer.Params(max_load=4))
    a, b = ep("a"), ep("b")
    assert scorer.score(req(session="u1"), [a, b]) == [0.0, 0.0]
    scorer.on_pick(req(session="u1"), b)
    assert scorer.score(req(session="u1"), [a, b]) == [0.0, 1.0]
    assert scorer.score(req(session="u2"), [a, b]) == [0.0, 0.0]
    assert scorer.score(req(), [a, b]) == [0.0, 0.0]
    b.in_flight = 4  # overloaded: no longer sticky
    assert scorer.score(req(session="u1"), [a, b]) == [0.0, 0.0]
    b.in_flight = 0
    scorer.on_eject(b)
    assert scorer.score(req(session="u1"), [a, b]) == [0.0, 0.0]


# -- filters and pickers ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loads", "kept"),
    [
        ([0, 4, 5], ["e0", "e1"]),  # 5 is more than 4 above the least loaded
        ([10, 15], ["e0", "e1"]),  # 5 above, but not more than 1.5x
        ([10, 16], ["e0"]),
        ([3, 3, 3], ["e0", "e1", "e2"]),
        ([7], ["e0"]),
    ],
)
def test_load_balance_filter(loads: list[int], kept: list[str]) -> None:
    f = LoadBalanceFilter("f", LoadBalanceFilter.Params(max_imbalance=4, max_ratio=1.5))
    endpoints = [ep(f"e{i}", in_flight=n) for i, n in enumerate(loads)]
    assert [e.name for e in f.filter(req(), endpoints)] == kept


def test_pickers() -> None:
    a, b, c = ep("a"), ep("b"), ep("c")
    rng = random.Random(0)
    assert MaxScorePicker("p").pick(req(), [a, b, c], [0.1, 0.9, 0.5], rng) is b
    tied = {MaxScorePicker("p").pick(req(), [a, b, c], [1.0, 1.0, 0.0], rng).name for _ in range(50)}
    assert tied == {"a", "b"}  # random tie-break among the best only
    rr = RoundRobinPicker("p")
    assert [rr.pick(req(), [c, a, b], [0, 0, 0], rng).name for _ in range(4)] == ["a", "b", "c", "a"]
    assert {RandomPicker("p").pick(req(), [a, b, c], [9, 0, 0], rng).name for _ in range(60)} == {"a", "b", "c"}


# -- admission and profiles ---------------------------------------------------------------


def test_admission() -> None:
    a, b = ep("a", models=("m", "x")), ep("b", models=("m",))
    assert admit([a, b], "x", 8) == [a]
    with pytest.raises(APIError) as e:
        admit([a, b], "nope", 8)
    assert e.value.status == 404 and "m, x" in e.value.message
    assert admit([a, b], "m", 8, exclude=["a"]) == [b]
    b.healthy = False
    with pytest.raises(APIError) as e:
        admit([a, b], "m", 8, exclude=["a"])
    assert e.value.status == 503
    a.in_flight = 8
    with pytest.raises(APIError) as e:
        admit([a, b], "m", 8)
    assert e.value.status == 429 and e.value.headers == {"Retry-After": "1"}
    unknown = Endpoint(name="u", url="http://u")  # not yet asked for its models: 503, not 404
    with pytest.raises(APIError) as e:
        admit([unknown], "m", 8)
    assert e.value.status == 503


def profile_of(name: str, **params):  # noqa: ANN201
    return parse_config({"profile": name, "gateway": {"seed": 0}, **params}).build_profile()


@pytest.mark.parametrize("name", ["round-robin", "random", "least-load", "prefix-aware"])
def test_shipped_profiles_build(name: str) -> None:
    profile = RouterConfig(profile=name).build_profile()
    assert profile.name == name
    assert profile.pick(req("x" * 200), [ep("a"), ep("b")]).endpoint.name in ("a", "b")


def test_least_load_profile_picks_least_loaded() -> None:
    profile = profile_of("least-load")
    endpoints = [ep("a", in_flight=3), ep("b", in_flight=1, kv=0.1), ep("c", in_flight=1, waiting=2)]
    decision = profile.pick(req(), endpoints)
    assert decision.endpoint.name == "b"
    assert decision.totals["b"] > decision.totals["c"] > decision.totals["a"]


def test_prefix_aware_balances_new_prompts_and_keeps_conversations() -> None:
    """Agents arriving together spread out; each agent's next turn returns to its endpoint."""
    profile = profile_of("prefix-aware")
    a, b = ep("a"), ep("b")
    system = "You are a coding agent with tools. " * 20
    first_turn: dict[int, str] = {}
    for agent in range(8):
        chosen = profile.pick(req(system + f"agent {agent} task: fix bug number {agent} " * 4), [a, b]).endpoint
        chosen.in_flight += 1  # still running while the others arrive
        first_turn[agent] = chosen.name
    assert sorted(first_turn.values()).count("a") == 4
    for agent in range(8):
        history = system + f"agent {agent} task: fix bug number {agent} " * 4 + "tool result: ok " * 30
        assert profile.pick(req(history), [a, b]).endpoint.name == first_turn[agent]


def test_round_robin_profile_ignores_prefix() -> None:
    profile = profile_of("round-robin")
    a, b = ep("a"), ep("b")
    picks = [profile.pick(req("same prompt " * 20), [a, b]).endpoint.name for _ in range(4)]
    assert picks == ["a", "b", "a", "b"]


def test_profile_clamps_and_weights_scores() -> None:
    profile = profile_of(
        "mine",
        plugins=[{"name": "q", "type": "queue-scorer", "parameters": {"threshold": 2}}],
        schedulingProfiles=[{"name": "mine", "plugins": [{"pluginRef": "q", "weight": 2},
                                                         {"pluginRef": "kv-cache-scorer", "weight": 0.5}]}],
    )  # fmt: skip
    decision = profile.pick(req(), [ep("a", waiting=1, kv=0.5), ep("b", waiting=2)])
    assert decision.totals == pytest.approx({"a": 2 * 0.5 + 0.5 * 0.5, "b": 0.0 + 0.5 * 1.0})
    assert decision.endpoint.name == "a"
    assert set(profile.plugin_seconds) == {"q", "kv-cache-scorer", "max-score-picker"}


# -- request parsing and metrics parsing ------------------------------------------------------


def test_request_info_from_bodies() -> None:
    chat = RequestInfo.from_body("/v1/chat/completions", {"model": "m", "user": "u7", "stream": True, "messages": [
        {"role": "system", "content": "sys"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, None)  # fmt: skip
    assert (chat.model, chat.session, chat.stream) == ("m", "u7", True)
    assert chat.prompt_text == "<|system|>sys<|user|>hi"
    assert RequestInfo.from_body("/v1/completions", {"prompt": ["a", "b"]}, "s1").prompt_text == "a"
    assert RequestInfo.from_body("/v1/completions", {"prompt": [1, 2, 3]}, "s1").prompt_tokens == [1, 2, 3]
    assert RequestInfo.from_body("/v1/completions", {"prompt": [[4, 5]]}, None).prompt_tokens == [4, 5]
    assert RequestInfo.from_body("/v1/completions", {"prompt": "p"}, "hdr").session == "hdr"
    assert chat_prompt_text("not a list") == ""


def test_parse_vllm_metrics() -> None:
    text = """# HELP vllm:num_requests_running Requests in the running batch.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="a b"} 3.0
vllm:num_requests_running{model_name="c"} 1.0
vllm:num_requests_waiting{model_name="a b"} 2.0 1700000000
vllm:gpu_cache_usage_perc{model_name="a b"} 0.5
vllm:prefix_cache_hits_total{model_name="a b"} 99.0
"""
    assert parse_vllm_metrics(text) == (4, 2, 0.5)
    assert parse_vllm_metrics("process_cpu_seconds_total 3.0\n") is None


async def test_a_health_check_in_flight_does_not_undo_an_ejection() -> None:
    from agora.router.endpoints import EndpointPool

    a = ep("a")
    pool = EndpointPool([a])

    async def answer_after_ejection(endpoint: Endpoint, path: str) -> tuple[int, bytes]:
        pool.eject(endpoint)  # failed requests eject it while this check awaits its answer
        return 200, b""

    pool._get = answer_after_ejection  # type: ignore[method-assign]
    await pool.check(a)
    assert not a.healthy and a.ejected_until > 0

    async def healthy(endpoint: Endpoint, path: str) -> tuple[int, bytes]:
        return 200, b""

    pool._get = healthy  # type: ignore[method-assign]
    await pool.check(a)  # the probe after the back-off brings it back
    assert a.healthy and a.ejected_until == 0
