"""Errors as the API reports them: every failure becomes an `APIError`, rendered once (in
`install_error_handlers`) as the OpenAI error body `{"error": {message, type, param, code}}`.

Domain code raises `app.exceptions.DomainError`s, which know nothing of HTTP; `KINDS` below is
the one place that gives each kind its status and error class. The HTTP layer (routes, deps,
middleware, serving) raises `APIError`s directly."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.exceptions import DomainError

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error as the API reports it. A subclass sets its status, OpenAI error type and
    default code in its header: `class NotFound(APIError, status=404, ...)`."""

    status_code = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init_subclass__(
        cls,
        *,
        status: int | None = None,
        error_type: str | None = None,
        code: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        cls.status_code = status or cls.status_code
        cls.type = error_type or cls.type
        cls.code = code or cls.code

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


class BadRequest(APIError, status=400):
    pass


class UnprocessableEntity(APIError, status=422):
    pass


class Unauthorized(APIError, status=401, error_type="authentication_error", code="invalid_api_key"):
    pass


class Forbidden(APIError, status=403, error_type="permission_error", code="forbidden"):
    pass


class NotFound(APIError, status=404, error_type="not_found_error", code="not_found"):
    pass


class Conflict(APIError, status=409, code="conflict"):
    pass


class PayloadTooLarge(APIError, status=413, code="payload_too_large"):
    pass


class Unavailable(APIError, status=503, error_type="service_unavailable", code="not_ready"):
    pass


class StorageError(APIError, status=500, error_type="server_error", code="storage_error"):
    """The server could not write (or read) its own files: a 5xx, and nothing was changed."""


class InsufficientStorage(StorageError, status=507, code="insufficient_storage"):
    """As StorageError, for a full disk or quota."""


# DomainError.kind -> API error class: the one mapping of domain errors to HTTP
KINDS: dict[str, type[APIError]] = {
    "invalid": BadRequest,
    "unprocessable": UnprocessableEntity,
    "unauthorized": Unauthorized,
    "forbidden": Forbidden,
    "not_found": NotFound,
    "conflict": Conflict,
    "unavailable": Unavailable,
    "storage": StorageError,
    "storage_full": InsufficientStorage,
}


def api_error(error: APIError | DomainError) -> APIError:
    """The API error for a domain error (an APIError is returned as it is)."""
    if isinstance(error, APIError):
        return error
    return KINDS[error.kind](error.message, param=error.param, code=error.code)


def error_response(
    error: APIError | DomainError, headers: dict[str, str] | None = None
) -> JSONResponse:
    error = api_error(error)
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
    @app.exception_handler(DomainError)
    async def _api_error(_: Request, exc: APIError | DomainError) -> JSONResponse:
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
