"""The uvicorn server that `agora serve` (the engine server) and `agora route` (the gateway) both run.

Three things uvicorn does not do by itself:

- **It drains.** On SIGTERM or Ctrl-C it refuses new connections, lets the requests in flight run for a while,
  then asks the application to end what is still running, so that each such request ends with an error in its
  own API's shape (an SSE error event; a 503 for a whole answer) rather than a connection cut mid-stream.
- **It holds clients to a size and a pace while it waits on them.** uvicorn buffers a request's head for as long
  as it keeps coming and waits for it forever, so one connection could grow the process by gigabytes of header
  lines, and a few thousand idle or trickling ones could hold every file descriptor. Here a request's head
  (request line and headers) may take at most ``max_head_bytes`` (431 beyond), a new connection or request must
  complete its head within ``client_timeout_s``, and its body may pause no longer than that (408, connection
  closed). Once a request is read, nothing is timed: an answer may take as long as it takes.
- **It keeps other sites' pages out** (``CrossOrigin``, the apps' outermost layer): a browser lets any page post
  to a server on this machine; here only the server's own pages and the origins it allows may change anything,
  and the allowed ones get CORS.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

logger = logging.getLogger("agora")

MARGIN_S = 10.0  # past the drain: the ended requests' last events go out, then uvicorn cancels what is left
ENGINE_HEAD_BYTES = 64 << 10  # an engine server's request head (the gateway's follows its max_header_bytes)
HEAD_SLACK = 16 << 10  # the request line and separators, beyond the headers' own limit (checked by the apps)
# What this layer refuses before any application sees the request, as counted in each server's /metrics (by the
# ``refused`` callback): a head too large (431) or too slow (408), a body that stalled (closed), another site's
# page (403) or a page under a name that is not this machine's (403).
REFUSALS = ("request_header_fields_too_large", "request_timeout", "body_timeout", "origin_not_allowed",
            "host_not_allowed")  # fmt: skip
REFUSALS_HELP = ("Requests and connections the HTTP layer refused before the API saw them, by reason: "
                 "request_header_fields_too_large (431), request_timeout (408), body_timeout (closed), "
                 "origin_not_allowed and host_not_allowed (403, browser pages).")  # fmt: skip
Refused = Callable[[str], None]


def _ignore(reason: str) -> None:
    pass


def _refusal(status: int, reason: str, message: str, code: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()  # fmt: skip
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")  # fmt: skip
    return head.encode("latin-1") + body


LINGER_S = 2.0  # how long a refused connection keeps reading (and dropping) what its client sends


def guarded_protocol(max_head_bytes: int, client_timeout_s: float, base: type[asyncio.Protocol] = AutoHTTPProtocol,
                     refused: Refused = _ignore) -> type[asyncio.Protocol]:  # fmt: skip
    """uvicorn's HTTP protocol ``base`` (its default: httptools, else h11) with the head limit and the client
    timeout above; ``refused`` is told each refusal's reason (one of `REFUSALS`)."""

    class Guarded(base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
            super().connection_made(transport)  # type: ignore[arg-type]
            self._head_bytes = 0  # of the request whose head is being read
            self._tail = b""  # its last bytes so far
            self._deadline: float | None = self.loop.time() + client_timeout_s  # its first request, or None
            self._timer = self.loop.call_later(client_timeout_s, self._check_pace)
            self._lingering = False

        def connection_lost(self, exc: Exception | None) -> None:
            self._timer.cancel()
            super().connection_lost(exc)

        def _reading_head(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def data_received(self, data: bytes) -> None:
            if self._lingering:
                return  # refused: what the client still sends is read and dropped
            reading_head = self._reading_head()
            if reading_head:
                if self._head_bytes == 0:  # a request begins: its head has client_timeout_s
                    self._deadline = self.loop.time() + client_timeout_s
                    self._tail = b""
                # measured before the parser sees it: a head that ends in this chunk counts up to its blank line
                end = (self._tail + data).find(b"\r\n\r\n")
                size = self._head_bytes + (len(data) if end < 0 else end + 4 - len(self._tail))
                if size > max_head_bytes:
                    self._refuse(431, "Request Header Fields Too Large", f"the request's head exceeds "
                                 f"{max_head_bytes} bytes", "request_header_fields_too_large")  # fmt: skip
                    return
            super().data_received(data)
            if self.transport.is_closing():
                return
            if not self._reading_head():  # the head is in: the body may pause at most client_timeout_s
                self._head_bytes = 0
                self._deadline = self.loop.time() + client_timeout_s if self.cycle.more_body else None
            elif reading_head:
                self._head_bytes += len(data)
                self._tail = (self._tail + data)[-3:]  # a blank line may arrive split over two chunks

        def _refuse(self, status: int, reason: str, message: str, code: str) -> None:
            refused(code)
            if self.cycle is None or (self.cycle.response_complete and not self.cycle.more_body):
                self.transport.write(_refusal(status, reason, message, code))
                self._linger()
            else:  # an answered request's body is still arriving; the client has its answer already
                self.transport.close()

        def _linger(self) -> None:
            """Close gently after a refusal: send it and our end of the stream, then read and drop what the client
            is still sending for up to ``LINGER_S``. Closed at once with its data unread, the connection is reset,
            and a reset can destroy the refusal before the client reads it (a client still writing a huge head
            then saw "connection reset" instead of the 431)."""
            self._lingering = True
            self._timer.cancel()
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.transport.resume_reading()
            self._timer = self.loop.call_later(LINGER_S, self.transport.close)

        def eof_received(self) -> bool | None:
            if self._lingering:
                self.transport.close()  # the client read the refusal and is done too
                return None
            return super().eof_received()

        def _check_pace(self) -> None:
            if self.transport.is_closing():
                return
            now = self.loop.time()
            reading_head = self._reading_head()
            if self._deadline is None or not (reading_head or self.cycle.more_body) or now < self._deadline:
                due = self._deadline is not None and now < self._deadline
                self._timer = self.loop.call_later(self._deadline - now if due else client_timeout_s,
                                                   self._check_pace)  # fmt: skip
                return
            if reading_head and self._head_bytes:
                self._refuse(408, "Request Timeout", f"the request did not arrive within {client_timeout_s:g} s",
                             "request_timeout")  # fmt: skip
            else:  # a connection that never sent a byte is just closed; a stalled body: the app sees the client go
                if not reading_head:
                    refused("body_timeout")
                self.transport.close()

    return Guarded


def raise_open_files_limit(target: int = 65536) -> None:
    """A server holds a file descriptor per connection (the gateway two: the client's and the endpoint's), and
    the usual soft limit of 1024 caps it near a thousand clients, past which new connections are reset. Raise
    the soft limit toward the hard one (vLLM does the same)."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError) as exc:
        logger.warning("could not raise the open files limit from %d to %d: %s", soft, want, exc)


def draining_server(app: Any, drain_s: float, end_requests: Callable[[], None],
                    on_signal: Callable[[], None] | None = None, *, max_head_bytes: int, client_timeout_s: float,
                    refused: Refused = _ignore, **options: Any) -> uvicorn.Server:  # fmt: skip
    """A server for ``app`` (uvicorn ``options``) that calls ``end_requests`` (on the event loop, must not block)
    ``drain_s`` seconds after a shutdown began, if requests are still running then; ``on_signal`` (any thread)
    runs as soon as the signal arrives; ``refused`` counts the protocol's refusals."""
    raise_open_files_limit()
    protocol = guarded_protocol(max_head_bytes, client_timeout_s, refused=refused)
    config = uvicorn.Config(app, timeout_graceful_shutdown=drain_s + MARGIN_S, http=protocol, **options)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if on_signal is not None:
                on_signal()
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets: list | None = None) -> None:
            def end() -> None:
                if self.server_state.tasks:
                    logger.warning("shutting down: ending the %d requests still in flight after %.0f s",
                                   len(self.server_state.tasks), drain_s)  # fmt: skip
                end_requests()

            timer = asyncio.get_running_loop().call_later(drain_s, end)
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    return Server(config)


# -- browsers from other sites ---------------------------------------------------------------------------------

_SAFE_METHODS = ("GET", "HEAD")
_MAX_TOLD = 100  # refused origins logged (a page that tries again, or many pages, do not flood the log)
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def _netloc(scheme: str, netloc: str) -> str:
    host, _, port = netloc.lower().rpartition(":") if netloc.rpartition(":")[2].isdigit() else (netloc.lower(), "", "")
    return host if not port or port == _DEFAULT_PORTS.get(scheme) else f"{host}:{port}"


def _same_origin(origin: str, headers: dict[bytes, bytes]) -> bool:
    """The page was served by this server: its origin names the host the request was sent to (``Host``, or the
    ``X-Forwarded-Host`` a reverse proxy sets), whichever scheme the proxy in front of it speaks."""
    scheme, sep, netloc = origin.partition("://")
    if not sep:
        return False
    for name in (b"host", b"x-forwarded-host"):
        value = headers.get(name, b"").decode("latin-1").split(",")[0].strip()
        if value and any(_netloc(scheme, netloc) == _netloc(s, value) for s in ("http", "https")):
            return True
    return False


def loopback_name(host: str) -> bool:
    """A name or address of this machine: ``localhost`` (and ``*.localhost``), 127.0.0.0/8, ``::1``."""
    name = host.strip().lower()
    if name.startswith("["):
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class CrossOrigin:
    """What pages from other sites may do with this server, which browsers otherwise let any page try.

    A page's ``fetch`` POST with a text or bodyless request reaches a server without asking first, and a
    server on 127.0.0.1 is reachable from every page the user opens: any site could drive a local model,
    or the gateway's admin API (open to this machine when no keys are set), without reading the answers.
    So a browser request that changes something (any method but GET and HEAD) from another origin is a 403
    unless ``allowed`` lists that origin (``*``: any); the same page's own requests (the dashboard) pass.
    Allowed origins also get CORS: preflights answered, answers readable, their headers exposed. Clients
    that are not browsers send no ``Origin`` and are untouched.

    A server listening on loopback only (``local``) also refuses a browser's request whose ``Host`` is not a
    name of this machine, nor that of an allowed origin (a proxy in front that keeps its own name): a site
    whose name an attacker points at 127.0.0.1 (DNS rebinding) would otherwise be this server's own origin
    in the browser, free to read every answer and to post as the server's own page.

    ``refused`` is told each refusal's code (``origin_not_allowed``, ``host_not_allowed``).
    """

    def __init__(self, app: Any, allowed: tuple[str, ...] | list[str] = (), local: bool = False,
                 refused: Refused = _ignore) -> None:  # fmt: skip
        self.app = app
        self.refused = refused
        self.allowed = frozenset(allowed)
        self.any = "*" in self.allowed
        self.local = local and not self.any
        self.hosts = {_netloc(*o.split("://", 1)) for o in self.allowed if "://" in o}
        self._told: set[str] = set()  # origins whose refusal was logged

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        method = scope["method"]
        if self.local and (b"origin" in headers or b"sec-fetch-mode" in headers) and not self._local_host(headers):
            await self._refuse(scope, send, None, headers.get(b"host", b"").decode("latin-1"))
            return
        raw = headers.get(b"origin")
        if raw is None:
            if method not in _SAFE_METHODS and headers.get(b"sec-fetch-site") == b"cross-site":
                await self._refuse(scope, send, "another site")
                return
            await self.app(scope, receive, send)
            return
        origin = raw.decode("latin-1")
        same = _same_origin(origin, headers)
        allowed = same or self.any or origin.lower().rstrip("/") in self.allowed
        if method == "OPTIONS" and b"access-control-request-method" in headers:  # a preflight
            if not allowed:
                await self._refuse(scope, send, origin)
                return
            wanted = headers.get(b"access-control-request-headers", b"")
            out = [(b"access-control-allow-origin", raw), (b"vary", b"Origin"),
                   (b"access-control-allow-methods", b"GET, POST, DELETE, OPTIONS"),
                   (b"access-control-allow-headers", wanted), (b"access-control-max-age", b"600"),
                   (b"content-length", b"0")]  # fmt: skip
            if headers.get(b"access-control-request-private-network") == b"true":  # a public page to this machine
                out.append((b"access-control-allow-private-network", b"true"))  # (Chrome's Private Network Access)
            await send({"type": "http.response.start", "status": 204, "headers": out})
            await send({"type": "http.response.body", "body": b""})
            return
        if not allowed and method not in _SAFE_METHODS:
            await self._refuse(scope, send, origin)
            return
        if not allowed or same:
            await self.app(scope, receive, send)
            return

        async def with_cors(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                names = b", ".join(k for k, _ in message.get("headers", []) if k.lower() != b"content-type")
                extra = [(b"access-control-allow-origin", raw), (b"vary", b"Origin")]
                if names:
                    extra.append((b"access-control-expose-headers", names))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_cors)

    def _local_host(self, headers: dict[bytes, bytes]) -> bool:
        host = headers.get(b"host", b"localhost").decode("latin-1")
        return loopback_name(host) or any(_netloc(s, host) in self.hosts for s in ("http", "https"))

    async def _refuse(self, scope: dict[str, Any], send: Any, origin: str | None, host: str = "") -> None:
        code = "host_not_allowed" if origin is None else "origin_not_allowed"
        self.refused(code)
        who = origin or f"a page under the name {host[:200]!r}"
        if who not in self._told and len(self._told) < _MAX_TOLD:  # the page's own console shows only "CORS error"
            self._told.add(who)
            logger.warning("refused %s %s from %s (not in --allowed-origins; each origin is logged once)",
                           scope["method"], scope["path"][:200], who[:200])  # fmt: skip
        if origin is None:
            message = (f"this server listens on this machine only, and {host[:200]!r} is not one of its names: a "
                       "page may not reach it under another name; a proxy in front that keeps its own name: list "
                       "that origin in --allowed-origins (the gateway: gateway.allowed_origins)")  # fmt: skip
        else:
            message = (f"a browser page from {origin[:200]} may not call this server; to allow it, list its origin "
                       "in --allowed-origins (the gateway: gateway.allowed_origins)")  # fmt: skip
        if scope["path"].startswith("/v1/messages"):
            body = {"type": "error", "error": {"type": "permission_error", "message": message}}
        else:
            body = {"error": {"message": message, "type": "permission_error", "param": None, "code": code}}
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": 403, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": data})
