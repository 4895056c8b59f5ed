"""SafePatch in front of vLLM's OpenAI server: one request's path.

    caller (deps) -> policy: the effective patch set -> the one LoRA (single or exact stack)
    -> lease -> vLLM's own OpenAI app, with `model` naming that LoRA -> the answer, with the
    client's `model`, `safepatch.applied_patches` and `X-SafePatch-Applied` added

Everything else (validation, chat templates, tools, structured output, logprobs, `n`,
penalties, streaming, errors) is vLLM's own serving layer, unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from app.errors import BadRequest
from app.patches.gate import GateRule, Probe
from app.serving.answer import answer, engine_app
from app.serving.gating import gated_answer, prefilled
from app.serving.proxy import forward
from app.state import AppState
from app.tenants.access import (
    PATCHES_FIELD,
    PATCHES_HEADER,
    Principal,
    Resolved,
    body_toggles,
    resolve,
)

# Routes where gated patches probe first (the others generate nothing, or not as a reply).
GATED_ROUTES = {"/v1/chat/completions", "/v1/completions"}
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


@dataclass(frozen=True)
class Call:
    """One request to a vLLM route, resolved once (the routes' `ServedCall` dependency): the
    body, the model the client named, who is served with which patches, and the probe of its
    gated patches (None: nothing to probe)."""

    body: bytes
    payload: dict[str, Any] | None  # None: not a JSON object (vLLM answers with its 400)
    requested: str = ""
    who: Resolved | None = None
    probe: Probe | None = None


async def resolve_call(state: AppState, caller: Principal, request: Request) -> Call:
    """Read the request and resolve the caller's patches: tenant policy -> patch set -> the
    one LoRA, and the probe where gated patches apply."""
    engine_app(state)  # while the engine is not ready, a 503 before anything else
    body = await request.body()
    payload = _json_object(body)
    if payload is None:
        return Call(body, None)
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
    probe = None
    if request.url.path in GATED_ROUTES:
        rules = {p: GateRule.from_meta(who.records[p].meta) for p in who.patches}
        probe = Probe.for_patches(rules, caller.policy.modes, who.patches)
    return Call(body, payload, requested, who, probe)


async def serve(state: AppState, request: Request, call: Call) -> Response:
    """Answer one resolved request to a vLLM route."""
    payload, who, probe = call.payload, call.who, call.probe
    if payload is None or who is None:  # nothing is generated: vLLM's own answer
        return await forward(engine_app(state), request, call.body)
    request.state.tenant, request.state.patches = who.tenant, who.patches  # the access log
    if probe is None:
        return await answer(state, request, payload, call.requested, who, {})
    if prefilled(payload):
        # the reply is already begun by the caller: a gate reading its first tokens could be
        # steered past, so the gated patches act as always on (fail closed)
        kept_on = dict.fromkeys(probe.gated, "prefilled")
        return await answer(state, request, payload, call.requested, who, kept_on)
    return await gated_answer(state, request, payload, call.requested, who, probe)
