"""Errors are values: every failure the service reports is an `APIError`, mapped once (in
`install_error_handlers`) to the OpenAI error body `{"error": {message, type, param, code}}`."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class APIError(Exception):
    status_code = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status_code is not None:
            self.status_code = status_code

    def body(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class BadRequest(APIError):
    status_code = 400


class Unauthorized(APIError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(APIError):
    status_code = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(APIError):
    status_code = 404
    type = "not_found_error"
    code = "not_found"


class Conflict(APIError):
    status_code = 409
    code = "conflict"


class PayloadTooLarge(APIError):
    status_code = 413
    code = "payload_too_large"


class Unavailable(APIError):
    status_code = 503
    type = "service_unavailable"
    code = "not_ready"


def error_response(error: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status_code, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    param = ".".join(loc) or None
    return (
        f"{param}: {first.get('msg', 'invalid')}" if param else first.get("msg", "invalid"),
        param,
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        json_error = any(e.get("type") == "json_invalid" for e in exc.errors())
        if json_error:
            return error_response(BadRequest("request body is not valid JSON", code="invalid_json"))
        return error_response(
            APIError(message, param=param, code="invalid_parameter", status_code=422)
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {401: Unauthorized, 403: Forbidden, 404: NotFound, 413: PayloadTooLarge}
        error = kinds.get(exc.status_code, APIError)(str(exc.detail))
        error.status_code = exc.status_code
        return error_response(error, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return internal_error_response()


def internal_error_response() -> JSONResponse:
    """A 500 that tells the client nothing about the internals (the log has the traceback)."""
    error = APIError("internal server error", code="internal_error", status_code=500)
    error.type = "server_error"
    return error_response(error)
