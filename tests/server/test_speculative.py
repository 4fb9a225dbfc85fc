"""Speculative decoding through the HTTP server: several tokens a step reach the client as the same text,
usage and logprobs, and the engine's counters are exported under vLLM's metric names."""

from __future__ import annotations

import anthropic
import openai
import pytest

from tests.server.conftest import MODEL, start_server

PROMPT = "The quick brown fox jumps over the lazy dog. " * 6


@pytest.fixture(scope="module")
def servers(tiny_model_dir):
    plain = start_server(tiny_model_dir, speculative_config="off")
    spec = start_server(tiny_model_dir, speculative_config={"method": "suffix", "num_speculative_tokens": 6})
    yield plain, spec
    for r in (plain, spec):
        r.server.should_exit = True
        r.thread.join(timeout=10)


def _client(r) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{r.url}/v1", api_key="none", max_retries=0)


def test_streams_and_whole_responses_match_speculation_off(servers):
    plain, spec = servers
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    for _ in range(2):  # the second time the suffix corpus knows the answer: long drafts
        a = _client(plain).completions.create(**kwargs)
        b = _client(spec).completions.create(**kwargs)
        assert b.choices[0].text == a.choices[0].text
        assert b.usage.completion_tokens == a.usage.completion_tokens == 40
        assert b.choices[0].logprobs.tokens == a.choices[0].logprobs.tokens
        assert b.choices[0].logprobs.token_logprobs == pytest.approx(a.choices[0].logprobs.token_logprobs, abs=1e-4)
        chunks = list(_client(spec).completions.create(**kwargs, stream=True))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == a.choices[0].text
    chat = dict(model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=30, temperature=0)
    a = _client(plain).chat.completions.create(**chat)
    b = _client(spec).chat.completions.create(**chat)
    assert b.choices[0].message.content == a.choices[0].message.content
    assert b.choices[0].finish_reason == a.choices[0].finish_reason


def test_responses_and_messages_streams_match_speculation_off(servers):
    """Several tokens a step reach the Responses and Anthropic Messages streams as the same text and usage."""
    plain, spec = servers
    texts = {}
    for name, r in (("off", plain), ("on", spec)):
        client = _client(r)
        kw = dict(model=MODEL, input=PROMPT, max_output_tokens=40, temperature=0, store=False)
        for _ in range(2):  # the second time the suffix corpus knows the answer
            whole = client.responses.create(**kw)
            with client.responses.stream(**kw) as stream:
                events = list(stream)
            deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
            assert deltas == events[-1].response.output_text == whole.output_text
            assert events[-1].response.usage.output_tokens == whole.usage.output_tokens
            assert [e.sequence_number for e in events] == list(range(len(events)))
            texts.setdefault(("responses", name), set()).add(whole.output_text)
        ant = anthropic.Anthropic(base_url=r.url, api_key="none", max_retries=0)
        kw = dict(
            model=MODEL, max_tokens=40, messages=[{"role": "user", "content": PROMPT}], extra_body={"temperature": 0}
        )  # this SDK version has no temperature argument
        for _ in range(2):
            whole = ant.messages.create(**kw)
            with ant.messages.stream(**kw) as stream:
                streamed = "".join(stream.text_stream)
                final = stream.get_final_message()
            assert streamed == final.content[0].text == whole.content[0].text
            assert final.usage.output_tokens == whole.usage.output_tokens and final.stop_reason == whole.stop_reason
            texts.setdefault(("messages", name), set()).add(whole.content[0].text)
    assert spec.metric("vllm:spec_decode_num_accepted_tokens_total") > 0
    for api in ("responses", "messages"):
        assert len(texts[(api, "on")]) == 1 and texts[(api, "on")] == texts[(api, "off")]


def test_spec_decode_metrics_under_vllm_names(servers):
    plain, spec = servers
    _client(spec).completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True})  # fmt: skip
    drafts = spec.metric("vllm:spec_decode_num_drafts_total")
    proposed = spec.metric("vllm:spec_decode_num_draft_tokens_total")
    accepted = spec.metric("vllm:spec_decode_num_accepted_tokens_total")
    per_pos = spec.metric("vllm:spec_decode_num_accepted_tokens_per_pos_total", 'position="0"')
    assert 0 < drafts and 0 < accepted <= proposed and 0 < per_pos <= drafts
    assert "vllm:spec_decode" not in __import__("httpx").get(f"{plain.url}/metrics").text  # off: not exported


def test_engine_steps_and_their_seconds_by_kind(servers):
    plain, spec = servers
    for r in servers:
        _client(r).completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0,
                                      extra_body={"ignore_eos": True})  # fmt: skip
    for kind in ("prefill", "decode"):  # every request has a prompt chunk; speculation off only decodes
        assert plain.metric("agora:engine_steps_total", f'kind="{kind}"') > 0
        assert plain.metric("agora:engine_step_seconds_total", f'kind="{kind}"') > 0
    assert plain.metric("agora:engine_steps_total", 'kind="verify"') == 0
    assert spec.metric("agora:engine_steps_total", 'kind="verify"') > 0  # its drafts were checked
    assert spec.metric("agora:engine_step_seconds_total", 'kind="verify"') > 0


def test_a_cpu_server_speculates_by_default(tiny_model_dir):
    r = start_server(tiny_model_dir)  # speculative_config "auto", as `agora serve` without the flag
    try:
        kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
        for _ in range(2):  # the second time the suffix corpus knows the answer
            _client(r).completions.create(**kwargs)
        assert r.engine.proposer is not None
        assert r.metric("vllm:spec_decode_num_accepted_tokens_total") > 0
        assert r.metric("agora:engine_steps_total", 'kind="verify"') > 0
    finally:
        r.server.should_exit = True
        r.thread.join(timeout=10)
