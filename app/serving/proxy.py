"""Hands one HTTP request to an inner ASGI app (vLLM's OpenAI server) and turns its answer
into a Starlette response, rewriting JSON bodies and SSE events on the way out.

The inner app sees the request as if it came straight from the client: same method, path,
query and headers, a (possibly rewritten) body, and a disconnect when our client leaves, so
vLLM's own cancellation aborts the engine request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Message

from app.errors import APIError, error_response, internal_error_response

logger = logging.getLogger(__name__)
JSONRewrite = Callable[[Any], Any]  # a decoded JSON value -> the value to send
INNER_GRACE_S = 5.0  # how long the inner app may take to end after our client is done
DROPPED_HEADERS = {b"content-length", b"authorization", b"x-safepatch-patches", b"host"}


def _inner_scope(request: Request, body: bytes) -> dict[str, Any]:
    scope = {
        key: value
        for key, value in request.scope.items()
        if key not in ("app", "router", "route", "endpoint", "path_params", "state")
    }
    headers = [(k, v) for k, v in request.scope["headers"] if k not in DROPPED_HEADERS]
    headers += [(b"host", b"safepatch"), (b"content-length", str(len(body)).encode())]
    scope["headers"] = headers
    scope["state"] = {}
    return scope


def encode_json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _is_openai_error(content: bytes) -> bool:
    try:
        value = json.loads(content)
    except ValueError:
        return False
    return isinstance(value, dict) and isinstance(value.get("error"), dict)


def _as_openai_error(status: int, content: bytes) -> Response:
    """The inner app's framework errors (`{"detail": ...}`, a crash page) in the OpenAI shape;
    a 5xx tells the client nothing of the internals."""
    if status >= 500:
        return internal_error_response()
    try:
        detail = json.loads(content).get("detail")
    except (ValueError, AttributeError):
        detail = None
    message = detail if isinstance(detail, str) else "the request was not accepted"
    return error_response(APIError(message, code="invalid_request", status_code=status))


def _rewrite_event(event: bytes, rewrite: JSONRewrite) -> bytes:
    """One SSE event: each `data: {...}` line rewritten (an event may also carry `event:` or
    `id:` lines, as the Responses API's do); `[DONE]`, comments and non-JSON pass unchanged."""
    lines = event.split(b"\n")
    for i, line in enumerate(lines):
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        try:
            value = json.loads(line[6:])
        except ValueError:
            continue
        if isinstance(value, dict):  # answers and chunks are objects; leave the rest as sent
            lines[i] = b"data: " + encode_json(rewrite(value))
    return b"\n".join(lines)


class _Exchange:
    """The inner app running as a task; its messages arrive in a queue."""

    def __init__(self, app: ASGIApp, scope: dict[str, Any], body: bytes) -> None:
        self.messages: asyncio.Queue[Message | None] = asyncio.Queue()
        self.gone = asyncio.Event()
        self._body: bytes | None = body
        self.task = asyncio.create_task(self._run(app, scope))

    async def _run(self, app: ASGIApp, scope: dict[str, Any]) -> None:
        try:
            await app(scope, self._receive, self.messages.put)
        except Exception:  # it answered 500 already; the log keeps why (with the request id)
            logger.exception("the engine's app failed")
        finally:
            await self.messages.put(None)  # the end, normal or not

    async def _receive(self) -> Message:
        if self._body is not None:
            body, self._body = self._body, None
            return {"type": "http.request", "body": body, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def body_chunks(self) -> AsyncIterator[bytes]:
        while (message := await self.messages.get()) is not None:
            if message["type"] == "http.response.body":
                yield message.get("body", b"")
                if not message.get("more_body", False):
                    return

    def finish(self, on_done: Callable[[], None]) -> None:
        """Our client is done or gone: tell the inner app (it aborts the engine request on a
        disconnect) and run `on_done` once it has ended. No await: this also runs from a
        stream that was cancelled, where every await would be cancelled again."""
        self.gone.set()
        self.task.add_done_callback(lambda _: on_done())
        asyncio.get_running_loop().call_later(INNER_GRACE_S, self.task.cancel)


async def forward(
    app: ASGIApp,
    request: Request,
    body: bytes,
    rewrite: JSONRewrite | None = None,
    extra_headers: dict[str, str] | None = None,
    on_done: Callable[[], None] = lambda: None,
    hold: Awaitable[None] | None = None,
) -> Response:
    """Run `request` (with `body`) through `app`. JSON answers and each SSE event pass through
    `rewrite`; `on_done` (idempotent) runs once the answer is fully sent, or the client left.
    With `hold`, the answer starts at once but nothing of it is rewritten or returned before
    `hold` is done; cancelling the call meanwhile ends the inner request (vLLM aborts it)."""
    exchange = _Exchange(app, _inner_scope(request, body), body)
    watcher = asyncio.create_task(_watch_disconnect(request, exchange))
    try:
        start = await exchange.messages.get()
        if hold is not None:
            await hold
        if start is None:  # the inner app ended without answering
            await exchange.task  # re-raises its error, answered by our handlers
            raise RuntimeError("the engine's app sent no response")
        headers = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in start.get("headers", [])
            if k.lower() != b"content-length"
        }
        headers.update(extra_headers or {})
        status = start["status"]
        if headers.get("content-type", "").startswith("text/event-stream"):
            # From here on Starlette watches the client: it cancels the stream when it leaves.
            watcher.cancel()
            events = _sse(exchange, rewrite, on_done)
            weakref.finalize(events, on_done)  # a stream never iterated still ends its lease
            return StreamingResponse(events, status_code=status, headers=headers)
        content = b"".join([chunk async for chunk in exchange.body_chunks()])
        exchange.finish(on_done)
        if status >= 400 and not _is_openai_error(content):
            return _as_openai_error(status, content)
        if rewrite is not None and headers.get("content-type", "").startswith("application/json"):
            with contextlib.suppress(ValueError):
                content = encode_json(rewrite(json.loads(content)))
        return Response(content, status_code=status, headers=headers)
    except BaseException:
        exchange.finish(on_done)
        raise
    finally:
        watcher.cancel()


async def _watch_disconnect(request: Request, exchange: _Exchange) -> None:
    """A client that leaves before a whole (non-streamed) answer is ready ends the engine's
    work too: the inner app sees the disconnect and aborts."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    exchange.gone.set()


async def _sse(
    exchange: _Exchange, rewrite: JSONRewrite | None, on_done: Callable[[], None]
) -> AsyncIterator[bytes]:
    pending = b""
    try:
        async for chunk in exchange.body_chunks():
            if rewrite is None:
                yield chunk
                continue
            pending += chunk
            *events, pending = pending.split(b"\n\n")
            if events:
                yield b"".join(_rewrite_event(e, rewrite) + b"\n\n" for e in events)
        if pending:
            yield pending
    finally:
        exchange.finish(on_done)
