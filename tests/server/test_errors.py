"""Bad input gets an OpenAI-style error with the right status, and the server stays up."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from tests.server.conftest import MODEL, start_server, stop_server

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
RESP = "/v1/responses"
MESS = "/v1/messages"
MSG = [{"role": "user", "content": "hi"}]
TEXT_ONLY = "content: the models this server runs read text only"


def _deep(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"x": schema}}
    return schema


CASES = [
    # (path, body, status, fragment of the message, param)
    (COMP, {"prompt": "x", "max_tokens": 600}, 400, "maximum context length is 512", "max_tokens"),
    (COMP, {"prompt": "hello " * 600}, 400, "context length is 512", None),
    (COMP, {"prompt": ""}, 400, "empty", "prompt"),
    (COMP, {"prompt": []}, 400, "empty", "prompt"),
    (COMP, {"prompt": [1, 2, 999999]}, 400, "out of the vocabulary", "prompt"),
    (COMP, {"prompt": [-1]}, 400, "out of the vocabulary", "prompt"),
    (COMP, {"prompt": "x", "max_tokens": -5}, 400, "max_tokens", "max_tokens"),
    (COMP, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    (COMP, {"prompt": "x", "n": 1000}, 400, "between 1 and 16", "n"),
    (COMP, {"prompt": "x", "n": 0}, 400, "between 1 and 16", "n"),
    (COMP, {"prompt": "x", "logprobs": 50}, 400, "between 0 and 20", "logprobs"),
    (COMP, {"prompt": "x", "temperature": -1}, 400, "temperature", "temperature"),
    (COMP, {"prompt": "x", "top_p": 0}, 400, "top_p", "top_p"),
    (COMP, {"prompt": "x", "stop": [""]}, 400, "stop", None),
    (COMP, {"prompt": 5}, 400, "prompt", "prompt"),
    (COMP, {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens", "max_tokens"),
    (COMP, {"prompt": "x", "temperature": "hot"}, 400, "temperature", "temperature"),
    (COMP, {"prompt": "x", "stream": "yes"}, 400, "stream", "stream"),
    (COMP, {"prompt": "x", "best_of": 3}, 400, "best_of", "best_of"),
    (COMP, {"prompt": "x", "suffix": "y"}, 400, "suffix", "suffix"),
    (COMP, {"prompt": "x", "frobnicate": 1}, 400, "Unrecognized request argument supplied: frobnicate", "frobnicate"),
    (COMP, {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", "stream_options"),
    (COMP, {}, 400, "missing required parameter: prompt", "prompt"),
    (COMP, {"prompt": "x", "model": "gpt-4"}, 404, "does not exist", "model"),
    (CHAT, {"messages": []}, 400, "messages must not be empty", "messages"),
    (CHAT, {"messages": "hi"}, 400, "messages", "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "role", None),
    (CHAT, {"messages": [{"role": "user"}]}, 400, "content", None),
    (
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "messages.0.content: part 0 is 'image_url' content: the models this server runs read text only",
        "messages",
    ),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "frob"}]}]}, 400, "part 0 has type 'frob'", "messages"),
    (CHAT, {"messages": [{"role": "user", "content": None}]}, 400, "messages.0: a user message needs content", None),
    (
        RESP,
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
        400,
        TEXT_ONLY,
        "input",
    ),
    (
        RESP,
        {
            "input": [
                {"type": "function_call_output", "call_id": "c", "output": [{"type": "input_file", "file_id": "f"}]}
            ]
        },
        400,
        "part 0 is 'input_file' content",
        "input",
    ),
    (MESS, {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, 400, TEXT_ONLY, None),
    (
        MESS,
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image"}]}],
                }
            ]
        },
        400,
        "part 0 is 'image' content",
        None,
    ),
    (MESS, {"system": [{"type": "document"}], "messages": MSG}, 400, "system: part 0 is 'document' content", None),
    (CHAT, {"messages": MSG, "top_logprobs": 5}, 400, "requires logprobs", "top_logprobs"),
    (CHAT, {"messages": MSG, "logprobs": True, "top_logprobs": 30}, 400, "between 0 and 20", "top_logprobs"),
    (
        CHAT,
        {"messages": MSG, "response_format": {"type": "json_schema"}},
        400,
        "json_schema is required",
        "response_format",
    ),
    (
        CHAT,
        {
            "messages": MSG,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}},
        },
        400,
        "not a valid JSON Schema",
        "response_format",
    ),
    (
        CHAT,
        {
            "messages": MSG,
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {"type": "object", "required": ["a"], "properties": {}, "additionalProperties": False},
                },
            },
        },
        400,
        "no output can satisfy",
        "response_format",
    ),
    (
        COMP,
        {"prompt": "x", "structured_outputs": {"regex": "(a"}},
        400,
        "parenthesis is not closed",
        "structured_outputs",
    ),
    (
        COMP,
        {"prompt": "x", "structured_outputs": {"choice": []}},
        400,
        "choice must not be empty",
        "structured_outputs",
    ),
    (
        COMP,
        {"prompt": "x", "structured_outputs": {"regex": "a", "choice": ["b"]}},
        400,
        "exactly one",
        "structured_outputs",
    ),
    (COMP, {"prompt": "x", "structured_outputs": {}}, 400, "exactly one", "structured_outputs"),
    (
        COMP,
        {"prompt": "x", "structured_outputs": {"grammar": "root ::= b"}},
        400,
        "structured_outputs:",
        "structured_outputs",
    ),
    (
        COMP,
        {"prompt": "x", "structured_outputs": {"whitespace_pattern": " "}},
        400,
        "Unrecognized",
        "structured_outputs",
    ),
    (
        COMP,
        {"prompt": "x", "guided_json": {"type": "string", "minLength": 5, "maxLength": 2}},
        400,
        "minLength",
        "guided_json",
    ),
    (COMP, {"prompt": "x", "guided_json": "{not json"}, 400, "JSON schema", "guided_json"),
    (COMP, {"prompt": "x", "guided_regex": "a", "guided_choice": ["b"]}, 400, "only one", "guided_regex"),
    (
        COMP,
        {"prompt": "x", "guided_regex": "a", "guided_decoding_backend": "outlines"},
        400,
        "xgrammar",
        "guided_decoding_backend",
    ),
    (
        COMP,
        {"prompt": "x", "guided_regex": "a", "response_format": {"type": "json_object"}},
        400,
        "both constrain",
        "response_format",
    ),
    (COMP, {"prompt": "x", "echo": True, "guided_regex": "a"}, 400, "echo", "echo"),
    (
        COMP,
        {
            "prompt": "x",
            "structured_outputs": {
                "json": {
                    "type": "object",
                    "properties": {"a": {"type": "object", "properties": {"b": {"$ref": "#/nowhere"}}}},
                }
            },
        },
        400,
        "structured_outputs",
        "structured_outputs",
    ),
    (COMP, {"prompt": "x", "structured_outputs": {"json": _deep(40)}}, 400, "nested deeper", "structured_outputs"),
    (COMP, {"prompt": "x", "structured_outputs": {"regex": "a" * 5000}}, 400, "4096", "structured_outputs"),
    (
        COMP,
        {
            "prompt": "x",
            "structured_outputs": {
                "json": {
                    "type": "object",
                    "properties": {f"p{i}": {"type": "string", "description": "x" * 100} for i in range(700)},
                }
            },
        },
        400,
        "larger than",
        "structured_outputs",
    ),
    (CHAT, {"messages": MSG, "max_completion_tokens": 10_000}, 400, "maximum context length", "max_tokens"),
    (CHAT, {"messages": MSG, "model": "nope"}, 404, "does not exist", "model"),
    (CHAT, {"messages": MSG, "chat_template_kwargs": {"x": "y" * 5000}}, 400, "too large", "chat_template_kwargs"),
    ("/detokenize", {"tokens": [10**9]}, 400, "out of the vocabulary", "tokens"),
    ("/tokenize", {}, 400, "exactly one of prompt or messages", None),
]


@pytest.mark.parametrize("path,body,status,fragment,param", CASES)
def test_bad_request(server, path, body, status, fragment, param):
    if path == MESS:
        body = {"model": MODEL, "max_tokens": 8, **body}
    r = httpx.post(f"{server.url}{path}", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"], err
    assert err["type"] in ("invalid_request_error", "not_found_error")
    if param is not None:
        assert err["param"] == param, err
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_invalid_json_and_wrong_content(server):
    r = httpx.post(f"{server.url}{COMP}", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    # the parser's position in the body is not a parameter
    assert r.json()["error"] == {
        "message": "the request body is not valid JSON",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    r = httpx.post(f"{server.url}{COMP}", content=b"\xff\xfe\x00", headers={"content-type": "application/json"})
    assert r.status_code == 400
    # curl -d without -H sends a form: said so, with the fix
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 1}).encode()
    r = httpx.post(f"{server.url}{COMP}", content=body, headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415 and "content-type: application/json" in r.json()["error"]["message"], r.text
    r = httpx.post(f"{server.url}/v1/messages", content=body, headers={"content-type": "text/plain"})
    assert r.status_code == 415 and r.json()["type"] == "error"  # Anthropic's shape
    for fine in ("application/json; charset=utf-8", "application/vnd.api+json", None):  # unnamed: read as JSON
        headers = {"content-type": fine} if fine else {}
        assert httpx.post(f"{server.url}{COMP}", content=body, headers=headers, timeout=30).status_code == 200, fine


@pytest.mark.parametrize("path", [CHAT, COMP, MESS, "/v1/messages/count_tokens", "/v1/responses", "/tokenize",
                                  "/detokenize"])  # fmt: skip
def test_a_body_that_is_no_json_object_is_a_400_that_says_what_it_is(server, path):
    for raw, words in ((b"", "the request body is empty: send a JSON object"),
                       (b"[]", "the request body must be a JSON object, not an array"),
                       (b"null", "the request body must be a JSON object, not null"),
                       (b'"hi"', "the request body must be a JSON object, not a string")):  # fmt: skip
        r = httpx.post(f"{server.url}{path}", content=raw, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["message"] == words and error["type"] == "invalid_request_error", error
        assert (r.json().get("type") == "error") == path.startswith(MESS)  # Anthropic's shape on its paths


def test_a_large_body_is_read_as_a_small_one(server):
    # bodies over 64 KiB are parsed and validated off the event loop: the same answers and the same errors
    big = "word " * 20_000
    small = {"model": MODEL, "max_tokens": "x", "messages": [{"role": "user", "content": "hi"}]}
    large = {**small, "messages": [{"role": "user", "content": big}]}
    errors = [httpx.post(f"{server.url}{CHAT}", json=b, timeout=30) for b in (small, large)]
    assert [r.status_code for r in errors] == [400, 400]
    assert errors[0].json() == errors[1].json() and errors[0].json()["error"]["param"] == "max_tokens"
    r = httpx.post(f"{server.url}{CHAT}", json={**large, "max_tokens": 1}, timeout=60)
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"], r.text  # read, then measured
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": big}, timeout=60)
    assert r.status_code == 200 and r.json()["count"] == len(r.json()["tokens"]) > 10_000
    r = httpx.post(f"{server.url}{MESS}", json={"model": MODEL, "max_tokens": 1, "messages": "x" * 100_000}, timeout=30)
    assert r.status_code == 400 and r.json()["type"] == "error" and r.json()["error"]["message"].startswith("messages")


def test_the_openapi_document_shows_each_body(server):
    doc = httpx.get(f"{server.url}/openapi.json").json()
    for path in (CHAT, COMP, MESS, "/v1/messages/count_tokens", "/v1/responses", "/tokenize", "/detokenize"):
        ref = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.rsplit("/", 1)[1] in doc["components"]["schemas"], path
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(doc)))
    assert refs <= set(doc["components"]["schemas"])  # every reference resolves
    assert "messages" in doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]


def test_bodies_no_reader_can_take_are_400s_that_say_why(server):
    def post(path: str, text: str) -> httpx.Response:
        return httpx.post(f"{server.url}{path}", content=text.encode(), headers={"content-type": "application/json"},
                          timeout=30)  # fmt: skip

    deep = post(CHAT, f'{{"model": "{MODEL}", "messages": {"[" * 5000 + "]" * 5000}}}')
    assert deep.status_code == 400 and "nests too deeply" in deep.json()["error"]["message"]
    long_number = post(COMP, f'{{"model": "{MODEL}", "prompt": "x", "max_tokens": 1{"0" * 5000}}}')
    assert long_number.status_code == 400, long_number.text
    assert long_number.json()["error"]["message"].startswith("the request body is not valid JSON: Exceeds the limit")
    # half an emoji (a string cut between the two escapes of its surrogate pair): not text, named where it is
    chat = json.dumps({"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "cut \ud83d"}]})
    assert "\\ud83d" in chat  # json.dumps writes it as the escape a client would send
    r = post(CHAT, chat)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content", r.text
    assert "half of a UTF-16 surrogate pair" in r.json()["error"]["message"]
    r = post(MESS, json.dumps({"model": MODEL, "max_tokens": 2, "system": "s \udc00", "messages": []}))
    assert r.status_code == 400 and r.json()["type"] == "error", r.text  # Anthropic's shape
    assert r.json()["error"]["message"].startswith("system: holds half")
    whole = post(CHAT, chat.replace("\\ud83d", "\\ud83d\\ude00"))  # the whole emoji, escaped: fine
    assert whole.status_code == 200, whole.text
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_oversized_body_is_413(server):
    big = {"prompt": "x" * (2 << 20)}
    r = httpx.post(f"{server.url}{COMP}", json=big, timeout=30)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"

    def chunks():
        for _ in range(40):
            yield b"x" * 65536

    r = httpx.post(f"{server.url}{COMP}", content=chunks(), headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_unknown_route_is_404_json(server):
    r = httpx.get(f"{server.url}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"] == "no route for GET /v1/nothing"
    r = httpx.post(f"{server.url}/v1/embeddings", json={"input": "x"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.delete(f"{server.url}/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["message"] == "DELETE is not allowed on /v1/chat/completions"


def test_api_key(tiny_model_dir):
    r = start_server(tiny_model_dir, api_key="sekret")
    try:
        assert httpx.get(f"{r.url}/v1/models").status_code == 401
        assert httpx.get(f"{r.url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = httpx.get(f"{r.url}/v1/models", headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == MODEL
        assert httpx.get(f"{r.url}/health").status_code == 200  # probes need no key
    finally:
        stop_server(r)


def test_another_sites_page_is_refused(server):
    # any page the user opens could post to a server on this machine: not without --allowed-origins
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    r = httpx.post(f"{server.url}{COMP}", json=body, headers={"origin": "https://evil.example"}, timeout=30)
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed", r.text
    assert httpx.post(f"{server.url}{COMP}", json=body, timeout=30).status_code == 200  # not a browser: fine
    refused = [line for line in httpx.get(f"{server.url}/metrics").text.splitlines()
               if line.startswith("agora:http_refused_total{")]  # fmt: skip
    assert f'agora:http_refused_total{{model_name="{MODEL}",reason="origin_not_allowed"}} 1.0' in refused
    assert len(refused) == 5  # every reason exported from the start


@pytest.mark.timeout(180)
def test_agora_serve_counts_what_its_http_layer_refuses(tiny_model_dir) -> None:  # noqa: ANN001
    import resource
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from tests.router.conftest import free_port, wait_http

    port = free_port()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    proc = subprocess.Popen([sys.executable, "-m", "agora.cli", "serve", str(tiny_model_dir), "--port", str(port),
                             "--kv-cache-memory", "32MiB", "--client-timeout", "1"],
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard)))  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", timeout=120)
        # started under a soft limit of 256 open files (a few hundred clients): raised toward the hard limit
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        soft = int(next(line for line in limits.splitlines() if line.startswith("Max open files")).split()[3])
        assert soft == (65536 if hard == resource.RLIM_INFINITY else min(65536, hard))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as stalled:  # a head that never ends
            stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
            assert stalled.recv(65536).startswith(b"HTTP/1.1 408 ")
        r = httpx.get(f"{url}/v1/models", headers={"x-filler": "a" * (70 << 10)})  # past the engine's 64 KiB
        assert r.status_code == 431
        metrics = httpx.get(f"{url}/metrics").text
        assert 'reason="request_timeout"} 1.0' in metrics
        assert 'reason="request_header_fields_too_large"} 1.0' in metrics
    finally:
        proc.terminate()
        proc.wait(60)
