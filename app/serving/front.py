"""SafePatch in front of vLLM's OpenAI server: one request's path.

    caller (deps) -> policy: the effective patch set -> the one LoRA (single or exact stack)
    -> lease -> vLLM's own OpenAI app, with `model` naming that LoRA -> the answer, with the
    client's `model`, `safepatch.applied_patches` and `X-SafePatch-Applied` added

Everything else (validation, chat templates, tools, structured output, logprobs, `n`,
penalties, streaming, errors) is vLLM's own serving layer, unchanged.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
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
    gates: dict[str, str] = {}
    if request.url.path in GATED_ROUTES:
        rules = {p: GateRule.from_meta(state.registry.get(p).meta) for p in who.patches}
        probe = Probe.for_patches(rules, caller.policy.modes, who.patches)
        if probe is not None and _prefilled(payload):
            # the reply is already begun by the caller: a gate reading its first tokens could
            # be steered past, so the gated patches act as always on (fail closed)
            gates = dict.fromkeys(probe.gated, "prefilled")
        elif probe is not None:
            who, gates = await _gate(state, request, payload, who, probe)
    release = await _lease(state, who)
    request.state.tenant, request.state.patches = who.tenant, who.patches
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

    headers = {APPLIED_HEADER: ",".join(who.patches)}
    if gates:
        headers[GATES_HEADER] = ",".join(f"{p}={d}" for p, d in gates.items())
    return await forward(
        app, request, encode_json(payload), rewrite, extra_headers=headers, on_done=_once(done)
    )


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


async def _gate(
    state: AppState, request: Request, payload: dict[str, Any], who: Resolved, probe: Probe
) -> tuple[Resolved, dict[str, str]]:
    """Probe with every effective patch; where it does not refuse, the gated patches are off.
    A probe that fails (a 4xx the real request will get too) keeps them on: fail closed."""
    body = {k: v for k, v in payload.items() if k not in PROBE_DROPPED}
    body.update(max_tokens=probe.probe_tokens, temperature=0, n=1, stream=False)
    body["model"] = served_name(who.lora) if who.lora else state.model_name
    release = await _lease(state, who)
    answer = await forward(engine_app(state), request, encode_json(body), on_done=release)
    fired = answer.status_code != 200 or probe.fires(_first_text(answer.body))
    decision = "fired" if fired else "passed"
    for patch in probe.gated:
        state.metrics.gate_decisions.labels(patch, decision).inc()
    gates = {patch: decision for patch in probe.gated}
    if fired:
        return who, gates
    kept = [p for p in who.patches if p not in probe.gated]
    return Resolved(who.tenant, kept, await state.registry.lora_for(kept)), gates


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
