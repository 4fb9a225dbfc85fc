"""The OpenAI API over HTTP: responses, streaming, usage, logprobs, n, stop."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server.conftest import MODEL


def post(server, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60, **kw)


def sse_events(resp: httpx.Response) -> list[dict | str]:
    events = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_models_version_health(server):
    models = httpx.get(f"{server.url}/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    assert models["data"][0]["max_model_len"] == 512
    assert httpx.get(f"{server.url}/v1/models/{MODEL}").json()["id"] == MODEL
    assert "version" in httpx.get(f"{server.url}/version").json()
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_completion_usage_and_length_finish(server):
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "Hello world", "max_tokens": 7,
                                         "temperature": 0, "ignore_eos": True})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length"
    prompt_len = len(post(server, "/tokenize", {"prompt": "Hello world"}).json()["tokens"])
    assert body["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 7, "total_tokens": prompt_len + 7,
                             "prompt_tokens_details": {"cached_tokens": 0}}  # fmt: skip


def test_greedy_is_deterministic_and_token_prompts_equal_text_prompts(server):
    ids = post(server, "/tokenize", {"prompt": "The quick brown fox"}).json()["tokens"]
    a = post(server, "/v1/completions", {"prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0})
    b = post(server, "/v1/completions", {"prompt": ids, "max_tokens": 12, "temperature": 0})
    assert a.json()["choices"][0]["text"] == b.json()["choices"][0]["text"]


def test_streaming_completion_matches_non_streaming(server):
    body = {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    full = post(server, "/v1/completions", body).json()["choices"][0]["text"]
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True,
                      "stream_options": {"include_usage": True}}, timeout=60) as resp:  # fmt: skip
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 16
    chunks = events[:-2]
    assert "".join(e["choices"][0]["text"] for e in chunks) == full
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_and_streaming_chat(server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world!"}]
    r = post(server, "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 10,
                                              "temperature": 0, "ignore_eos": True})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    msg = body["choices"][0]["message"]
    assert msg["role"] == "assistant"
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={"messages": messages, "max_tokens": 10,
                      "temperature": 0, "ignore_eos": True, "stream": True}, timeout=60) as resp:  # fmt: skip
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == msg["content"]


def test_n_and_seed(server):
    body = {"prompt": "Hello", "max_tokens": 8, "n": 3, "temperature": 1.0, "seed": 7, "ignore_eos": True}
    a = post(server, "/v1/completions", body).json()
    b = post(server, "/v1/completions", body).json()
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    assert len({c["text"] for c in a["choices"]}) > 1
    assert a["usage"]["completion_tokens"] == 24


def test_multiple_prompts(server):
    r = post(server, "/v1/completions", {"prompt": ["Hello", "The quick"], "max_tokens": 3, "n": 2,
                                         "temperature": 0, "ignore_eos": True}).json()  # fmt: skip
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert r["choices"][0]["text"] == r["choices"][1]["text"]
    assert r["usage"]["completion_tokens"] == 12


def test_stop_strings_and_stop_reason(server):
    base = {"prompt": "Hello", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    full = post(server, "/v1/completions", base).json()["choices"][0]["text"]
    assert len(full) > 6
    stop = full[3:6]
    r = post(server, "/v1/completions", {**base, "stop": [stop]}).json()["choices"][0]
    assert r["finish_reason"] == "stop" and r["stop_reason"] == stop
    assert r["text"] == full[: full.index(stop)]


def test_logprobs(server):
    r = post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 4, "temperature": 0, "logprobs": 3}).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
    assert all(len(t) <= 3 for t in lp["top_logprobs"])
    assert all(v <= 0 for v in lp["token_logprobs"])
    c = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                                              "temperature": 0, "logprobs": True, "top_logprobs": 2}).json()  # fmt: skip
    content = c["choices"][0]["logprobs"]["content"]
    assert content and all(len(x["top_logprobs"]) == 2 for x in content)
    # Greedy: the chosen token is the most likely one.
    assert all(x["logprob"] >= x["top_logprobs"][0]["logprob"] - 1e-6 for x in content)


def test_text_offsets_count_characters_not_token_pieces(server):
    """A token that ends mid-character adds no text until the one that completes it; the offsets say so
    whether the tokens came one per step or several at once (the second request drafts from the first)."""
    answer = "naïve 🙂 café ✓"
    body = {"prompt": "Say it:", "max_tokens": 40, "temperature": 0, "logprobs": 1,
            "structured_outputs": {"choice": [answer]}}  # fmt: skip
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    whole = r.json()["choices"][0]
    assert whole["text"] == answer, whole
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        events = [e for e in sse_events(r) if e != "[DONE]"]
    streamed = sum((e["choices"][0]["logprobs"]["text_offset"] for e in events if e["choices"][0]["logprobs"]), [])
    offsets, pieces = whole["logprobs"]["text_offset"], whole["logprobs"]["tokens"]
    assert streamed == offsets
    assert offsets[0] == 0 and offsets == sorted(offsets)
    assert pieces[-1] == "<|im_end|>" and offsets[-1] == len(answer)  # the end-of-sequence token adds no text
    offsets, pieces = offsets[:-1], pieces[:-1]
    # a partial character's token starts where the next one does (its own piece is a replacement char)
    assert any(b - a != len(p) for a, b, p in zip(offsets, offsets[1:], pieces, strict=False))
    for i, (start, piece) in enumerate(zip(offsets, pieces, strict=True)):
        if piece.startswith("\ufffd"):  # bytes of a character: it starts where that character does, or
            # where the previous token does when that one's text was held back to finish the character
            assert ord(answer[start]) > 127 or start == offsets[i - 1]
        else:  # its whole characters are the text at its offset
            whole_chars = piece.split("\ufffd")[0]
            assert answer[start : start + len(whole_chars)] == whole_chars


def test_tokenize_detokenize_roundtrip(server):
    t = post(server, "/tokenize", {"prompt": "Hello world!"}).json()
    assert t["count"] == len(t["tokens"]) and t["max_model_len"] == 512
    assert post(server, "/detokenize", {"tokens": t["tokens"]}).json()["prompt"] == "Hello world!"
    chat = post(server, "/tokenize", {"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] > 3


def test_prefix_cache_reports_cached_tokens(server):
    prompt = "The quick brown fox jumps over the lazy dog. " * 6
    post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 1})
    r = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 1}).json()
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16


def _fold_chat(events: list) -> dict:
    """A chat stream folded by hand: per choice the content, finish_reason and logprobs."""
    out: dict[int, dict] = {}
    for e in events:
        if e == "[DONE]":
            continue
        for c in e["choices"]:
            o = out.setdefault(c["index"], {"content": "", "finish_reason": None, "logprobs": []})
            o["content"] += c["delta"].get("content") or ""
            o["finish_reason"] = c["finish_reason"] or o["finish_reason"]
            o["logprobs"] += (c.get("logprobs") or {}).get("content") or []
    return out


def test_streamed_and_whole_answers_agree(server):
    """One accumulator makes both answers: n > 1, logprobs and several prompts give the same choices."""
    chat = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 9, "n": 3, "temperature": 0.8,
            "seed": 11, "logprobs": True, "top_logprobs": 2, "ignore_eos": True}  # fmt: skip
    whole = post(server, "/v1/chat/completions", chat).json()
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**chat, "stream": True}, timeout=60) as r:
        folded = _fold_chat(sse_events(r))
    for c in whole["choices"]:
        f = folded[c["index"]]
        assert f["content"] == c["message"]["content"] and f["finish_reason"] == c["finish_reason"] == "length"
        # the same tokens; logprobs to float noise (the second request reads its prompt from the prefix cache)
        assert [x["token"] for x in f["logprobs"]] == [x["token"] for x in c["logprobs"]["content"]]
        assert [x["logprob"] for x in f["logprobs"]] == pytest.approx([x["logprob"] for x in c["logprobs"]["content"]],
                                                                      abs=1e-4)  # fmt: skip
    comp = {"prompt": ["Hello", "Once upon"], "max_tokens": 6, "n": 2, "temperature": 0.8, "seed": 3, "logprobs": 1,
            "ignore_eos": True}  # fmt: skip
    whole = post(server, "/v1/completions", comp).json()
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**comp, "stream": True}, timeout=60) as r:
        events = [e for e in sse_events(r) if e != "[DONE]"]
    for c in whole["choices"]:
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == c["index"]]
        assert "".join(m["text"] for m in mine) == c["text"]
        assert sum((m["logprobs"]["tokens"] for m in mine if m["logprobs"]), []) == c["logprobs"]["tokens"]
        assert sum((m["logprobs"]["text_offset"] for m in mine if m["logprobs"]), []) == c["logprobs"]["text_offset"]


def test_continuous_usage_stats(server):
    body = {"prompt": "Hello", "max_tokens": 5, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"continuous_usage_stats": True}}  # fmt: skip
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        events = [e for e in sse_events(r) if e != "[DONE]"]
    counts = [e["usage"]["completion_tokens"] for e in events]
    assert counts == sorted(counts) and counts[-1] == 5 and len(events) >= 5
    assert all(e["usage"]["prompt_tokens"] == events[0]["usage"]["prompt_tokens"] > 0 for e in events)


def test_an_assistant_refusal_is_what_it_said(server):
    """OpenAI takes an assistant's refusal as a ``refusal`` field or as refusal parts; either is rendered as its
    words, as a text part would be."""
    ask = {"role": "user", "content": "Hi"}

    def tokens(assistant: dict) -> list[int]:
        return post(server, "/tokenize", {"messages": [ask, assistant]}).json()["tokens"]

    said = tokens({"role": "assistant", "content": "I can't help with that."})
    assert tokens({"role": "assistant", "refusal": "I can't help with that."}) == said
    parts = [{"type": "text", "text": "I can't "}, {"type": "refusal", "refusal": "help with that."}]
    assert tokens({"role": "assistant", "content": parts}) == said
    r = httpx.post(f"{server.url}/tokenize", json={"messages": [{"role": "user", "content": [parts[1]]}]})
    assert r.status_code == 400 and "only assistant messages carry a refusal" in r.json()["error"]["message"]
