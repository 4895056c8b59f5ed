"""Request dependencies as `Annotated` aliases: the app state, the caller, the resolved
request to a vLLM route (on top of the caller), the admin."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from app.errors import Forbidden, Unauthorized
from app.serving.front import Call, resolve_call
from app.state import AppState
from app.tenants.access import Principal
from app.tenants.policy import TenantPolicy

DEV_TENANT = "dev"


def get_state(request: Request) -> AppState:
    return request.app.state.safepatch


State = Annotated[AppState, Depends(get_state)]


def bearer(request: Request, strict: bool = True) -> str | None:
    """The bearer token; a malformed header is a 401 when `strict`, else ignored."""
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        if not strict:
            return None
        raise Unauthorized("Authorization header must be 'Bearer <key>'")
    return token.strip()


def _dev_principal(state: AppState) -> Principal:
    """The dev tenant: the default patches on, gated (the base model's own answer unless the
    patch refuses), every other patch optional, the base model allowed."""
    default = [n for n in state.settings.default_patches if state.registry.find(n)]
    return Principal(
        DEV_TENANT,
        TenantPolicy(
            default=default,
            modes=dict.fromkeys(default, "gated"),
            optional=[
                p.name
                for p in state.registry.list()
                if p.name not in state.settings.default_patches
            ],
            allow_base=True,
        ),
    )


def get_principal(request: Request, state: State) -> Principal:
    """A tenant's key serves that tenant. In dev mode any other token, or none, is the dev
    tenant (as `vllm serve` without `--api-key` takes any key); elsewhere it is a 401."""
    token = bearer(request, strict=not state.settings.dev_mode)
    if token is None:
        if not state.settings.dev_mode:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        principal = _dev_principal(state)
    else:
        try:
            tenant = state.tenants.authenticate(token)
            principal = Principal(tenant.id, tenant.policy)
        except Unauthorized:
            if not state.settings.dev_mode:
                raise
            principal = _dev_principal(state)
    request.state.tenant = principal.tenant_id
    return principal


def require_admin(request: Request, state: State) -> str:
    token = bearer(request)
    if token is None:
        raise Unauthorized("missing admin token: send 'Authorization: Bearer <admin token>'")
    if hmac.compare_digest(token.encode(), state.admin_token.encode()):
        request.state.tenant = "admin"
        return "admin"
    try:
        state.tenants.authenticate(token)
    except Unauthorized:
        raise Unauthorized("invalid admin token") from None
    raise Forbidden("tenant keys cannot use the admin API", code="admin_only")


Caller = Annotated[Principal, Depends(get_principal)]


async def get_call(request: Request, state: State, caller: Caller) -> Call:
    """The request to a vLLM route, resolved for the caller: patches, LoRA, probe."""
    return await resolve_call(state, caller, request)


ServedCall = Annotated[Call, Depends(get_call)]
Admin = Annotated[str, Depends(require_admin)]
