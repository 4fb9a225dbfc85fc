"""agora.http_server's guard against clients that never finish a request: a head beyond its limit is a 431, a
head that stalls a 408, an idle connection or a stalled body is closed; answers that take long, bodies that
pause briefly and keep-alive are untouched. Over real sockets, for both of uvicorn's HTTP implementations."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from agora.http_server import guarded_protocol

TIMEOUT_S = 0.5
HEAD_LIMIT = 4096
seen: list[str] = []  # what the app saw: "body <bytes>", "gone"
refused: list[str] = []  # what the guard told its ``refused`` callback (the servers count it in /metrics)


async def app(scope: dict, receive, send) -> None:  # noqa: ANN001
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            seen.append("gone")
            return
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    seen.append(f"body {len(body)}")
    if scope["path"] == "/slow":
        await asyncio.sleep(3 * TIMEOUT_S)  # an answer may take longer than the client timeout
    payload = json.dumps({"path": scope["path"], "bytes": len(body)}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": payload})


@pytest.fixture(scope="module", params=[HttpToolsProtocol, H11Protocol], ids=["httptools", "h11"])
def port(request: pytest.FixtureRequest) -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    protocol = guarded_protocol(HEAD_LIMIT, TIMEOUT_S, request.param, refused=refused.append)
    server = uvicorn.Server(uvicorn.Config(app, http=protocol, log_level="critical", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(10)


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(10)
    return s


def _read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def _request(path: str, body: bytes = b"") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
            .encode() + body)  # fmt: skip


def test_a_head_past_its_limit_is_a_431(port: int, request: pytest.FixtureRequest) -> None:
    refused.clear()
    s = _connect(port)
    s.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n")
    try:
        for _ in range(1000):  # 1 MB of header lines, or until the server closes
            s.sendall(b"x-filler: " + b"a" * 1000 + b"\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    answer = _read_all(s)
    if answer.startswith(b"HTTP/1.1 400 ") and request.node.callspec.id == "h11":
        return  # h11 holds a head to 16 KiB by itself and may refuse first, with its own 400
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["code"] == "request_header_fields_too_large" and str(HEAD_LIMIT) in error["message"]
    assert refused == ["request_header_fields_too_large"]


def test_a_refused_client_that_keeps_sending_is_cut_off(port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a refusal the server reads and drops what the client still sends (so the refusal is not lost to a
    reset), but only for LINGER_S: a client that never stops sending is then disconnected."""
    monkeypatch.setattr("agora.http_server.LINGER_S", 0.3)
    s = _connect(port)
    s.sendall(b"GET / HTTP/1.1\r\nhost: x\r\nx-filler: " + b"a" * (2 * HEAD_LIMIT))
    start = time.monotonic()
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        while time.monotonic() - start < 10:
            s.sendall(b"a" * 1000)
            time.sleep(0.01)
    assert time.monotonic() - start < 5
    s.close()


def test_the_head_limit_is_exact_whole_or_in_pieces(port: int) -> None:
    def head(size: int) -> bytes:
        start = b"GET /exact HTTP/1.1\r\nhost: x\r\nx-filler: "
        return start + b"a" * (size - len(start) - 4) + b"\r\n\r\n"

    for size, status in ((HEAD_LIMIT, b"200"), (HEAD_LIMIT + 1, b"431")):
        for pieces in (1, 3):  # in one send, or in three (the blank line split between the last two)
            data, cut = head(size), [0, size // 2, size - 2, size][:: 3 // pieces]
            s = _connect(port)
            for a, b in itertools.pairwise(cut):
                s.sendall(data[a:b])
                time.sleep(0.05)
            assert s.recv(65536).startswith(b"HTTP/1.1 " + status), (size, pieces)
            s.close()


def test_a_stalled_head_is_a_408_and_an_idle_connection_is_closed(port: int) -> None:
    refused.clear()
    stalled, idle = _connect(port), _connect(port)
    stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
    t0 = time.monotonic()
    answer = _read_all(stalled)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    assert _read_all(idle) == b""  # nothing asked, nothing said: just closed
    assert time.monotonic() - t0 < 5 * TIMEOUT_S
    assert refused == ["request_timeout"]  # an idle connection closed is no refusal


def test_a_body_may_pause_but_not_stall(port: int) -> None:
    body = json.dumps({"text": "x" * 3000}).encode()
    s = _connect(port)
    s.sendall(_request("/paused", b"")[:-2].replace(b"content-length: 0", f"content-length: {len(body)}".encode())
              + b"\r\n")  # fmt: skip
    for i in range(0, len(body), 1000):  # three pauses, each shorter than the timeout: 1.2 s in all
        time.sleep(0.4 * TIMEOUT_S * 2)
        s.sendall(body[i : i + 1000])
    answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 ") and b'"bytes": %d' % len(body) in answer, answer
    seen.clear()
    refused.clear()
    stalled = _connect(port)
    stalled.sendall(_request("/stalled", b"")[:-2].replace(b"content-length: 0", b"content-length: 100") + b"\r\n")
    stalled.sendall(b'{"half": ')
    assert _read_all(stalled) == b""  # closed: the app saw the client go and answered nothing
    deadline = time.monotonic() + 5
    while "gone" not in seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen == ["gone"]
    assert refused == ["body_timeout"]


def test_a_slow_answer_and_keep_alive_are_untouched(port: int) -> None:
    refused.clear()
    s = _connect(port)
    s.sendall(_request("/slow", b"{}"))
    assert s.recv(65536).startswith(b"HTTP/1.1 200 ")  # 1.5 s to answer, three times the client timeout
    time.sleep(0.6 * TIMEOUT_S)
    s.sendall(_request("/again", b"{}"))  # the same connection, kept alive
    answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 ") and b'"/again"' in answer
    assert refused == []


# -- pages of other sites ------------------------------------------------------------------------------------


async def _echo(scope: dict, receive, send) -> None:  # noqa: ANN001
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"x-agora-endpoint", b"e1")]})  # fmt: skip
    await send({"type": "http.response.body", "body": b'{"ok": true}'})


def _client(allowed: tuple[str, ...] = (), local: bool = False):  # noqa: ANN202
    import httpx

    from agora.http_server import CrossOrigin

    refused.clear()
    transport = httpx.ASGITransport(app=CrossOrigin(_echo, allowed, local, refused.append))
    return httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000")


async def test_another_sites_page_may_not_change_anything(caplog: pytest.LogCaptureFixture) -> None:
    async with _client() as client:
        # what any page can send without asking first: a text POST, with the page's origin
        r = await client.post("/admin/reload", content=b"{}", headers={"origin": "https://evil.example",
                                                                       "content-type": "text/plain"})  # fmt: skip
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
        assert (
            "https://evil.example" in r.json()["error"]["message"]
            and "--allowed-origins" in r.json()["error"]["message"]
        )
        r = await client.post("/v1/messages", headers={"origin": "null"})  # a page opened from a file
        assert r.status_code == 403 and r.json()["type"] == "error"  # Anthropic's shape on its path
        r = await client.post("/v1/chat/completions", headers={"sec-fetch-site": "cross-site"})  # no Origin sent
        assert r.status_code == 403
        r = await client.options("/v1/chat/completions", headers={"origin": "https://evil.example",
                                                                  "access-control-request-method": "POST"})  # fmt: skip
        assert r.status_code == 403
        # reading is the browser's to stop: a GET passes, without CORS headers the page cannot read it
        r = await client.get("/v1/models", headers={"origin": "https://evil.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        # the server's own page (the dashboard) and clients that are not browsers pass
        r = await client.post("/dashboard/login", headers={"origin": "http://127.0.0.1:8000"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        assert (await client.post("/v1/chat/completions")).status_code == 200
    # the page's console shows only a CORS error: the server's log says why, once per origin
    told = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused ")]
    assert (
        told[0]
        == "refused POST /admin/reload from https://evil.example (not in --allowed-origins; each origin is logged once)"
    )
    assert len(told) == 3  # evil.example (three times refused), null, a cross-site page without an Origin
    assert refused == ["origin_not_allowed"] * 4  # every refusal is counted (the servers' /metrics)


async def test_allowed_origins_get_cors() -> None:
    async with _client(("https://app.example",)) as client:
        r = await client.options("/v1/chat/completions", headers={
            "origin": "https://app.example", "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type, x-stainless-lang"})  # fmt: skip
        assert r.status_code == 204
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert r.headers["access-control-allow-headers"] == "authorization, content-type, x-stainless-lang"
        assert "POST" in r.headers["access-control-allow-methods"]
        assert "access-control-allow-private-network" not in r.headers
        r = await client.options("/v1/models", headers={"origin": "https://app.example", "access-control-request-method":
                                 "GET", "access-control-request-private-network": "true"})  # fmt: skip
        assert r.headers["access-control-allow-private-network"] == "true"  # a public page to a local server
        r = await client.post("/v1/chat/completions", headers={"origin": "https://app.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        assert r.headers["access-control-expose-headers"] == "x-agora-endpoint" and r.headers["vary"] == "Origin"
        r = await client.post("/v1/chat/completions", headers={"origin": "https://other.example"})
        assert r.status_code == 403
    async with _client(("*",)) as client:
        r = await client.post("/v1/chat/completions", headers={"origin": "null"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "null"


async def test_a_name_pointed_at_this_machine_is_refused_to_browsers() -> None:
    # DNS rebinding: evil.example resolves to 127.0.0.1, so its page is "same-origin" with the server
    rebound = {"host": "evil.example:8000", "origin": "http://evil.example:8000", "sec-fetch-mode": "cors"}
    async with _client(local=True) as client:
        r = await client.post("/admin/keys", headers=rebound)
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
        r = await client.get("/admin/usage", headers={"host": "evil.example:8000", "sec-fetch-mode": "cors"})
        assert r.status_code == 403  # a same-origin GET carries no Origin: Sec-Fetch-Mode says it is a browser
        assert refused == ["host_not_allowed"] * 2
        # not a browser (an SDK through a proxy that keeps its name): untouched; this machine's names: fine
        assert (await client.get("/v1/models", headers={"host": "api.example"})).status_code == 200
        for host in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000"):
            r = await client.post("/v1/chat/completions", headers={"host": host, "origin": f"http://{host}"})
            assert r.status_code == 200, host
    async with _client(("https://dash.example",), local=True) as client:  # a proxy's name, allowed
        r = await client.get("/dashboard", headers={"host": "dash.example", "sec-fetch-mode": "navigate"})
        assert r.status_code == 200
    async with _client(local=False) as client:  # listening on every address: names are the network's business
        assert (
            await client.get("/v1/models", headers={"host": "evil.example", "sec-fetch-mode": "cors"})
        ).status_code == 200


def test_origins_as_vllm_spells_them() -> None:
    from agora.config import parse_origins

    assert parse_origins('["https://App.example/", "*"]') == ("https://app.example", "*")
    assert parse_origins("http://localhost:3000, null") == ("http://localhost:3000", "null")
    for bad in ('["ftp://x"]', "https://x/path", "[1]", "[nope"):
        with pytest.raises(ValueError):
            parse_origins(bad)
