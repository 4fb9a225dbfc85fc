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


def test_echo_scores_a_text_with_its_prompt_logprobs(client, server, tiny_model_dir):
    # what lm-evaluation-harness and perplexity scripts send: echo, logprobs, max_tokens 0 (or 1)
    import httpx
    import torch
    from transformers import AutoModelForCausalLM

    text = "Once upon a time there was a small town by the sea"
    ids = httpx.post(f"{server.url}/tokenize", json={"model": MODEL, "prompt": text}).json()["tokens"]
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0], dim=-1)
    want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    kw = dict(model=MODEL, prompt=text, echo=True, logprobs=2, temperature=0)
    scored = client.completions.create(max_tokens=0, **kw)
    choice = scored.choices[0]
    assert choice.text == text and choice.finish_reason == "length" and scored.usage.completion_tokens == 0
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:]), want, atol=2e-4)
    # (keyed by text: two byte tokens that both show as '\ufffd' are one entry)
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs[1:]) and lp.text_offset == sorted(lp.text_offset)
    streamed = list(client.completions.create(max_tokens=0, stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text
    assert [x for c in streamed if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs] \
        == lp.token_logprobs  # fmt: skip
    more = client.completions.create(max_tokens=3, extra_body={"ignore_eos": True}, **kw).choices[0]
    assert more.text.startswith(text) and len(more.logprobs.tokens) == len(ids) + 3
    assert more.logprobs.token_logprobs[: len(ids)] == lp.token_logprobs
    assert more.logprobs.text_offset[len(ids)] == len(text)  # the generated tokens follow the echoed prompt
    with pytest.raises(openai.BadRequestError):  # max_tokens 0 means something only with echo
        client.completions.create(model=MODEL, prompt=text, max_tokens=0)


def test_vllm_prompt_logprobs_on_completions_and_chat(client, server, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    text = "Once upon a time there was a small town by the sea"
    scored = client.completions.create(model=MODEL, prompt=text, max_tokens=1, temperature=0,
                                       extra_body={"prompt_logprobs": 2})  # fmt: skip
    plp = scored.choices[0].model_extra["prompt_logprobs"]
    import httpx

    ids = httpx.post(f"{server.url}/tokenize", json={"model": MODEL, "prompt": text}).json()["tokens"]
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0], dim=-1)
    assert len(plp) == len(ids) and plp[0] is None
    for i, token in enumerate(ids[1:]):
        entry = plp[i + 1]
        assert abs(entry[str(token)]["logprob"] - ref[i, token].item()) < 2e-4
        assert entry[str(token)]["rank"] == 1 + int((ref[i] > ref[i, token]).sum())
        best = int(ref[i].argmax())
        assert entry[str(best)]["rank"] == 1 and 1 <= len(entry) <= 3
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                          extra_body={"prompt_logprobs": 0})  # fmt: skip
    assert len(chat.model_extra["prompt_logprobs"]) == chat.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs"):  # vLLM's rule: not with stream
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                       stream=True, extra_body={"prompt_logprobs": 1})  # fmt: skip
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert "prompt_logprobs" not in plain.model_dump_json()
