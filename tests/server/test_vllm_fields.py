"""vLLM's request fields that RL and agent-training frameworks, RAG templates and OpenAI's newer clients send,
through the openai SDK as those users send them (``extra_body``): each works, or is a 400 naming it."""

from __future__ import annotations

import json
import shutil

import httpx
import openai
import pytest

from tests.server.conftest import MODEL, start_server, stop_server

MESSAGES = [{"role": "user", "content": "Tell me a story about a cat"}]


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _tokens(server, **body) -> list[int]:
    return httpx.post(f"{server.url}/tokenize", json={"model": MODEL, **body}).json()["tokens"]


def _ids(chunks, index: int = 0) -> list[int]:
    return [t for c in chunks for ch in c.choices if ch.index == index for t in (ch.model_extra.get("token_ids") or [])]


def test_chat_return_token_ids_whole_and_streamed(client, server):
    """What agent RL frameworks train on: the exact prompt and output tokens beside the text."""
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0,
              extra_body={"return_token_ids": True, "ignore_eos": True})  # fmt: skip
    whole = client.chat.completions.create(**kw)
    assert whole.model_extra["prompt_token_ids"] == _tokens(server, messages=MESSAGES)
    ids = whole.choices[0].model_extra["token_ids"]
    assert len(ids) == whole.usage.completion_tokens == 12
    assert server.engine.tokenizer.decode(ids, skip_special_tokens=True) == whole.choices[0].message.content
    streamed = list(client.chat.completions.create(stream=True, **kw))
    assert _ids(streamed) == ids
    assert [c.model_extra.get("prompt_token_ids") is not None for c in streamed].count(True) == 1
    assert streamed[0].model_extra["prompt_token_ids"] == whole.model_extra["prompt_token_ids"]
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert "token_ids" not in plain.model_dump_json()


def test_completions_return_token_ids_per_choice(client, server):
    prompts = ["Once upon a time", "The cat sat on"]
    kw = dict(model=MODEL, prompt=prompts, max_tokens=5, n=2, temperature=0, echo=True,
              extra_body={"return_token_ids": True, "ignore_eos": True})  # fmt: skip
    whole = client.completions.create(**kw)
    assert len(whole.choices) == 4
    for c in whole.choices:
        assert c.model_extra["prompt_token_ids"] == _tokens(server, prompt=prompts[c.index // 2])
        assert len(c.model_extra["token_ids"]) == 5
    streamed = list(client.completions.create(stream=True, **kw))
    for c in whole.choices:
        firsts = [ch.model_extra["prompt_token_ids"] for s in streamed for ch in s.choices
                  if ch.index == c.index and ch.model_extra.get("prompt_token_ids") is not None]  # fmt: skip
        assert firsts == [c.model_extra["prompt_token_ids"]]  # once, on the choice's first chunk
        assert _ids(streamed, c.index) == c.model_extra["token_ids"]
    scored = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=0, echo=True, logprobs=0,
                                       extra_body={"return_token_ids": True}).choices[0]  # fmt: skip
    assert scored.model_extra["token_ids"] == [] and scored.model_extra["prompt_token_ids"]


def test_return_tokens_as_token_ids_names_tokens_by_id(client):
    kw = dict(model=MODEL, max_tokens=6, temperature=0, extra_body={"ignore_eos": True, "return_token_ids": True})
    chat = client.chat.completions.create(messages=MESSAGES, logprobs=True, top_logprobs=2, **kw)
    as_ids = client.chat.completions.create(messages=MESSAGES, logprobs=True, top_logprobs=2,
                                            **{**kw, "extra_body": {**kw["extra_body"],
                                                                    "return_tokens_as_token_ids": True}})  # fmt: skip
    ids = as_ids.choices[0].model_extra["token_ids"]
    assert [x.token for x in as_ids.choices[0].logprobs.content] == [f"token_id:{t}" for t in ids]
    assert all(t.token.startswith("token_id:") for x in as_ids.choices[0].logprobs.content for t in x.top_logprobs)
    # the same tokens, so the same logprobs (to float rounding: the second prompt comes from the prefix cache)
    assert [x.logprob for x in as_ids.choices[0].logprobs.content] == \
        pytest.approx([x.logprob for x in chat.choices[0].logprobs.content], abs=1e-4)  # fmt: skip
    text = dict(prompt="Once upon a time", echo=True, logprobs=1, **kw)
    plain = client.completions.create(**text).choices[0]
    named = client.completions.create(
        **{**text, "extra_body": {**kw["extra_body"], "return_tokens_as_token_ids": True}}
    )
    named = named.choices[0]
    all_ids = named.model_extra["prompt_token_ids"] + named.model_extra["token_ids"]
    assert named.logprobs.tokens == [f"token_id:{t}" for t in all_ids]
    assert named.logprobs.text_offset == plain.logprobs.text_offset and named.text == plain.text
    assert all(k.startswith("token_id:") for top in named.logprobs.top_logprobs[1:] for k in top)


def test_truncate_prompt_tokens_keeps_the_last_tokens(client, server):
    text = "one two three four five six seven eight nine ten"
    ids = _tokens(server, prompt=text)
    out = client.completions.create(model=MODEL, prompt=text, max_tokens=1, echo=True,
                                    extra_body={"truncate_prompt_tokens": 4, "return_token_ids": True})  # fmt: skip
    choice = out.choices[0]
    assert out.usage.prompt_tokens == 4 and choice.model_extra["prompt_token_ids"] == ids[-4:]
    shown = httpx.post(f"{server.url}/detokenize", json={"model": MODEL, "tokens": ids[-4:]}).json()["prompt"]
    assert choice.text.startswith(shown) and not choice.text.startswith(text)  # the echo is what the model saw
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1,
                                          extra_body={"truncate_prompt_tokens": 5})  # fmt: skip
    assert chat.usage.prompt_tokens == 5
    whole = client.completions.create(model=MODEL, prompt=text, max_tokens=1, extra_body={"truncate_prompt_tokens": -1})
    assert whole.usage.prompt_tokens == len(ids)
    for bad in (0, -2, 1 << 20):
        with pytest.raises(openai.BadRequestError) as exc:
            client.completions.create(
                model=MODEL, prompt=text, max_tokens=1, extra_body={"truncate_prompt_tokens": bad}
            )
        assert exc.value.body["param"] == "truncate_prompt_tokens"


def test_allowed_token_ids_and_bad_words(client, server):
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0,
              extra_body={"ignore_eos": True, "return_token_ids": True})  # fmt: skip
    free = client.chat.completions.create(**kw).choices[0]
    ids = free.model_extra["token_ids"]
    allowed = sorted(set(ids))[1::2] or ids[:1]
    kept = client.chat.completions.create(**{**kw, "extra_body": {**kw["extra_body"], "allowed_token_ids": allowed}})
    assert set(kept.choices[0].model_extra["token_ids"]) <= set(allowed)
    tok = server.engine.tokenizer
    # a word the free answer spells in the tokens the word's own tokenization gives (the tiny model is wordy)
    word = next(w for k in range(len(ids) - 1) if (w := tok.decode(ids[k : k + 2]).strip())
                and any(ids[i : i + len(t)] == t for t in (tok.encode(w, False), tok.encode(" " + w, False))
                        for i in range(len(ids))))  # fmt: skip
    banned = client.chat.completions.create(**{**kw, "extra_body": {**kw["extra_body"], "bad_words": [word]}})
    out = banned.choices[0]
    assert out.model_extra["token_ids"] != ids
    # neither spelling of the word (as the output starts it, or after a space) appears as its tokens
    for spelling in (word, " " + word):
        seq = tok.encode(spelling, False)
        got = out.model_extra["token_ids"]
        assert not any(got[i : i + len(seq)] == seq for i in range(len(got)))
    for body, param in (({"allowed_token_ids": [10**9]}, "allowed_token_ids"), ({"allowed_token_ids": []},
                        "allowed_token_ids"), ({"bad_words": ["  "]}, "bad_words"),
                        ({"bad_words": [f"xyzzy{i} " * 40 for i in range(128)]}, "bad_words")):  # fmt: skip
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1, extra_body=body)
        assert exc.value.body["param"] == param


def test_request_id_names_the_answer_and_may_repeat(client):
    kw = dict(model=MODEL, max_tokens=2, extra_body={"request_id": "trajectory-7/turn-3"})
    chats = [client.chat.completions.create(messages=MESSAGES, **kw) for _ in range(2)]  # the same id twice: fine
    assert [c.id for c in chats] == ["chatcmpl-trajectory-7/turn-3"] * 2
    assert {c.id for c in client.chat.completions.create(messages=MESSAGES, stream=True, **kw)} == \
        {"chatcmpl-trajectory-7/turn-3"}  # fmt: skip
    assert client.completions.create(prompt="hi", **kw).id == "cmpl-trajectory-7/turn-3"


def test_chat_echo_starts_the_reply_with_the_assistant_s_text(client):
    messages = [*MESSAGES, {"role": "assistant", "content": "Once upon a time"}]
    kw = dict(model=MODEL, messages=messages, max_tokens=4, temperature=0,
              extra_body={"echo": True, "continue_final_message": True, "add_generation_prompt": False})  # fmt: skip
    whole = client.chat.completions.create(**kw).choices[0].message.content
    plain = client.chat.completions.create(**{**kw, "extra_body": {**kw["extra_body"], "echo": False}})
    assert whole == "Once upon a time" + plain.choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw))
    assert streamed == whole
    user_last = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0,
                                               extra_body={"echo": True})  # fmt: skip
    assert not user_last.choices[0].message.content.startswith(MESSAGES[0]["content"])  # only the assistant's


def test_documents_reach_the_template(client, server):
    docs = [{"title": "Cats", "text": "Cats purr."}]
    with_docs = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1,
                                               extra_body={"documents": docs})  # fmt: skip
    assert with_docs.usage.prompt_tokens > 0  # the tiny template ignores documents: rendered, not refused


def test_openai_s_newer_chat_fields(client):
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, prompt_cache_key="agent-1",
                                         safety_identifier="user-hash", verbosity="medium")  # fmt: skip
    assert out.choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, verbosity="low")
    assert exc.value.body["param"] == "verbosity"
    # agora caches every prefix, in memory: that retention holds, a longer one or explicit breakpoints do not
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, prompt_cache_retention="in_memory")
    for kw, param in (({"prompt_cache_retention": "24h"}, "prompt_cache_retention"),
                      ({"prompt_cache_options": {"mode": "explicit"}}, "prompt_cache_options")):  # fmt: skip
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, **kw)
        assert exc.value.body["param"] == param


@pytest.mark.parametrize(
    "body, param",
    [
        ({"priority": 1}, "priority"),
        ({"use_beam_search": True}, "use_beam_search"),
        ({"length_penalty": 0.5}, "length_penalty"),
        ({"best_of": 3}, "best_of"),
        ({"spaces_between_special_tokens": False}, "spaces_between_special_tokens"),
        ({"chat_template": "{{ messages[0]['content'] }}"}, "chat_template"),
        ({"chat_template_kwargs": {"chat_template": "{% for i in range(99999) %}{% endfor %}"}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
        ({"request_id": ""}, "request_id"),
    ],
)  # fmt: skip
def test_what_agora_does_not_do_is_a_400_naming_it(client, body, param):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1, extra_body=body)
    assert exc.value.body["param"] == param
    defaults = {"priority": 0, "use_beam_search": False, "length_penalty": 1.0, "best_of": 1,
                "spaces_between_special_tokens": True}  # fmt: skip
    if param in defaults:  # the default value itself is accepted
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=1, extra_body={param: defaults[param]}
        )


def test_add_special_tokens(tmp_path, tiny_model_dir):
    """A tokenizer that adds a BOS token: completions add it unless told not to; chat does not add a second one."""
    model = tmp_path / "bos-model"
    shutil.copytree(tiny_model_dir, model)
    tok = json.loads((model / "tokenizer.json").read_text())
    bos = "<|im_start|>"
    bos_id = tok["added_tokens"][[t["content"] for t in tok["added_tokens"]].index(bos)]["id"]
    tok["post_processor"] = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                             {"Sequence": {"id": "A", "type_id": 0}}], "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
                             "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}  # fmt: skip
    (model / "tokenizer.json").write_text(json.dumps(tok))
    r = start_server(model)
    try:
        client = openai.OpenAI(base_url=f"{r.url}/v1", api_key="unused", max_retries=0)
        kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=1)
        with_bos = client.completions.create(extra_body={"return_token_ids": True}, **kw).choices[0]
        without = client.completions.create(extra_body={"return_token_ids": True, "add_special_tokens": False}, **kw)
        assert with_bos.model_extra["prompt_token_ids"] == [bos_id, *without.choices[0].model_extra["prompt_token_ids"]]
        chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1,
                                              extra_body={"return_token_ids": True})  # fmt: skip
        twice = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1,
                                               extra_body={"return_token_ids": True, "add_special_tokens": True})  # fmt: skip
        assert twice.model_extra["prompt_token_ids"] == [bos_id, *chat.model_extra["prompt_token_ids"]]
    finally:
        stop_server(r)


def test_tokenize_messages_counts_what_chat_sends(client, server):
    """/tokenize renders messages as the chat route does (tools, documents, template arguments included), so a
    client that counts before sending counts the prompt the chat request gets."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for extra in ({}, {"tools": tools}, {"continue_final_message": True, "add_generation_prompt": False}):
        messages = MESSAGES + ([{"role": "assistant", "content": "Once"}] if "continue_final_message" in extra else [])
        counted = httpx.post(f"{server.url}/tokenize", json={"messages": messages, **extra}).json()
        sent = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, tools=extra.get("tools",
            openai.NOT_GIVEN), extra_body={"return_token_ids": True, **{k: v for k, v in extra.items() if k != "tools"}})  # fmt: skip
        assert (
            counted["tokens"] == sent.model_extra["prompt_token_ids"] and counted["count"] == sent.usage.prompt_tokens
        )
    strs = httpx.post(f"{server.url}/tokenize", json={"prompt": "Once upon", "return_token_strs": True}).json()
    assert len(strs["token_strs"]) == strs["count"] and all(isinstance(s, str) for s in strs["token_strs"])
    for body in ({"prompt": "x", "tools": tools}, {"messages": MESSAGES, "chat_template_kwargs": {"tokenize": 1}}):
        assert httpx.post(f"{server.url}/tokenize", json=body).status_code == 400


def test_priority_scheduling_orders_the_engine_s_queue(tiny_model_dir):
    """--scheduling-policy priority: with one sequence at a time, a request of priority -1 added after four of
    priority 5 runs as soon as the running one ends, before the four (under fcfs it runs last); the server
    takes the field (on an fcfs server any priority but 0 is a 400, above)."""
    from agora import LLM, SamplingParams

    order = {}
    for policy in ("fcfs", "priority"):
        llm = LLM(str(tiny_model_dir), dtype="float32", num_blocks=256, max_num_seqs=1, scheduling_policy=policy,
                  speculative_config=None)  # fmt: skip
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        engine, done = llm.engine, []
        for i, (name, priority) in enumerate([("first", 5), ("low1", 5), ("low2", 5), ("urgent", -1)]):
            engine.add_request(name, [5 + i, 6, 7], params, priority=priority if policy == "priority" else 0)
            if i == 0:
                engine.step()  # first is running
        while engine.has_unfinished_requests():
            done += [o.request_id for o in engine.step() if o.finished]
        order[policy] = done
    assert order == {"fcfs": ["first", "low1", "low2", "urgent"], "priority": ["first", "urgent", "low1", "low2"]}
    # the Python API: one priority per prompt (one sequence at a time: they finish in priority order)
    finished, step = [], llm.engine.step

    def recording_step():  # noqa: ANN202
        outs = step()
        finished.extend(o.request_id for o in outs if o.finished)
        return outs

    llm.engine.step = recording_step
    outs = llm.generate([[5, 6], [7, 8], [9, 10]], SamplingParams(temperature=0, max_tokens=3), priority=[3, -2, 0])
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 3, 3]
    assert finished == [outs[1].request_id, outs[2].request_id, outs[0].request_id]
    with pytest.raises(ValueError, match="one priority per prompt"):
        llm.generate([[5, 6]], priority=[1, 2])
    r = start_server(tiny_model_dir, scheduling_policy="priority")
    try:
        client = openai.OpenAI(base_url=f"{r.url}/v1", api_key="unused", max_retries=0)
        out = client.completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_body={"priority": -7})
        assert out.choices[0].text is not None
    finally:
        stop_server(r)


def test_the_gateway_s_band_orders_requests_before_their_own_priority(tiny_model_dir):
    """Behind the gateway (which authenticates with the engine's key), x-agora-priority names the tenant's band:
    under priority scheduling every request of a band comes before the next band's, whatever priority it asks
    for; the header is trusted only where the engine has a key (as the tenant's), and means nothing to fcfs."""
    from agora.server.serving import BAND_STRIDE

    seen: list[int] = []
    for policy in ("priority", "fcfs"):
        r = start_server(tiny_model_dir, api_key="k1", scheduling_policy=policy)

        def recording(*a, add=r.engine.add_request, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
            seen.append(a[5] if len(a) > 5 else kw.get("priority", 0))
            return add(*a, **kw)

        r.engine.add_request = recording
        try:
            gateway = {"authorization": "Bearer k1", "x-agora-tenant": "t", "x-agora-priority": "batch"}
            bodies = [({"priority": -5}, gateway), ({}, {**gateway, "x-agora-priority": "interactive"}),
                      ({}, {**gateway, "x-agora-priority": "bogus"})]  # fmt: skip
            for body, headers in bodies:
                if policy == "fcfs":
                    body = {}
                out = httpx.post(f"{r.url}/v1/completions", headers=headers, timeout=60,
                                 json={"model": MODEL, "prompt": "hi", "max_tokens": 1, **body})  # fmt: skip
                assert out.status_code == 200, out.text
            chat = httpx.post(
                f"{r.url}/v1/messages",
                headers={**gateway, "anthropic-version": "2023-06-01"},
                json={"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]},
            )
            assert chat.status_code == 200, chat.text
        finally:
            stop_server(r)
    assert seen == [BAND_STRIDE - 5, 0, 0, BAND_STRIDE, 0, 0, 0, 0]
