"""The official openai client works unchanged: sync, async, streaming, errors."""

from __future__ import annotations

import openai
import pytest

from tests.server.conftest import MODEL


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_sync_chat_and_completion(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello world!"}], max_tokens=8, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.completion_tokens == 8
    comp = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0,
                                     logprobs=2, extra_body={"ignore_eos": True})  # fmt: skip
    assert comp.usage.completion_tokens == 5
    assert len(comp.choices[0].logprobs.tokens) == 5


def test_streaming_chat_with_usage(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 6
    assert any(c.choices and c.choices[0].finish_reason == "length" for c in chunks)


async def test_async_client_concurrent(server):
    import asyncio

    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    results = await asyncio.gather(*[
        client.completions.create(model=MODEL, prompt=f"Hello {i}", max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
        for i in range(8)
    ])  # fmt: skip
    assert all(r.usage.completion_tokens == 4 for r in results)
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True
    )
    pieces = [c async for c in stream]
    assert pieces[0].choices[0].delta.role == "assistant"
    await client.close()


def test_errors_map_to_openai_exceptions(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=MODEL, prompt="x", max_tokens=100_000)
    assert "maximum context length" in str(exc.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=1)
