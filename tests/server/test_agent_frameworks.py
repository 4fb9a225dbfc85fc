"""Agent frameworks as users run them against `agora serve`: the OpenAI Agents SDK (its chat
completions model) runs an agent that calls a function tool, and LangChain's ChatOpenAI calls
tools with bind_tools and answers with with_structured_output. A tiny random model: required tool
choice and the response schema are enforced by grammars, so the frameworks always get parseable
calls and answers."""

from __future__ import annotations

import pydantic
import pytest

from tests.server.conftest import MODEL, start_server, stop_server

pytest.importorskip("xgrammar")


@pytest.fixture(scope="module")
def server(tiny_long_model_dir):
    r = start_server(tiny_long_model_dir)
    yield r
    stop_server(r)


class Forecast(pydantic.BaseModel):
    city: str
    degrees: int


def weather_tool(agents, calls: list[str]):  # noqa: ANN001, ANN201
    """The Agents SDK function tool the agents call; each call's city goes into ``calls``."""

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"It is sunny in {city}."

    return get_weather


async def test_openai_agents_sdk_runs_a_tool(server) -> None:
    agents = pytest.importorskip("agents")
    from openai import AsyncOpenAI

    calls: list[str] = []
    get_weather = weather_tool(agents, calls)
    client = AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    model = agents.OpenAIChatCompletionsModel(model=MODEL, openai_client=client)
    agent = agents.Agent(name="weather", instructions="Answer with the weather.", tools=[get_weather], model=model,
                         model_settings=agents.ModelSettings(tool_choice="required", max_tokens=200, temperature=0.7))  # fmt: skip
    agents.set_tracing_disabled(True)
    result = await agents.Runner.run(agent, "What is the weather in Paris?", max_turns=4)
    assert calls, "the agent called its tool"
    assert isinstance(result.final_output, str)
    kinds = [item.type for item in result.new_items]
    assert "tool_call_item" in kinds and "tool_call_output_item" in kinds
    # an agent with an output type gets its answer as that type (response_format json_schema)
    typed = agents.Agent(name="typed", instructions="Answer as JSON.", output_type=Forecast, model=model,
                         model_settings=agents.ModelSettings(max_tokens=200, temperature=0.7))  # fmt: skip
    out = await agents.Runner.run(typed, "Forecast for Oslo?", max_turns=2)
    assert isinstance(out.final_output, Forecast)
    await client.close()


def test_langchain_bind_tools_and_structured_output(server) -> None:
    pytest.importorskip("langchain_openai")
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str, unit: str = "celsius") -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    llm = ChatOpenAI(base_url=f"{server.url}/v1", api_key="unused", model=MODEL, max_tokens=200, temperature=0.7,
                     max_retries=0)  # fmt: skip
    msg = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Rome?")
    assert [c["name"] for c in msg.tool_calls] == ["get_weather"]
    assert isinstance(msg.tool_calls[0]["args"]["city"], str)
    chunks = list(llm.bind_tools([get_weather], tool_choice="required").stream("Weather in Rome?"))
    merged = chunks[0]
    for c in chunks[1:]:
        merged = merged + c
    assert merged.tool_calls and merged.tool_calls[0]["name"] == "get_weather"
    for method in ("json_schema", "function_calling"):  # json_mode promises JSON, not the schema
        structured = llm.with_structured_output(Forecast, method=method)
        out = structured.invoke("Forecast for Oslo as JSON with city and degrees.")
        assert isinstance(out, Forecast), method
