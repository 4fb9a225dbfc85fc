"""The one error type of every API agora speaks, and the bearer-key check.

An :class:`APIError` carries its HTTP status and the OpenAI error fields explicitly,
``param`` included: whoever raises it names the parameter, nothing guesses it from
the message. It leaves as ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import hmac
from typing import Any


class APIError(Exception):
    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
        code: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(param: str | None, message: str) -> APIError:
    """The 400 for a parameter the client got wrong (or that agora does not implement)."""
    return APIError(400, message, "invalid_request_error", param)


def bearer_token_matches(authorization: str, api_key: str) -> bool:
    """Constant-time check of an ``Authorization: Bearer ...`` header against ``api_key``."""
    token = authorization[7:] if authorization.lower().startswith("bearer ") else ""
    return hmac.compare_digest(token.encode(), api_key.encode())
