"""The real default model (SmolLM2-135M-Instruct, whose chat template knows no tools) calling tools
and answering in a schema, through the openai client and the OpenAI Agents SDK."""

from __future__ import annotations

import json

import openai
import pydantic
import pytest

from tests.server.conftest import start_server, stop_server

pytestmark = pytest.mark.slow
pytest.importorskip("xgrammar")

NAME = "SmolLM2-135M-Instruct"
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "web_search", "description": "Search the web",
     "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}},
]  # fmt: skip
MSG = [{"role": "user", "content": "What is the weather in Paris right now?"}]


class City(pydantic.BaseModel):
    city: str
    country: str
    population: int


@pytest.fixture(scope="module")
def server(smollm2_gguf):
    r = start_server(smollm2_gguf, served_model_name=NAME)
    yield r
    stop_server(r)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_forced_and_named_calls(client) -> None:
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        out = client.chat.completions.create(model=NAME, messages=MSG, tools=TOOLS, tool_choice=choice, max_tokens=80,
                                             temperature=0).choices[0]  # fmt: skip
        assert out.finish_reason == "tool_calls"
        call = out.message.tool_calls[0]
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments)["city"] == "Paris"


def test_structured_answer_even_when_the_budget_is_tight(client) -> None:
    for max_tokens in (40, 200):
        out = client.chat.completions.parse(model=NAME, messages=[{"role": "user", "content": "Describe Paris."}],
                                            response_format=City, max_tokens=max_tokens, temperature=0)  # fmt: skip
        assert out.choices[0].finish_reason == "stop" and isinstance(out.choices[0].message.parsed, City)


async def test_agents_sdk_with_the_real_model(server) -> None:
    agents = pytest.importorskip("agents")

    seen: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        seen.append(city)
        return f"It is 18 degrees and sunny in {city}."

    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    agent = agents.Agent(name="weather", instructions="You answer questions about the weather.", tools=[get_weather],
                         model=agents.OpenAIChatCompletionsModel(model=NAME, openai_client=client),
                         model_settings=agents.ModelSettings(tool_choice="required", parallel_tool_calls=False,
                                                             max_tokens=120, temperature=0))  # fmt: skip
    agents.set_tracing_disabled(True)
    result = await agents.Runner.run(agent, "What is the weather in Paris?", max_turns=4)
    assert seen == ["Paris"]
    assert isinstance(result.final_output, str) and result.final_output
    await client.close()
