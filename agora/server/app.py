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
import logging
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import agora
from agora.config import ServerConfig
from agora.engine.async_engine import AsyncEngine
from agora.openai.errors import APIError, bad_request, error_body
from agora.openai.tokenize import DetokenizeRequest, TokenizeRequest
from agora.server import chat, completions
from agora.server.http import BodySizeLimit, error_response
from agora.server.metrics import ServerMetrics
from agora.server.serving import Serving
from agora.server.tools import template_message

logger = logging.getLogger(__name__)


def _is_type_name(part: str) -> bool:
    return "[" in part or part in ("str", "int", "float", "bool", "list", "dict", "none") or "-" in part


def validation_error(exc: RequestValidationError) -> JSONResponse:
    """pydantic's first error as OpenAI's 400: the top-level parameter in ``param``."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    # OpenAI names the top-level parameter; pydantic's union branches ("str", "list[int]") are noise.
    param = loc[0] if loc else None
    where = ".".join(x for x in loc if not _is_type_name(x))
    if first.get("type") == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {where or param}"
    elif first.get("type") == "json_invalid":
        message = "the request body is not valid JSON"
    elif first.get("type") == "missing":
        message = f"missing required parameter: {where or param}"
    else:
        message = f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg", "invalid request")
    return JSONResponse(error_body(message, "invalid_request_error", param), 400)


def build_app(engine: AsyncEngine, config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    core = engine.engine
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
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        if exc.status in (413, 429, 503):
            metrics.rejected.labels(serving.model_name, str(exc.status)).inc()
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), exc.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return JSONResponse(error_body("internal server error", "internal_error"), 500)

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

    def model_card() -> dict[str, Any]:
        return {"id": serving.model_name, "object": "model", "created": created, "owned_by": "agora",
                "root": serving.model_name, "max_model_len": core.max_model_len}  # fmt: skip

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        serving.check_auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        serving.check_auth(request)
        serving.check_model(model_id)
        return model_card()

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest, request: Request) -> dict[str, Any]:
        serving.check_auth(request)
        serving.check_model(req.model)
        tok = serving.need_tokenizer()
        if req.messages is not None:
            messages = [template_message(m, knows_tools=True) for m in req.messages]
            text = await asyncio.to_thread(chat.render_chat, tok, messages, req.add_generation_prompt, None, False)
            ids = tok.encode(text, add_special_tokens=False)
        else:
            ids = tok.encode(req.prompt or "", add_special_tokens=req.add_special_tokens)
        return {"count": len(ids), "max_model_len": core.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest, request: Request) -> dict[str, Any]:
        serving.check_auth(request)
        serving.check_model(req.model)
        tok = serving.need_tokenizer()
        bad = next((t for t in req.tokens if not 0 <= t < core.vocab_size), None)
        if bad is not None:
            raise bad_request("tokens", f"token id {bad} is out of the vocabulary (0..{core.vocab_size - 1})")
        return {"prompt": tok.decode(req.tokens)}

    completions.add_routes(app, serving)
    chat.add_routes(app, serving)
    app.add_middleware(BodySizeLimit, max_bytes=config.max_body_bytes)
    return app
