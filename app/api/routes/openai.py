"""OpenAI-compatible routes: thin; the serving class does the work."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.api.deps import Caller, State
from app.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, now
from app.serving.completions import Resolved
from app.tenants.access import PATCHES_HEADER, resolve

router = APIRouter(prefix="/v1", tags=["openai"])


async def _resolve(
    state: State, caller: Caller, request: Request, body: ChatCompletionRequest | CompletionRequest
) -> Resolved:
    resolved = await resolve(
        caller,
        body.model,
        body.safety_patches,
        request.headers.get(PATCHES_HEADER),
        state.model_name,
        state.registry,
    )
    request.state.patches = resolved.patches
    return resolved


@router.get("/models")
async def list_models(state: State, caller: Caller) -> ModelList:
    created = now()
    cards = []
    if caller.policy.allow_base:
        cards.append(ModelCard(id=state.model_name, created=created, root=state.model_name))
    allowed = caller.policy.allowed()
    cards += [
        ModelCard(id=p.name, created=created, root=p.name, parent=state.model_name)
        for p in state.registry.list()
        if p.name in allowed
    ]
    return ModelList(data=cards)


@router.post("/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest, request: Request, state: State, caller: Caller
):
    resolved = await _resolve(state, caller, request, body)
    return await state.serving.chat(body, resolved, request)


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request, state: State, caller: Caller):
    resolved = await _resolve(state, caller, request, body)
    return await state.serving.complete(body, resolved, request)
