"""The OpenAI-compatible HTTP API over the async engine.

Every error leaves as an OpenAI-style body ``{"error": {"message", "type", "param",
"code"}}``: 400 for bad input, 401 for a missing key, 404 for an unknown model,
413 for an oversized body, 429 when the waiting queue is full, 503 when the
engine is down. A client that disconnects aborts its request.

The routes live next to their API (``chat.py``, ``completions.py``); what they share
(auth, submit, the answer path) is ``serving.Serving``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import agora
from agora import envs
from agora.config import ServerConfig
from agora.engine.client import EngineClient
from agora.engine.engine import out_of_vocabulary
from agora.http_server import CrossOrigin, loopback_name
from agora.openai.common import error_words, telling_error
from agora.openai.errors import APIError, bad_request
from agora.openai.messages import anthropic_error
from agora.openai.tokenize import DetokenizeRequest, TokenizeRequest
from agora.server import chat, completions, messages, responses
from agora.server.http import APIKeyGuard, BodyGuard, document_bodies, error_response, json_body
from agora.server.metrics import ServerMetrics
from agora.server.serving import Serving
from agora.server.store import ResponseStore

logger = logging.getLogger(__name__)


def _is_type_name(part: str) -> bool:
    return "[" in part or part in ("str", "int", "float", "bool", "list", "dict", "none") or "-" in part


def anthropic_path(request: Request) -> bool:
    return request.url.path.startswith("/v1/messages")


def api_error_response(request: Request, exc: APIError) -> JSONResponse:
    """The error in the shape of the API the request spoke (Anthropic's on /v1/messages, else OpenAI's)."""
    if anthropic_path(request):
        status, body = anthropic_error(exc)
        return JSONResponse(body, status, headers=exc.headers)
    return error_response(exc)


def validation_error(exc: RequestValidationError) -> APIError:
    """pydantic's most telling error as a 400 naming the top-level parameter in ``param``."""
    errors = exc.errors()
    first = telling_error(errors)
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    # OpenAI names the top-level parameter; pydantic's union branches ("str", "list[int]") are noise.
    param = loc[0] if loc else None
    where = ".".join(x for x in loc if not _is_type_name(x))
    if first.get("type") == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {where or param}"
    elif first.get("type") == "json_invalid":
        message = "the request body is not valid JSON"
        param = None  # its loc is a position in the body, not a parameter
    elif first.get("type") == "missing":
        message = f"missing required parameter: {where or param}"
    else:
        message = f"{where}: {error_words(first)}" if where else error_words(first)
    return APIError(400, message, "invalid_request_error", param)


def build_app(engine: EngineClient, config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    core = engine.model_info
    metrics = ServerMetrics(lambda: engine.stats, core.served_model_name)
    serving = Serving(engine, config, metrics)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        yield
        engine.shutdown()

    app = FastAPI(title="agora", version=agora.__version__, lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics

    # -- errors --------------------------------------------------------------------

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        if exc.status in (413, 429, 503):
            metrics.rejected.labels(serving.model_name, str(exc.status)).inc()
        return api_error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return api_error_response(request, validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = str(exc.detail)
        path = request.url.path[:200]
        if exc.status_code == 404 and message == "Not Found":  # the router's own, not a route's
            message = f"no route for {request.method} {path}"  # the gateway's words
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {path}"
        return api_error_response(request, APIError(exc.status_code, message, kind))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return api_error_response(request, APIError(500, "internal server error", "internal_error"))

    # -- routes ----------------------------------------------------------------------

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_healthy:
            raise APIError(503, "the engine is not running", "service_unavailable")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": agora.__version__}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "agora", "root": serving.model_name,
                "max_model_len": core.max_model_len}  # fmt: skip

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        extra = sorted(serving.model_names - {serving.model_name})
        return {"object": "list", "data": [model_card(n) for n in [serving.model_name, *extra]]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        serving.check_model(model_id)
        return model_card(model_id)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest = Depends(json_body(TokenizeRequest))) -> Response:
        serving.check_model(req.model)
        tok = serving.need_tokenizer()

        ids = None
        if req.messages is not None:  # the chat route's own rendering, in threads
            _, ids, _ = await chat.render_prompt(serving, req.chat_request())

        def run(ids: list[int] | None) -> bytes:  # in a thread: a body's worth of text is seconds of work
            if ids is None:
                ids = tok.encode(req.prompt or "", add_special_tokens=req.add_special_tokens is not False)
            body: dict[str, Any] = {"count": len(ids), "max_model_len": core.max_model_len, "tokens": ids}
            if req.return_token_strs:
                body["token_strs"] = tok.hf.convert_ids_to_tokens(ids)
            return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()

        return Response(await asyncio.to_thread(run, ids), media_type="application/json")

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest = Depends(json_body(DetokenizeRequest))) -> dict[str, Any]:
        serving.check_model(req.model)
        tok = serving.need_tokenizer()

        def run() -> str:
            if (bad := out_of_vocabulary(req.tokens, core.vocab_size)) is not None:
                raise bad_request("tokens", f"token id {bad} is out of the vocabulary (0..{core.vocab_size - 1})")
            return tok.decode(req.tokens)

        return {"prompt": await asyncio.to_thread(run)}

    completions.add_routes(app, serving)
    chat.add_routes(app, serving)
    messages.add_routes(app, serving)
    store = ResponseStore(config.responses_store or envs.cache_dir() / "responses.sqlite3", config.responses_ttl_s,
                          config.responses_max)  # fmt: skip
    app.state.responses = store
    responses.add_routes(app, serving, store)
    document_bodies(app)
    app.add_middleware(BodyGuard, max_bytes=config.max_body_bytes)
    app.add_middleware(APIKeyGuard, api_key=config.api_key)  # runs before any body is read
    # added last, so it runs first: a browser's preflight carries no key, and another site's page is refused
    app.add_middleware(CrossOrigin, allowed=config.allowed_origins, local=loopback_name(config.host),
                       refused=metrics.refused)  # fmt: skip
    return app
