"""SafePatch in front of vLLM's OpenAI server: one request's path.

    caller (deps) -> policy: the effective patch set -> the one LoRA (single or exact stack)
    -> lease -> vLLM's own OpenAI app, with `model` naming that LoRA -> the answer, with the
    client's `model`, `safepatch.applied_patches` and `X-SafePatch-Applied` added

Everything else (validation, chat templates, tools, structured output, logprobs, `n`,
penalties, streaming, errors) is vLLM's own serving layer, unchanged.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from starlette.types import ASGIApp

from app.engine.types import served_name
from app.errors import BadRequest, Unavailable
from app.patches.gate import GateRule, Probe
from app.serving.proxy import encode_json, forward
from app.state import AppState
from app.tenants.access import (
    PATCHES_FIELD,
    PATCHES_HEADER,
    Principal,
    Resolved,
    body_toggles,
    resolve,
)

APPLIED_HEADER = "X-SafePatch-Applied"
GATES_HEADER = "X-SafePatch-Gates"
INFO_FIELD = "safepatch"
# Routes where gated patches probe first (the others generate nothing, or not as a reply).
GATED_ROUTES = {"/v1/chat/completions", "/v1/completions"}
# Request fields a probe leaves out: it is greedy, one choice, whole and short, plain text.
PROBE_DROPPED = {
    "max_completion_tokens",
    "min_tokens",
    "stream_options",
    "logprobs",
    "top_logprobs",
    "prompt_logprobs",
    "echo",
    "best_of",
    "use_beam_search",
    "stop",
    "response_format",
    "structured_outputs",
    "seed",
}
# vLLM routes SafePatch serves, all through the patch policy (each names a `model`). Others
# (dev, RL, scale-out, stored-response retrieval, raw token generation) would bypass the
# policy or cross tenants, so they are not exposed.
POLICY_ROUTES = {
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/chat/completions/render",
    "/v1/completions/render",
    "/tokenize",
    "/detokenize",
}


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


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


async def serve(state: AppState, caller: Principal, request: Request) -> Response:
    """Answer one request to a vLLM route for `caller`."""
    app = engine_app(state)
    body = await request.body()
    payload = _json_object(body)
    if payload is None:  # not a JSON object: vLLM answers with its 400, nothing is generated
        return await forward(app, request, body)

    requested = payload.get("model") or state.model_name
    if not isinstance(requested, str):
        raise BadRequest("model must be a string", param="model", code="invalid_model")
    who = await resolve(
        caller,
        requested,
        body_toggles(payload.pop(PATCHES_FIELD, None)),
        request.headers.get(PATCHES_HEADER),
        state.model_name,
        state.registry,
    )
    request.state.tenant, request.state.patches = who.tenant, who.patches
    probe = None
    if request.url.path in GATED_ROUTES:
        rules = {p: GateRule.from_meta(state.registry.get(p).meta) for p in who.patches}
        probe = Probe.for_patches(rules, caller.policy.modes, who.patches)
    if probe is None:
        return await _answer(state, request, payload, requested, who, {})
    if _prefilled(payload):
        # the reply is already begun by the caller: a gate reading its first tokens could be
        # steered past, so the gated patches act as always on (fail closed)
        return await _answer(
            state, request, payload, requested, who, dict.fromkeys(probe.gated, "prefilled")
        )
    return await _gated_answer(state, request, payload, requested, who, probe)


async def _answer(
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
    release = await _lease(state, who)
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
        on_done=_once(done),
        hold=hold,
    )
    if gates:
        response.headers[GATES_HEADER] = ",".join(f"{p}={d}" for p, d in gates.items())
    return response


async def _gated_answer(
    state: AppState,
    request: Request,
    payload: dict[str, Any],
    requested: str,
    who: Resolved,
    probe: Probe,
) -> Response:
    """The probe and the ungated request start together, so a request the probe passes (most
    traffic) waits for no probe: nothing of the ungated answer is sent before the decision.
    If the probe fires, the ungated request is dropped (vLLM aborts it) and the patched one
    runs, reusing the probe's prefix from vLLM's LoRA-aware prefix cache."""
    kept = [p for p in who.patches if p not in probe.gated]
    ungated = Resolved(who.tenant, kept, await state.registry.lora_for(kept))
    gates: dict[str, str] = {}
    decided: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    early = asyncio.create_task(
        _answer(state, request, dict(payload), requested, ungated, gates, hold=decided)
    )
    early.add_done_callback(_retrieve)
    try:
        fired = await _probe(state, request, payload, who, probe)
    except BaseException:
        early.cancel()
        raise
    decision = "fired" if fired else "passed"
    for patch in probe.gated:
        state.metrics.gate_decisions.labels(patch, decision).inc()
    gates.update(dict.fromkeys(probe.gated, decision))
    if fired:
        early.cancel()
        return await _answer(state, request, payload, requested, who, gates)
    request.state.patches = kept
    decided.set_result(None)
    return await early


async def _lease(state: AppState, who: Resolved) -> Callable[[], None]:
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


async def _probe(
    state: AppState, request: Request, payload: dict[str, Any], who: Resolved, probe: Probe
) -> bool:
    """Whether the probe with every effective patch fires. A probe that fails (a 4xx the
    real request will get too) counts as firing: fail closed."""
    body = {k: v for k, v in payload.items() if k not in PROBE_DROPPED}
    body.update(max_tokens=probe.probe_tokens, temperature=0, n=1, stream=False)
    body["model"] = served_name(who.lora) if who.lora else state.model_name
    release = await _lease(state, who)
    answer = await forward(engine_app(state), request, encode_json(body), on_done=release)
    return answer.status_code != 200 or probe.fires(_first_text(answer.body))


def _retrieve(task: asyncio.Task[Any]) -> None:
    """A dropped ungated answer's error is nobody's: read it so asyncio does not log it."""
    if not task.cancelled():
        task.exception()


def _prefilled(payload: dict[str, Any]) -> bool:
    """A chat request that continues a final assistant message the caller wrote."""
    return (
        bool(payload.get("continue_final_message")) or payload.get("add_generation_prompt") is False
    )


def _first_text(body: bytes) -> str:
    choice = json.loads(body)["choices"][0]
    return choice.get("text") or (choice.get("message") or {}).get("content") or ""


def _once(action: Any) -> Any:
    called = False

    def run() -> None:
        nonlocal called
        if not called:
            called = True
            action()

    return run
