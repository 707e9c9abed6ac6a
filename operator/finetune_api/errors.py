"""Errors in the OpenAI API's shape: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

Every failure a client sees is one of these (the app's middleware turns anything else into a 500 with a plain
message, never a stack trace)."""

from __future__ import annotations

from typing import Any

# OpenAI's error types by HTTP status (what the official SDKs map to their exception classes).
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    502: "server_error",
    503: "server_error",
    504: "server_error",
}


class ApiError(Exception):
    """A client-visible error: HTTP `status`, a message that names the field or line, OpenAI's `code` and the
    request parameter at fault (`param`)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error")
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
