"""Governance through real gateway processes over fake endpoints: keys, limits, accounting, audit,
hostile input."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import time

import anthropic
import httpx
import openai
import pytest

from tests.router.conftest import metric, until


def _agora(db: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "agora.cli", *args, "--db", db, "--json"], capture_output=True,
                         text=True, timeout=60, check=True)  # fmt: skip
    return json.loads(out.stdout)


def _db_of(tmp_path, gw) -> str:  # noqa: ANN001
    """The store `procs.gateway` gave this gateway."""
    port = gw.url.rsplit(":", 1)[1]
    return f"sqlite:///{tmp_path / f'governance-{port}.db'}"


def _live(url: str, key: str) -> bool:
    """Wait until the gateway has loaded the keys (an open gateway lets anyone in, so a key alone tells
    nothing) and knows ``key``; neither probe is rate limited, and exactly one wrong-key failure is counted."""
    assert until(lambda: httpx.get(f"{url}/admin/tenants").status_code == 401)
    return until(lambda: httpx.get(f"{url}/v1/models", headers={"authorization": f"Bearer {key}"}).status_code == 200)


def _chat(url: str, key: str | None, model: str = "m", **extra) -> httpx.Response:  # noqa: ANN003
    headers = {"authorization": f"Bearer {key}"} if key else {}
    headers.update(extra.pop("headers", {}))
    body = {"model": model, "messages": [{"role": "user", "content": "one two three"}], **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=30)


def _audit(url: str, key: str) -> list[dict]:
    r = httpx.get(f"{url}/admin/audit?limit=1000", headers={"authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return r.json()["data"]


def test_keys_lock_the_gateway_and_revocation_reaches_every_gateway_within_a_second(procs, tmp_path) -> None:
    fake = procs.fake("a", models=("m", "n"))
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    gw1 = procs.gateway({"endpoints": [{"url": fake.url}], "db": db})
    gw2 = procs.gateway({"endpoints": [{"url": fake.url}], "db": db})
    assert _chat(gw1.url, None).status_code == 200  # no keys yet: open, as before
    admin = _agora(db, "keys", "create", "--tenant", "ops", "--role", "admin")
    user = _agora(db, "keys", "create", "--tenant", "acme", "--models", "n")
    for gw in (gw1, gw2):
        assert until(lambda gw=gw: _chat(gw.url, user["key"], "n").status_code == 200)
        assert _chat(gw.url, None).status_code == 401
        assert _chat(gw.url, "agk-wrong").json()["error"]["code"] == "invalid_api_key"
        assert _chat(gw.url, admin["key"]).status_code == 200
        denied = _chat(gw.url, user["key"], "m")
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "model_not_allowed"
        models = httpx.get(f"{gw.url}/v1/models", headers={"authorization": f"Bearer {user['key']}"}).json()
        assert [m["id"] for m in models["data"]] == ["n"]
        assert httpx.get(f"{gw.url}/health").status_code == 200  # health stays open
    _agora(db, "keys", "revoke", user["id"])
    t = time.monotonic()  # from the revocation's commit: the CLI's own start-up (seconds on a loaded host) is not it
    assert until(lambda: all(_chat(g.url, user["key"], "n").status_code == 401 for g in (gw1, gw2)), 2.0)
    assert time.monotonic() - t < 1.5
    # Anthropic clients authenticate with x-api-key and get Anthropic's error shape
    claude = anthropic.Anthropic(base_url=gw1.url, api_key="agk-nope", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        claude.messages.create(model="m", max_tokens=4, messages=[{"role": "user", "content": "hi"}])


def test_admin_api_needs_an_admin_key_and_never_shows_a_key(procs) -> None:
    fake = procs.fake("a")
    gw = procs.gateway({"endpoints": [{"url": fake.url}]})
    # open gateway: the admin API answers a client on this machine only
    r = httpx.post(f"{gw.url}/admin/keys", json={"tenant": "ops", "role": "admin"})
    assert r.status_code == 201, r.text
    admin = r.json()
    h = {"authorization": f"Bearer {admin['key']}"}
    assert httpx.post(f"{gw.url}/admin/keys", json={"tenant": "x"}).status_code == 401  # keys exist now
    made = httpx.post(f"{gw.url}/admin/keys", headers=h, json={"tenant": "acme", "rpm": 100, "budget_tokens": 500,
                                                               "budget_window": "1d"}).json()  # fmt: skip
    user = {"authorization": f"Bearer {made['key']}"}
    assert httpx.get(f"{gw.url}/admin/keys", headers=user).status_code == 403
    listing = httpx.get(f"{gw.url}/admin/keys", headers=h).text
    for secret in (admin["key"], made["key"], hashlib.sha256(made["key"].encode()).hexdigest()):
        assert secret not in listing
    bad = httpx.post(f"{gw.url}/admin/keys", headers=h, json={"tenant": "x'; DROP TABLE api_keys;--"})
    assert bad.status_code == 400 and "tenant" in bad.json()["error"]["message"]
    assert httpx.post(f"{gw.url}/admin/keys", headers=h, json={"tenant": "x", "rpm": -1}).status_code == 400
    assert httpx.post(f"{gw.url}/admin/keys", headers=h, json={"tenant": "x", "colour": 1}).status_code == 400
    assert httpx.put(f"{gw.url}/admin/tenants/acme", headers=h, json={"weight": 2}).json()["weight"] == 2
    assert _chat(gw.url, made["key"]).status_code == 200
    usage = until(lambda: [u for u in httpx.get(f"{gw.url}/admin/usage", headers=h).json()["data"]
                            if u["tenant"] == "acme" and u["requests"]])  # fmt: skip
    assert usage[0]["tokens_in"] == 3 and usage[0]["tokens_out"] == 4
    assert usage[0]["keys"][0]["budget_left"] == 500 - 7
    assert httpx.delete(f"{gw.url}/admin/keys/{made['id']}", headers=h).json()["revoked"]
    assert _chat(gw.url, made["key"]).status_code == 401
    assert httpx.get(f"{gw.url}/admin/audit/verify", headers=h).json()["ok"]


def test_limits_answer_429_in_each_api_shape(procs, tmp_path) -> None:
    fake = procs.fake("a", models=("m",))
    gw = procs.gateway({"endpoints": [{"url": fake.url}], "governance": {"session_max_requests": 2}})
    db = _db_of(tmp_path, gw)
    admin = _agora(db, "keys", "create", "--tenant", "ops", "--role", "admin")
    key = _agora(db, "keys", "create", "--tenant", "acme", "--rpm", "3")
    assert _live(gw.url, key["key"])
    codes = [_chat(gw.url, key["key"]).status_code for _ in range(3)]
    over = _chat(gw.url, key["key"])
    assert codes == [200, 200, 200] and over.status_code == 429
    assert over.json()["error"]["code"] == "rate_limit_exceeded" and int(over.headers["retry-after"]) >= 1
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key["key"], max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    r = httpx.post(f"{gw.url}/v1/messages", headers={"x-api-key": key["key"]},
                   json={"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert r.status_code == 429 and r.json()["type"] == "error" and r.json()["error"]["type"] == "rate_limit_error"
    # a session cap stops one agent run, not its tenant
    s1 = [_chat(gw.url, admin["key"], headers={"x-session-id": "run-1"}).status_code for _ in range(3)]
    assert s1 == [200, 200, 429]
    assert _chat(gw.url, admin["key"], headers={"x-session-id": "run-1"}).json()["error"]["code"] == \
        "insufficient_quota"  # fmt: skip
    assert _chat(gw.url, admin["key"], headers={"x-session-id": "run-2"}).status_code == 200
    assert metric(gw.url, "agora_gateway_tenant_blocked_total", 'tenant="acme"') >= 3


def test_budget_holds_under_100_parallel_requests_and_streams_are_counted(procs, tmp_path) -> None:
    fake = procs.fake("a", models=("m",), tokens=4, delay_ms=5)
    gw = procs.gateway({"endpoints": [{"url": fake.url}]})
    db = _db_of(tmp_path, gw)
    admin = _agora(db, "keys", "create", "--tenant", "ops", "--role", "admin")
    key = _agora(db, "keys", "create", "--tenant", "acme", "--budget-tokens", "300", "--budget-window", "1d")
    assert _live(gw.url, key["key"])

    async def flood() -> list[int]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as c:
            body = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "one two three"}]}
            rs = await asyncio.gather(*(c.post(f"{gw.url}/v1/chat/completions", json=body,
                                               headers={"authorization": f"Bearer {key['key']}"})
                                        for _ in range(100)))  # fmt: skip
            return [r.status_code for r in rs]

    codes = asyncio.run(flood())
    # reservations (input estimate + max_tokens) hold the parallel ones back; settled, the rest is free again
    assert codes.count(200) > 3 and codes.count(429) > 0 and set(codes) == {200, 429}
    while (refused := _chat(gw.url, key["key"], max_tokens=10)).status_code == 200:
        codes.append(200)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"
    assert refused.json()["error"]["type"] == "insufficient_quota" and refused.headers.get("retry-after")
    usage = until(lambda: [u for u in httpx.get(f"{gw.url}/admin/usage", headers={"authorization": f"Bearer "
                            f"{admin['key']}"}).json()["data"] if u["tenant"] == "acme" and u["tokens_out"] ==
                            4 * codes.count(200)])  # fmt: skip
    used = usage[0]["tokens_in"] + usage[0]["tokens_out"]
    # refused once its input no longer fits; never more than one max_tokens over
    assert used == 7 * codes.count(200) and 300 - 40 <= used <= 300 + 10, usage
    assert usage[0]["keys"][0]["budget_left"] == max(0, 300 - used)

    # A stream that did not ask for usage: counted exactly, and the client sees no usage chunk.
    h = {"authorization": f"Bearer {admin['key']}"}
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", headers=h, timeout=30,
                      json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "a b"}]}) as r:  # fmt: skip
        text = "".join(r.iter_text())
    assert '"usage"' not in text and text.rstrip().endswith("data: [DONE]")
    assert fake.stats()["last_body"]["stream_options"] == {"include_usage": True}
    record = until(lambda: [a for a in _audit(gw.url, admin["key"]) if a["tenant"] == "ops"])[-1]
    assert (record["tokens_in"], record["tokens_out"], record["status"]) == (2, 4, 200)
    assert record["ttft_ms"] > 0 and record["latency_ms"] >= record["ttft_ms"] and record["key_id"] == admin["id"]
    assert "prompt" not in record  # no content unless audit.include_content


def test_an_abandoned_stream_is_charged_what_it_relayed(procs, tmp_path) -> None:
    fake = procs.fake("a", models=("m",), tokens=60, delay_ms=30)
    gw = procs.gateway({"endpoints": [{"url": fake.url}], "audit": {"include_content": True}})
    db = _db_of(tmp_path, gw)
    admin = _agora(db, "keys", "create", "--tenant", "ops", "--role", "admin")
    assert _live(gw.url, admin["key"])
    h = {"authorization": f"Bearer {admin['key']}"}
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", headers=h, timeout=30,
                      json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "x y z"}]}) as r:  # fmt: skip
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen == 5:
                break
    record = until(lambda: [a for a in _audit(gw.url, admin["key"]) if a["api"] == "chat" and a["status"] == 200
                             and a["reason"] == "client_gone"])  # fmt: skip
    assert record, _audit(gw.url, admin["key"])
    rec = record[-1]
    assert 5 <= rec["tokens_out"] < 60 and rec["tokens_in"] > 0
    assert rec["prompt"] == "<|user|>x y z" and rec["completion"].startswith("a.")


def test_hostile_input(procs, tmp_path) -> None:
    fake = procs.fake("a", models=("m",))
    port_db = tmp_path / "hostile.db"
    gw = procs.gateway({"endpoints": [{"url": fake.url}], "db": f"sqlite:///{port_db}",
                        "governance": {"auth_failures_per_minute": 10}})  # fmt: skip
    db = f"sqlite:///{port_db}"
    key = _agora(db, "keys", "create", "--tenant", "acme")
    assert _live(gw.url, key["key"])
    # a 200 KB header: 431
    r = httpx.get(f"{gw.url}/v1/models", headers={"x-junk": "a" * 200_000, "authorization": f"Bearer {key['key']}"})
    assert r.status_code == 431
    # odd bytes in a key: a plain 401
    for raw in (b"Bearer \xff\xfe\x80", b"Bearer agk-' OR 1=1 --", b"Basic Zm9vOmJhcg==", b"Bearer " + b"k" * 5000):
        resp = _raw_request(gw.url, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: " + raw + b"\r\n\r\n")
        assert resp.startswith(b"HTTP/1.1 401"), (raw[:20], resp[:200])
    # a flood of wrong keys from one client is slowed down; valid keys are not (5 failures so far: one
    # while waiting for the keys, four above)
    statuses = [_chat(gw.url, f"agk-guess-{i}").status_code for i in range(5)]
    t = time.monotonic()
    throttled = _chat(gw.url, "agk-guess-x")
    slow = time.monotonic() - t
    assert statuses == [401] * 5 and throttled.status_code == 429 and slow >= 0.9
    assert throttled.json()["error"]["code"] == "too_many_auth_failures"
    t = time.monotonic()
    assert _chat(gw.url, key["key"]).status_code == 200 and time.monotonic() - t < 0.9
    assert metric(gw.url, "agora_gateway_auth_throttled_total") >= 1


def _raw_request(url: str, data: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(data)
        return s.recv(65536)


def test_no_key_or_key_hash_reaches_the_log(tmp_path) -> None:
    from agora.router.replicas import free_port
    from tests.router.conftest import FAKE, wait_http

    port, gport = free_port(), free_port()
    fake = subprocess.Popen([sys.executable, str(FAKE), "--port", str(port), "--model", "m"])
    db = f"sqlite:///{tmp_path / 'g.db'}"
    key = _agora(db, "keys", "create", "--tenant", "acme", "--role", "admin")
    log = open(tmp_path / "log", "w")  # noqa: SIM115
    gw = subprocess.Popen([sys.executable, "-m", "agora.cli", "route", "--endpoint", f"http://127.0.0.1:{port}",
                           "--port", str(gport), "--db", db, "--uvicorn-log-level", "debug"],
                          env={**os.environ, "AGORA_LOG_LEVEL": "DEBUG"}, stdout=log, stderr=log)  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models")
        wait_http(f"http://127.0.0.1:{gport}/health")
        url = f"http://127.0.0.1:{gport}"
        assert _chat(url, key["key"]).status_code == 200
        assert _chat(url, key["key"] + "x").status_code == 401
        httpx.get(f"{url}/admin/keys", headers={"authorization": f"Bearer {key['key']}"})
    finally:
        gw.terminate()
        fake.terminate()
        gw.wait(10)
        fake.wait(10)
        log.close()
    text = (tmp_path / "log").read_text()
    assert "gateway profile" in text  # the log was written
    for secret in (key["key"], key["key"] + "x", hashlib.sha256(key["key"].encode()).hexdigest()):
        assert secret not in text


def test_the_key_s_band_reaches_the_endpoints(procs, tmp_path) -> None:
    """The gateway names each request's band (the key's, or a lower one asked for) in x-agora-priority; an engine
    that schedules by priority serves a band before the next (tests/server/test_vllm_fields.py)."""
    fake = procs.fake("a", models=("m",))
    gw = procs.gateway({"endpoints": [{"url": fake.url}]})
    db = _db_of(tmp_path, gw)
    batch = _agora(db, "keys", "create", "--tenant", "acme", "--priority", "batch")
    assert _live(gw.url, batch["key"])

    def seen(**extra) -> dict:  # noqa: ANN003
        assert _chat(gw.url, batch["key"], **extra).status_code == 200
        return httpx.get(f"{fake.url}/stats").json()["agora_headers"]

    assert seen()["x-agora-priority"] == "batch"
    assert seen(headers={"x-agora-priority": "sheddable"})["x-agora-priority"] == "sheddable"
    assert _chat(gw.url, batch["key"], headers={"x-agora-priority": "interactive"}).status_code == 403
    assert set(seen()) == {"x-agora-tenant", "x-agora-owner", "x-agora-priority"}
