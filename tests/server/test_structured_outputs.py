"""Structured outputs through the API, checked with the official openai client: every
response_format form, vLLM's structured_outputs and guided_* fields, streamed and not, and the
budget ending (always valid, finish_reason stop) on a tiny random model."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pydantic
import pytest

from agora.config import StructuredOutputsConfig
from tests.server.conftest import MODEL, start_server, stop_server

pytest.importorskip("xgrammar")


class City(pydantic.BaseModel):
    name: str
    population: int
    landmarks: list[str]


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


MSG = [{"role": "user", "content": "Describe Paris."}]


def test_parse_with_a_pydantic_model(client) -> None:
    for max_tokens in (60, 200):
        out = client.chat.completions.parse(model=MODEL, messages=MSG, response_format=City, max_tokens=max_tokens,
                                            temperature=0)  # fmt: skip
        choice = out.choices[0]
        assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, City)


def test_every_response_format_streamed_and_not(client) -> None:
    schema = {
        "type": "json_schema",
        "json_schema": {"name": "city", "schema": City.model_json_schema(), "strict": True},
    }
    for fmt, check in [
        ({"type": "json_object"}, lambda v: isinstance(v, dict)),
        (schema, lambda v: City.model_validate(v)),
        (
            {"type": "json_schema", "json_schema": {"name": "any"}},
            lambda v: isinstance(v, dict),
        ),  # no schema: an object
    ]:
        whole = client.chat.completions.create(model=MODEL, messages=MSG, response_format=fmt, max_tokens=80,
                                               temperature=1.0, seed=3)  # fmt: skip
        assert check(json.loads(whole.choices[0].message.content))
        stream = client.chat.completions.create(model=MODEL, messages=MSG, response_format=fmt, max_tokens=80,
                                                temperature=1.0, seed=3, stream=True)  # fmt: skip
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == whole.choices[0].message.content
    text = client.chat.completions.create(model=MODEL, messages=MSG, response_format={"type": "text"}, max_tokens=5,
                                          temperature=0)  # fmt: skip
    assert text.choices[0].message.content is not None


def test_vllm_fields_on_chat_and_completions(client) -> None:
    cases = [
        ({"structured_outputs": {"regex": r"\d{3}-[a-z]+"}}, lambda t: re.fullmatch(r"\d{3}-[a-z]+", t)),
        ({"structured_outputs": {"choice": ["red", "green", "blue"]}}, lambda t: t in ("red", "green", "blue")),
        ({"structured_outputs": {"grammar": 'root ::= "x" [0-9]+'}}, lambda t: re.fullmatch(r"x[0-9]+", t)),
        ({"structured_outputs": {"json": City.model_json_schema()}}, lambda t: City.model_validate_json(t)),
        ({"structured_outputs": {"json": json.dumps({"type": "array", "items": {"type": "integer"}, "minItems": 2})}},
         lambda t: len(json.loads(t)) >= 2),
        ({"guided_json": City.model_json_schema()}, lambda t: City.model_validate_json(t)),
        ({"guided_choice": ["a", "b"]}, lambda t: t in ("a", "b")),
        ({"guided_regex": "[A-Z]{4}", "guided_decoding_backend": "xgrammar"}, lambda t: re.fullmatch("[A-Z]{4}", t)),
    ]  # fmt: skip
    for extra, ok in cases:
        comp = client.completions.create(model=MODEL, prompt="Answer:", max_tokens=80, temperature=1.0, seed=1,
                                         extra_body=extra)  # fmt: skip
        assert ok(comp.choices[0].text), (extra, comp.choices[0].text)
        chat = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=80, temperature=1.0, seed=1,
                                              extra_body=extra)  # fmt: skip
        assert ok(chat.choices[0].message.content), (extra, chat.choices[0].message.content)


def test_n_and_several_prompts_each_valid(client) -> None:
    out = client.completions.create(model=MODEL, prompt=["A", "B"], n=3, max_tokens=50, temperature=1.0, seed=2,
                                    extra_body={"structured_outputs": {"json": City.model_json_schema()}})  # fmt: skip
    assert len(out.choices) == 6
    for c in out.choices:
        City.model_validate_json(c.text)


def test_a_slow_compile_is_a_400_and_the_server_stays_up(tiny_model_dir) -> None:
    r = start_server(tiny_model_dir, structured=StructuredOutputsConfig(compile_timeout_s=0.001))
    try:
        big = {
            "type": "object",
            "properties": {f"p{i}": {"type": "string", "pattern": "[a-z]{2,9}"} for i in range(40)},
        }
        resp = httpx.post(f"{r.url}/v1/completions", json={"prompt": "x", "max_tokens": 4,
                          "structured_outputs": {"json": big}}, timeout=60)  # fmt: skip
        assert resp.status_code == 400, resp.text
        err = resp.json()["error"]
        assert err["param"] == "structured_outputs" and "longer than" in err["message"]
        assert httpx.get(f"{r.url}/health").status_code == 200
    finally:
        stop_server(r)
