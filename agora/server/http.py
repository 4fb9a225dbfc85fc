"""HTTP pieces of the engine server: the OpenAI error response, the key check, the body's guard, and the
body read as an API's request model."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agora.openai.common import json_object, lone_surrogate, not_json_error, not_json_type, surrogate_error
from agora.openai.errors import APIError, bearer_token_matches
from agora.openai.messages import anthropic_error


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), exc.status, headers=exc.headers)


class BodyGuard:
    """Refuse request bodies over ``max_bytes`` with 413, whether or not they declare a length; a body sent as
    something other than JSON (a form, text) with 415; and a JSON body holding half a UTF-16 surrogate pair
    with a 400 that names the parameter (it is not text: the tokenizer would fail on it deep inside the
    request). Each refusal in the API's own shape."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return

        def refusal(error: APIError) -> JSONResponse:
            if scope.get("path", "").startswith("/v1/messages"):  # Anthropic's API, Anthropic's error shape
                status, body = anthropic_error(error)
                return JSONResponse(body, status)
            return error_response(error)

        too_big = APIError(413, f"request body exceeds {self.max_bytes} bytes", code="request_too_large")
        headers = dict(scope.get("headers", []))
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await refusal(too_big)(scope, receive, send)
            return
        if length != b"0" and (kind := not_json_type(headers.get(b"content-type"))) is not None:
            await refusal(not_json_error(kind))(scope, receive, send)
            return
        # Read it here, within the limit (a chunked upload declares none), then replay it.
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await refusal(too_big)(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        whole = bytes(body)
        if (path := lone_surrogate(whole)) is not None:
            await refusal(surrogate_error(path))(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": whole, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


PROTECTED = ("/v1/", "/tokenize", "/detokenize")  # /health, /metrics and /version stay open for probes


class APIKeyGuard:
    """With a key configured, every API path needs it before anything else is read: ``Authorization:
    Bearer KEY`` or Anthropic's ``x-api-key: KEY``; else 401 in the API's own shape."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.api_key is None or scope["type"] != "http" or not scope.get("path", "").startswith(PROTECTED):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        given = headers.get(b"authorization", b"").decode("latin-1")
        if not given and b"x-api-key" in headers:
            given = "Bearer " + headers[b"x-api-key"].decode("latin-1")
        if bearer_token_matches(given, self.api_key):
            await self.app(scope, receive, send)
            return
        error = APIError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")
        if scope["path"].startswith("/v1/messages"):
            status, body = anthropic_error(error)
            await JSONResponse(body, status)(scope, receive, send)
        else:
            await error_response(error)(scope, receive, send)


# -- the body as a request model -------------------------------------------------------------------------------

INLINE_BODY_BYTES = 64 << 10  # bodies up to this are read on the event loop; larger ones in a thread
M = TypeVar("M", bound=BaseModel)


def json_body(model: type[M]) -> Callable[[Request], Awaitable[M]]:
    """A FastAPI dependency that gives the request body as ``model``, with the errors a body parameter would
    raise. A body over `INLINE_BODY_BYTES` is parsed and validated in a thread: a few megabytes (200,000 chat
    messages) take most of a second, which on the event loop every running stream would wait out; in a thread
    the loop waits at most for the one C call that parses the JSON. (`document_bodies` puts ``model`` in the
    OpenAPI document, where a body parameter would be.)"""

    async def body(request: Request) -> M:
        raw = await request.body()
        if len(raw) <= INLINE_BODY_BYTES:
            return _validated(model, raw)
        return await asyncio.to_thread(_validated, model, raw)

    body.model = model  # type: ignore[attr-defined]
    return body


def _validated(model: type[M], raw: bytes) -> M:
    data = json_object(raw)  # an APIError (400) for a body that is not one JSON object, worded as the gateway's
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        ) from None


def document_bodies(app: FastAPI) -> None:
    """Bodies read through `json_body` are no parameters FastAPI sees: give each route its body's schema in the
    OpenAPI document (``/docs``), as a body parameter would have."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = build()
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for route in app.routes:
            for dep in getattr(getattr(route, "dependant", None), "dependencies", []):
                model = getattr(dep.call, "model", None)
                if model is None:
                    continue
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                for name, sub in schema.pop("$defs", {}).items():
                    schemas.setdefault(name, sub)
                schemas.setdefault(model.__name__, schema)
                for method in route.methods:
                    doc["paths"][route.path_format][method.lower()]["requestBody"] = {"required": True, "content": {
                        "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}  # fmt: skip
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
