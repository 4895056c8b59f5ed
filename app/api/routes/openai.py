"""OpenAI-compatible routes: `/v1/models` filtered per tenant; the other OpenAI routes are
vLLM's own, reached through SafePatch's front (`app.serving.front`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response

from app.api.deps import Caller, ServedCall, State
from app.errors import Unavailable
from app.serving import front
from app.serving.input_checks import check_input
from app.serving.proxy import forward

router = APIRouter(tags=["openai"])


@router.get("/v1/models")
async def list_models(state: State, caller: Caller) -> dict[str, Any]:
    """vLLM's base-model card, then one card per patch the caller may use (`parent` = base)."""
    if not state.engine.is_ready:
        raise Unavailable("the engine is not ready; retry shortly")
    base_cards = await state.engine.base_model_cards()
    cards = [c for c in base_cards if caller.policy.allow_base]
    allowed = caller.policy.allowed()
    template = base_cards[0]
    cards += [
        {**template, "id": p.name, "root": p.name, "parent": state.model_name}
        for p in state.registry.list()
        if p.name in allowed
    ]
    return {"object": "list", "data": cards}


async def _served(request: Request, state: State, call: ServedCall) -> Response:
    check_input(request.url.path, await request.body())  # what vLLM would crash on: a 400
    return await front.serve(state, request, call)


for _path in sorted(front.POLICY_ROUTES):
    router.add_api_route(
        _path,
        _served,
        methods=["POST"],
        summary=f"vLLM's {_path}, with the caller's safety patches",
        response_model=None,
    )


@router.get("/ping", include_in_schema=False)
@router.get("/version", include_in_schema=False)
async def public_vllm_routes(request: Request, state: State) -> Response:
    return await forward(front.engine_app(state), request, await request.body())


def engine_openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """`app.openapi`: SafePatch's schema, with vLLM's own request and response schemas for the
    routes it serves once the engine is up (so clients and fuzzers see the real bodies)."""

    def openapi() -> dict[str, Any]:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        state = getattr(app.state, "safepatch", None)
        inner = state.engine.asgi if state is not None else None
        if inner is None or not hasattr(inner, "openapi"):
            return schema
        theirs = inner.openapi()
        for path in front.POLICY_ROUTES & set(theirs.get("paths", {})):
            schema["paths"][path] = theirs["paths"][path]
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(theirs.get("components", {}).get("schemas", {}))
        return schema

    return openapi
