"""Request dependencies as `Annotated` aliases: the app state, the caller, the admin."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from app.errors import Forbidden, Unauthorized
from app.state import AppState
from app.tenants.access import Principal
from app.tenants.policy import TenantPolicy

DEV_TENANT = "dev"


def get_state(request: Request) -> AppState:
    return request.app.state.safepatch


State = Annotated[AppState, Depends(get_state)]


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Authorization header must be 'Bearer <key>'")
    return token.strip()


def get_principal(request: Request, state: State) -> Principal:
    token = bearer(request)
    if token is None:
        if not state.settings.dev_mode:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        principal = Principal(
            DEV_TENANT,
            TenantPolicy(
                default=[n for n in state.settings.default_patches if state.registry.find(n)],
                optional=[
                    p.name
                    for p in state.registry.list()
                    if p.name not in state.settings.default_patches
                ],
                allow_base=True,
            ),
        )
    else:
        tenant = state.tenants.authenticate(token)
        principal = Principal(tenant.id, tenant.policy)
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
Admin = Annotated[str, Depends(require_admin)]
