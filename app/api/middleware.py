"""HTTP middleware: request ids, metrics and the access log; request body size limits."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from functools import partial

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings
from app.errors import PayloadTooLarge, error_response, internal_error_response
from app.observability.logging import REQUEST_ID_HEADER, request_id_var
from app.state import AppState

logger = logging.getLogger("app.main")


class BodySizeLimit:
    """Refuses request bodies over a limit (413): by Content-Length up front, and by counting
    the bytes actually received, so a chunked body cannot slip past. Admin routes take the
    adapter-upload limit, the rest `max_request_bytes`."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def limit(self, path: str) -> int:
        if path.startswith("/admin"):
            return self.settings.max_adapter_bytes + 1_000_000  # files + multipart framing
        return self.settings.max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit(scope["path"])
        message = f"request body is larger than {limit} bytes"
        headers = dict(scope.get("headers") or [])
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > limit:
            await error_response(PayloadTooLarge(message))(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            incoming = await receive()
            if incoming["type"] == "http.request":
                received += len(incoming.get("body", b""))
                if received > limit:
                    # FastAPI re-raises HTTPException from body parsing; mapped to 413 shape
                    raise HTTPException(413, message)
            return incoming

        await self.app(scope, counting_receive, send)


async def _observed(
    body: AsyncIterator[bytes], finished: Callable[[], None]
) -> AsyncIterator[bytes]:
    """`body`, then `finished()` once it is sent (or the client left): a streamed answer's
    headers go out at its first token, so observing there would time only that."""
    try:
        async for chunk in body:
            yield chunk
    finally:
        finished()


def _observe(request: Request, status: int, rid: str, start: float) -> None:
    """Count, time and log one finished request. The log line carries `rid` although the
    request's context has ended by the time a stream is sent."""
    route_path = getattr(request.scope.get("route"), "path", "unmatched")
    tenant = getattr(request.state, "tenant", "anonymous")
    patches = getattr(request.state, "patches", [])
    seconds = time.perf_counter() - start
    state: AppState | None = getattr(request.app.state, "safepatch", None)
    if state is not None and request.url.path != "/metrics":
        state.metrics.observe_request(route_path, status, tenant, patches, seconds)
    token = request_id_var.set(rid)
    try:  # the access log: no query string, headers, body or prompt text
        logger.info(
            "%s %s %d",
            request.method,
            request.url.path,
            status,
            extra={
                "method": request.method,
                "route": route_path,
                "status": status,
                "tenant": tenant,
                "patches": ",".join(patches),
                "duration_ms": round(seconds * 1000, 2),
            },
        )
    finally:
        request_id_var.reset(token)


def install_middleware(app: FastAPI, settings: Settings) -> None:
    app.add_middleware(BodySizeLimit, settings=settings)  # inner: runs after `observe`

    @app.middleware("http")
    async def observe(request: Request, call_next):
        rid = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        if len(rid) > 128 or not rid.isprintable():
            rid = uuid.uuid4().hex
        token = request_id_var.set(rid)
        start = time.perf_counter()
        try:
            try:
                response = await call_next(request)
            except Exception:
                # answered here, not by the outermost handler, so that the 500 carries the
                # request id (in the log line too) and is counted like any other response
                logger.exception("unhandled error")
                response = internal_error_response()
            response.headers[REQUEST_ID_HEADER] = rid
            finished = partial(_observe, request, response.status_code, rid, start)
            if hasattr(response, "body_iterator"):  # call_next's answers, streamed or not
                response.body_iterator = _observed(response.body_iterator, finished)
            else:  # the 500 built above, whole
                finished()
            return response
        finally:
            request_id_var.reset(token)
