"""Errors of the HTTP endpoints, answered in OpenAI's shape.

``{"error": {"message", "type", "param", "code"}}`` with the matching status: what the OpenAI
SDKs and the frameworks built on them read. ``code`` is the protocol's error code where the
error came from the protocol session (``unknown_voice``, ``text_too_long``, ...).
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse, Response

from ..errors import HTTP_STATUS, StreamEngineError

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class ApiError(Exception):
    """An HTTP error: raised in an endpoint, answered by :meth:`response`."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @classmethod
    def of(cls, exc: StreamEngineError, param: str | None = None) -> ApiError:
        """The HTTP form of one of the package's errors (internal ones say no more)."""
        status = HTTP_STATUS.get(exc.code, 500)
        message = "internal error" if status == 500 else str(exc)
        return cls(status, message, param, exc.code)

    def body(self) -> dict[str, Any]:
        kind = _TYPES.get(self.status, "invalid_request_error")
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return {"error": error}

    def response(self) -> Response:
        return JSONResponse(self.body(), self.status, headers={"Cache-Control": "no-store"})
