"""The dashboard's routes: the static page, a login that gives the browser a session cookie, and
the live feed (server-sent events) the page and ``agora top`` read.

Nothing runs while nobody watches: each open feed sleeps for its interval and sends the latest
snapshot, which is built at most once per tick however many feeds are open.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from agora.openai.errors import APIError
from agora.router.asgi import send_body
from agora.router.config import DashboardSettings
from agora.router.dashboard.live import LiveStats
from agora.router.governance.runtime import Identity, is_loopback

if TYPE_CHECKING:
    from agora.router.gateway import Gateway

COOKIE = "agora_dashboard"
_MAX_SESSIONS = 1024
_STATIC = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}
# The page loads only its own script and style, talks only to this origin, and cannot be framed.
_PAGE_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


@dataclass(slots=True)
class _Session:
    expires: float
    kind: str  # "static" (the gateway's own key), "key" (a stored admin key), "open" (no keys, loopback)
    key_hash: str | None = None


class Dashboard:
    """The ``/dashboard`` routes of one gateway, and the live state they show."""

    def __init__(self, gw: Gateway, settings: DashboardSettings) -> None:
        self.gw, self.settings = gw, settings
        self.live = LiveStats(settings.window_s)
        self.sessions: OrderedDict[str, _Session] = OrderedDict()  # sha256(cookie) -> session
        self.clients = 0
        self._latest: tuple[float, bytes] | None = None
        self._files: dict[str, bytes] = {}
        self._feeds: set[asyncio.Event] = set()  # one per open feed: set when it must end
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    def close(self) -> None:
        """End every open feed (callable from a signal handler or another thread); refuse new ones."""
        self.closed = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            for stop in list(self._feeds):
                loop.call_soon_threadsafe(stop.set)

    # -- routes ------------------------------------------------------------------------

    async def handle(self, scope: dict[str, Any], headers: dict[bytes, bytes], client: str, send: Any,
                     receive: Any) -> None:  # fmt: skip
        method, path = scope["method"], scope["path"].rstrip("/") or "/"
        if method == "GET" and path == "/dashboard":
            await send_body(send, 200, self._file("index.html"), "text/html; charset=utf-8", _PAGE_HEADERS)
        elif method == "GET" and path.startswith("/dashboard/static/"):
            name = path.removeprefix("/dashboard/static/")
            if name not in _STATIC:
                raise APIError(404, f"no dashboard file {name!r}", "not_found_error")
            await send_body(send, 200, self._file(name), _STATIC[name], {"x-content-type-options": "nosniff",
                                                                       "cache-control": "no-cache"})  # fmt: skip
        elif method == "POST" and path == "/dashboard/login":
            cookie = await self._login(scope, headers, client)
            await send_body(send, 204, b"", "text/plain", {"set-cookie": cookie, "cache-control": "no-store"})
        elif method == "POST" and path == "/dashboard/logout":
            token = _cookie(headers)
            if token:
                self.sessions.pop(_digest(token), None)
            await send_body(send, 204, b"", "text/plain", {"set-cookie": f"{COOKIE}=; Path=/dashboard; Max-Age=0; "
                                                                     "HttpOnly; SameSite=Strict"})  # fmt: skip
        elif method == "GET" and path == "/dashboard/snapshot":
            await self._authorize(headers, client)
            await send_body(send, 200, self._snapshot(), "application/json", {"cache-control": "no-store"})
        elif method == "GET" and path == "/dashboard/events":
            await self._events(scope, headers, client, send, receive)
        else:
            raise APIError(404, f"no dashboard route for {method} {scope['path']}", "not_found_error")

    def _file(self, name: str) -> bytes:
        if name not in self._files:
            self._files[name] = (resources.files("agora.router.dashboard") / "static" / name).read_bytes()
        return self._files[name]

    # -- who may look --------------------------------------------------------------------

    async def _admin(self, headers: dict[bytes, bytes], client: str) -> Identity:
        identity = await self.gw.identify(headers, client)
        self.gw.require_admin(identity, client, "the dashboard")
        return identity

    async def _login(self, scope: dict[str, Any], headers: dict[bytes, bytes], client: str) -> str:
        identity = await self._admin(headers, client)
        expires = time.time() + self.settings.session_ttl_s
        if identity.key is not None and identity.key.expires is not None:
            expires = min(expires, identity.key.expires)  # never past the key's own expiry
        if identity.key_id == "static":
            session = _Session(expires, "static")
        elif identity.key is not None:
            session = _Session(expires, "key", identity.key.key_hash)
        else:
            session = _Session(expires, "open")
        token = secrets.token_urlsafe(32)
        self.sessions[_digest(token)] = session
        while len(self.sessions) > _MAX_SESSIONS:
            self.sessions.popitem(last=False)
        secure = "; Secure" if scope.get("scheme") == "https" or \
            headers.get(b"x-forwarded-proto", b"").lower() == b"https" else ""  # fmt: skip
        max_age = max(1, int(session.expires - time.time()))
        return f"{COOKIE}={token}; Path=/dashboard; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}"

    def _valid(self, session: _Session, client: str) -> bool:
        """A session lasts while the key that opened it is still a live admin key."""
        gov = self.gw.governance
        if time.time() >= session.expires:
            return False
        if session.kind == "static":
            return gov.static_key is not None
        if session.kind == "open":
            return gov.open and is_loopback(client)
        record = gov.by_hash.get(session.key_hash or "")  # (its expiry already bounds the session's)
        return record is not None and record.role == "admin"

    async def _authorize(self, headers: dict[bytes, bytes], client: str) -> _Session | None:
        """The session the cookie names (None when a key was sent instead), or a 401 / 403."""
        token = _cookie(headers)
        if token and b"authorization" not in headers and b"x-api-key" not in headers:
            session = self.sessions.get(_digest(token))
            if session is not None and self._valid(session, client):
                return session
            if session is not None:
                self.sessions.pop(_digest(token), None)
            if not self.gw.governance.open:
                raise APIError(401, "the dashboard session has ended: log in again with an admin key",
                               "authentication_error", code="session_expired")  # fmt: skip
        await self._admin(headers, client)
        return None

    # -- the feed -----------------------------------------------------------------------

    def _snapshot(self) -> bytes:
        """The current snapshot, encoded; shared by every feed for a fraction of the shortest interval."""
        now = time.monotonic()
        if self._latest is None or now - self._latest[0] >= 0.2:
            self._latest = (now, json.dumps(self.live.snapshot(self.gw), separators=(",", ":")).encode())
        return self._latest[1]

    async def _events(self, scope: dict[str, Any], headers: dict[bytes, bytes], client: str, send: Any,
                      receive: Any) -> None:  # fmt: skip
        session = await self._authorize(headers, client)
        interval = _interval(scope.get("query_string", b""), self.settings.interval_s)
        if self.clients >= self.settings.max_clients:
            raise APIError(429, f"{self.clients} dashboard feeds are open; the limit is {self.settings.max_clients}",
                           "rate_limit_error", code="too_many_feeds", headers={"Retry-After": "5"})  # fmt: skip
        if self.closed:
            raise APIError(503, "the gateway is shutting down", "service_unavailable", code="shutting_down")
        self._loop = asyncio.get_running_loop()
        self.clients += 1
        stop = asyncio.Event()  # the client left, or the gateway is stopping
        self._feeds.add(stop)
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            stop.set()

        watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-store"),
                (b"x-accel-buffering", b"no")]})  # fmt: skip
            await send({"type": "http.response.body", "body": b"retry: 2000\n\n", "more_body": True})
            ended = None
            while ended is None and not stop.is_set():
                if session is not None and not self._valid(session, client):
                    ended = "the dashboard session has ended"
                    break
                body = b"event: snapshot\ndata: " + self._snapshot() + b"\n\n"
                await send({"type": "http.response.body", "body": body, "more_body": True})
                try:
                    await asyncio.wait_for(stop.wait(), interval)
                except TimeoutError:
                    pass
            if not gone:  # why it ends, and whether logging in again would help
                why = {"reason": ended or "the gateway is shutting down", "relogin": ended is not None}
                await send({"type": "http.response.body", "body": b"event: ended\ndata: " + json.dumps(why).encode()
                            + b"\n\n", "more_body": False})  # fmt: skip
        except OSError:
            pass  # the client went away mid-write
        finally:
            self.clients -= 1
            self._feeds.discard(stop)
            watcher.cancel()


def _interval(query: bytes, default: float) -> float:
    given = parse_qs(query.decode("latin-1")).get("interval")
    if not given:
        return default
    try:
        value = float(given[-1])
    except ValueError:
        raise APIError(400, "interval must be a number of seconds", param="interval") from None
    if not 0.25 <= value <= 60:
        raise APIError(400, "interval must be between 0.25 and 60 seconds", param="interval")
    return value


def _cookie(headers: dict[bytes, bytes]) -> str | None:
    for part in headers.get(b"cookie", b"").decode("latin-1").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE and value:
            return value
    return None


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("latin-1", "replace")).hexdigest()
