"""vLLM's answer to one request, served with one LoRA: leased until its last byte, under the
client's model name, with SafePatch's decisions (`safepatch` in the body, `X-SafePatch-*`
headers) and the request's tokens metered."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from starlette.types import ASGIApp

from app.engine.types import served_name
from app.errors import Unavailable
from app.serving.proxy import encode_json, forward
from app.state import AppState
from app.tenants.access import Resolved

APPLIED_HEADER = "X-SafePatch-Applied"
GATES_HEADER = "X-SafePatch-Gates"
INFO_FIELD = "safepatch"


class UsageMeter:
    """Tokens and time to first token of one answer, read from what vLLM sends."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def see(self, value: dict[str, Any]) -> None:
        if self.first is None and any(
            c.get("text") or (c.get("delta") or {}).get("content")
            for c in value.get("choices") or []
            if isinstance(c, dict)
        ):
            self.first = time.perf_counter() - self.start
        usage = value.get("usage")
        if isinstance(usage, dict):
            self.prompt_tokens = usage.get("prompt_tokens") or 0
            self.completion_tokens = usage.get("completion_tokens") or 0


def engine_app(state: AppState) -> ASGIApp:
    app = state.engine.asgi
    if app is None or not state.engine.is_ready:
        raise Unavailable("the engine is not ready; retry shortly")
    return app


async def lease(state: AppState, who: Resolved) -> Callable[[], None]:
    """Lease `who.lora` and make sure the engine serves it; returns the release."""
    # Taken with no await since resolving: a patch deleted meanwhile stays loaded for us.
    release = state.registry.targets.acquire(who.lora)
    try:
        if who.lora is not None:
            await state.engine.add_lora(who.lora)
    except BaseException:
        release()
        raise
    return release


async def answer(
    state: AppState,
    request: Request,
    payload: dict[str, Any],
    requested: str,
    who: Resolved,
    gates: dict[str, str],
    hold: Awaitable[None] | None = None,
) -> Response:
    """vLLM's answer with `who.lora`, leased until its last byte, under the client's model
    name and with SafePatch's decisions added. `gates` may still be filled while `hold` runs."""
    release = await lease(state, who)
    payload["model"] = served_name(who.lora) if who.lora else state.model_name
    info = {"applied_patches": who.patches, "gates": gates}
    meter = UsageMeter()

    def rewrite(value: Any) -> Any:
        if not isinstance(value, dict) or "error" in value:
            return value
        # Responses API stream events carry the answer under "response"
        answer = value["response"] if isinstance(value.get("response"), dict) else value
        if "model" in answer:
            meter.see(answer)
            answer["model"] = requested
            value[INFO_FIELD] = info
        return value

    def done() -> None:
        release()
        state.metrics.observe_generation(
            who.tenant, who.patches, meter.prompt_tokens, meter.completion_tokens, meter.first
        )

    response = await forward(
        engine_app(state),
        request,
        encode_json(payload),
        rewrite,
        extra_headers={APPLIED_HEADER: ",".join(who.patches)},
        on_done=once(done),
        hold=hold,
    )
    if gates:
        response.headers[GATES_HEADER] = ",".join(f"{p}={d}" for p, d in gates.items())
    return response


def once(action: Any) -> Any:
    called = False

    def run() -> None:
        nonlocal called
        if not called:
            called = True
            action()

    return run
