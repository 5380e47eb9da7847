"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` for every failure.

FastAPI's own shapes (422 validation details, `{"detail": ...}` for 404/405) are replaced so that
OpenAI clients raise their usual typed exceptions (BadRequestError, NotFoundError, ...).
"""
from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """Raised anywhere in a handler; turned into an OpenAI error body with `status`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    err_type = _TYPES.get(status, "internal_server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


class ErrorJSON(JSONResponse):
    """An error body always renders: text echoed from a request (a lone surrogate, say) goes out
    escaped (ensure_ascii) instead of failing to encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return ErrorJSON(error_body(status, message, param, code), status_code=status, headers=headers)


def _field_path(loc: tuple) -> list[str]:
    """("body", "prompt", "list[function-after[...]]", 0) -> ["prompt", "0"]: the request's field path,
    without the root and pydantic's names for the member of a union that was tried."""
    return [str(part) for part in loc if part not in ("body", "query", "path") and not (
        isinstance(part, str) and ("[" in part or part[:1].isupper() or part in ("str", "int", "float", "bool")))]


def _most_telling(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """Of a union's errors, the one about the value (a lone surrogate in the list member) rather than
    'not a string' from the member it was not meant for; then the deepest."""
    return max(errors, key=lambda e: (not str(e.get("type", "")).endswith("_type"), len(_field_path(e["loc"]))))


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    errors = exc.errors()
    if not errors:
        return "Invalid request", None, "invalid_request"
    if errors[0].get("type") == "json_invalid":
        return f"Malformed JSON body: {errors[0].get('msg', '')}", None, "invalid_json"
    first = _most_telling(errors)
    # loc is ("body", "messages", 0, "role"): name the field as a dotted path, "messages.0.role"
    param = ".".join(_field_path(first.get("loc", ()))) or None
    where = f" at '{param}'" if param else ""
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return f"Invalid request{where}: {first.get('msg', 'invalid value')}{more}", param, "invalid_request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = _validation_message(exc)
        return error_response(400, message, param, code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 413:  # limits.BodySizeLimit, as a chunked body went past the limit
            return error_response(413, str(exc.detail), code="request_too_large")
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return error_response(500, f"Internal server error: {type(exc).__name__}")
