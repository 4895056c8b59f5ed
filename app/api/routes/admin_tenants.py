"""Admin API for tenants, their keys and policies, and the audit log.

Reads of tenants come from the replica's snapshot; writes, key listings and the audit log
touch the database, in a worker thread (`asyncio.to_thread`), never on the event loop. With
the database down they answer 503 `database_unavailable`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, Field

from app.api.deps import Admin, State
from app.errors import BadRequest
from app.tenants.policy import TenantPolicy

router = APIRouter(prefix="/admin", tags=["admin"])


class TenantCreate(BaseModel):
    id: str
    name: str = ""
    policy: TenantPolicy = Field(default_factory=TenantPolicy)


class TenantUpdate(BaseModel):
    name: str | None = None
    policy: TenantPolicy | None = None


def _check_policy(state: State, policy: TenantPolicy) -> TenantPolicy:
    unknown = sorted(n for n in policy.allowed() if state.registry.find(n) is None)
    if unknown:
        raise BadRequest(
            f"policy names unregistered patches: {', '.join(unknown)}",
            param="policy",
            code="patch_not_found",
        )
    return policy


@router.get("/tenants")
async def list_tenants(state: State, _: Admin) -> dict[str, Any]:
    return {"object": "list", "data": [t.public() for t in state.tenants.list()]}


@router.post("/tenants", status_code=201)
async def create_tenant(body: TenantCreate, state: State, actor: Admin) -> dict[str, Any]:
    policy = _check_policy(state, body.policy)
    tenant = await asyncio.to_thread(
        state.tenants.create, body.id, body.name or body.id, policy, actor
    )
    return tenant.public()


@router.get("/tenants/{tenant_id}")
async def get_tenant(tenant_id: str, state: State, _: Admin) -> dict[str, Any]:
    keys = await asyncio.to_thread(state.tenants.list_keys, tenant_id)
    return {**state.tenants.get(tenant_id).public(), "keys": keys}


@router.patch("/tenants/{tenant_id}")
async def update_tenant(
    tenant_id: str, body: TenantUpdate, state: State, actor: Admin
) -> dict[str, Any]:
    policy = _check_policy(state, body.policy) if body.policy else None
    tenant = await asyncio.to_thread(
        state.tenants.update, tenant_id, actor, name=body.name, policy=policy
    )
    return tenant.public()


@router.delete("/tenants/{tenant_id}", status_code=204)
async def delete_tenant(tenant_id: str, state: State, actor: Admin) -> Response:
    await asyncio.to_thread(state.tenants.delete, tenant_id, actor)
    return Response(status_code=204)


@router.put("/tenants/{tenant_id}/policy")
async def put_policy(
    tenant_id: str, body: TenantPolicy, state: State, actor: Admin
) -> dict[str, Any]:
    policy = _check_policy(state, body)
    tenant = await asyncio.to_thread(state.tenants.update, tenant_id, actor, policy=policy)
    return tenant.public()


@router.post("/tenants/{tenant_id}/keys", status_code=201)
async def create_key(tenant_id: str, state: State, actor: Admin) -> dict[str, str]:
    return await asyncio.to_thread(state.tenants.create_key, tenant_id, actor)


@router.get("/tenants/{tenant_id}/keys")
async def list_keys(tenant_id: str, state: State, _: Admin) -> dict[str, Any]:
    return {"object": "list", "data": await asyncio.to_thread(state.tenants.list_keys, tenant_id)}


@router.delete("/tenants/{tenant_id}/keys/{key_id}", status_code=204)
async def revoke_key(tenant_id: str, key_id: str, state: State, actor: Admin) -> Response:
    await asyncio.to_thread(state.tenants.revoke_key, tenant_id, key_id, actor)
    return Response(status_code=204)


@router.get("/audit")
async def audit(
    state: State,
    _: Admin,
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=2**31),
) -> dict[str, Any]:
    return {
        "object": "list",
        "data": await asyncio.to_thread(state.tenants.audit_log, limit, offset),
    }
