"""Requests shaped exactly as today's coding agents send them (read off Claude Code 2.1 and Codex
with a capturing server; their prompts left out): each is served, or refused with the fix named."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server.conftest import MODEL, start_server, stop_server

pytest.importorskip("xgrammar")

BASH = {"name": "Bash", "description": "Run a shell command", "input_schema": {
    "type": "object", "properties": {"command": {"type": "string"}, "timeout": {"type": "number"}},
    "required": ["command"], "additionalProperties": False, "$schema": "http://json-schema.org/draft-07/schema#"}}  # fmt: skip


@pytest.fixture(scope="module")
def server(tiny_long_model_dir):
    r = start_server(tiny_long_model_dir, api_key="k1", model_aliases=(("claude-*", MODEL), ("gpt-*", MODEL)))
    yield r
    stop_server(r)


def claude_code_request(**over) -> dict:
    user_id = json.dumps({"device_id": "ab" * 32, "account_uuid": "", "session_id": "b304e257-6c4e-4381"})
    return {
        "model": "claude-sonnet-4-5", "max_tokens": 32000, "stream": True, "temperature": 1,
        "metadata": {"user_id": user_id}, "thinking": {"type": "disabled"}, "tools": [BASH],
        "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1;"},
                   {"type": "text", "text": "You are an agent.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "<system-reminder>\nContext.\n</system-reminder>"},
            {"type": "text", "text": "Say hello", "cache_control": {"type": "ephemeral"}}]}],
        **over,
    }  # fmt: skip


HEADERS = {"x-api-key": "k1", "anthropic-version": "2023-06-01", "x-app": "cli",
           "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27"}  # fmt: skip


def test_claude_code_request_streams(server) -> None:
    with httpx.stream("POST", f"{server.url}/v1/messages?beta=true", json=claude_code_request(max_tokens=32000),
                      headers=HEADERS, timeout=120) as r:  # fmt: skip
        assert r.status_code == 200
        text = r.read().decode()
    events = [line.removeprefix("event: ") for line in text.splitlines() if line.startswith("event: ")]
    assert events[0] == "message_start" and events[-1] == "message_stop"  # max_tokens 32000: a ceiling, not a demand


def test_claude_code_thinking_default_is_refused_with_the_fix(server) -> None:
    body = claude_code_request(thinking={"type": "enabled", "budget_tokens": 31999},
                               context_management={"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]})  # fmt: skip
    r = httpx.post(f"{server.url}/v1/messages?beta=true", json=body, headers=HEADERS, timeout=60)
    assert r.status_code == 400 and "MAX_THINKING_TOKENS=0" in r.json()["error"]["message"]
    body = claude_code_request(context_management={"edits": [{"type": "clear_tool_uses_20250919"}]})
    r = httpx.post(f"{server.url}/v1/messages?beta=true", json=body, headers=HEADERS, timeout=60)
    assert r.status_code == 400 and "clear_tool_uses" in r.json()["error"]["message"]


def test_codex_request_streams(server) -> None:
    shell = {"type": "function", "name": "exec_command", "description": "Run a command", "strict": False,
             "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"],
                            "additionalProperties": False}}  # fmt: skip
    body = {
        "model": "gpt-5.5", "stream": True, "store": False, "tool_choice": "auto", "parallel_tool_calls": True,
        "reasoning": {"summary": "auto"}, "include": ["reasoning.encrypted_content"], "tools": [shell],
        "prompt_cache_key": "01a2315e", "client_metadata": {"thread_id": "01a2315e", "turn_id": "01a2315f"},
        "input": [{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Be terse."}]},
                  {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Say hello"}]}],
    }  # fmt: skip
    with httpx.stream("POST", f"{server.url}/v1/responses", json=body, headers={"authorization": "Bearer k1"},
                      timeout=120) as r:  # fmt: skip
        assert r.status_code == 200
        text = r.read().decode()
    kinds = [json.loads(line[6:])["type"] for line in text.splitlines() if line.startswith("data: ")]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    hosted = {**body, "tools": [shell, {"type": "web_search"}], "stream": False}
    r = httpx.post(f"{server.url}/v1/responses", json=hosted, headers={"authorization": "Bearer k1"}, timeout=60)
    assert (
        r.status_code == 400 and r.json()["error"]["param"] == "tools" and "web_search" in r.json()["error"]["message"]
    )
