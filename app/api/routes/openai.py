"""OpenAI-compatible routes: `/v1/models` filtered per tenant; the other OpenAI routes are
vLLM's own, reached through SafePatch's front (`app.serving.front`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.api.deps import Caller, State
from app.errors import Unavailable
from app.serving import front
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


async def _served(request: Request, state: State, caller: Caller) -> Response:
    return await front.serve(state, caller, request)


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
