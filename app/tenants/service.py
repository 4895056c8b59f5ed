"""Tenants, their hashed API keys and policies, and the audit log, in the service database."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from app import db
from app.exceptions import (
    AlreadyExists,
    InvalidApiKey,
    InvalidRequest,
    KeyNotFound,
    TenantNotFound,
)
from app.tenants.policy import TenantPolicy

if TYPE_CHECKING:
    from app.snapshot import Catalog

TENANT_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
KEY_PREFIX = "sp-"
# Names the service itself uses as the tenant label (metrics, logs).
RESERVED_IDS = frozenset({"admin", "anonymous", "dev", "other", "none"})


@dataclass(frozen=True)
class Tenant:
    id: str
    name: str
    policy: TenantPolicy

    @classmethod
    def from_row(cls, row: Any) -> Tenant:
        return cls(row.id, row.name, TenantPolicy.model_validate_json(row.policy))

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "policy": self.policy.model_dump()}


def hash_key(secret: str) -> str:
    """Keys are 256-bit random tokens, so one SHA-256 is a safe, constant-cost digest."""
    return hashlib.sha256(secret.encode()).hexdigest()


class TenantService:
    """Reads (authenticate, get, list) come from the replica's snapshot, in memory; writes go
    to the database, then reload the snapshot. Writes block on the database: call them from
    a thread (`asyncio.to_thread`), never on the event loop."""

    def __init__(self, database: Engine, catalog: Catalog) -> None:
        self.db = database
        self.catalog = catalog

    # --- authentication (request path: memory only) -----------------------------------
    def authenticate(self, secret: str) -> Tenant:
        # the lookup is by digest: the dict compares hashes, never the secret itself
        snapshot = self.catalog.snapshot
        tenant_id = snapshot.keys.get(hash_key(secret))
        tenant = snapshot.tenants.get(tenant_id) if tenant_id else None
        if tenant is None:
            raise InvalidApiKey("invalid or revoked API key")
        return tenant

    # --- tenants ---------------------------------------------------------------------
    def list(self) -> list[Tenant]:
        return list(self.catalog.snapshot.tenants.values())

    def get(self, tenant_id: str) -> Tenant:
        tenant = self.catalog.snapshot.tenants.get(tenant_id)
        if tenant is None:
            raise TenantNotFound(f"tenant '{tenant_id}' does not exist", param="id")
        return tenant

    def create(self, tenant_id: str, name: str, policy: TenantPolicy, actor: str) -> Tenant:
        if tenant_id in RESERVED_IDS:
            raise InvalidRequest(
                f"tenant id '{tenant_id}' is reserved", param="id", code="invalid_tenant_id"
            )
        if not TENANT_ID.fullmatch(tenant_id):
            raise InvalidRequest(
                "tenant id must match [a-z0-9][a-z0-9_-]{0,62}",
                param="id",
                code="invalid_tenant_id",
            )
        now = db.utcnow()
        taken = AlreadyExists(f"tenant '{tenant_id}' already exists", param="id")
        try:
            with self.catalog.writing() as conn:
                if conn.execute(
                    sa.select(db.tenants.c.id).where(db.tenants.c.id == tenant_id)
                ).first():
                    raise taken
                conn.execute(
                    db.tenants.insert().values(
                        id=tenant_id,
                        name=name,
                        policy=policy.model_dump_json(),
                        created_at=now,
                        updated_at=now,
                    )
                )
                self.catalog.audit(
                    conn, actor, "tenant.create", tenant_id, name=name, policy=policy.model_dump()
                )
        except sa.exc.IntegrityError:  # another replica created it between check and insert
            raise taken from None
        return self.get(tenant_id)

    def update(
        self,
        tenant_id: str,
        actor: str,
        *,
        name: str | None = None,
        policy: TenantPolicy | None = None,
    ) -> Tenant:
        values: dict[str, Any] = {"updated_at": db.utcnow()}
        if name is not None:
            values["name"] = name
        if policy is not None:
            values["policy"] = policy.model_dump_json()
        with self.catalog.writing() as conn:
            # `before` from the database, in the transaction: the snapshot may lag a write
            # made on another replica
            row = conn.execute(sa.select(db.tenants).where(db.tenants.c.id == tenant_id)).first()
            if row is None:
                raise TenantNotFound(f"tenant '{tenant_id}' does not exist", param="id")
            before = Tenant.from_row(row)
            conn.execute(db.tenants.update().where(db.tenants.c.id == tenant_id).values(values))
            if policy is not None:
                self.catalog.audit(
                    conn,
                    actor,
                    "tenant.policy",
                    tenant_id,
                    before=before.policy.model_dump(),
                    after=policy.model_dump(),
                )
            if name is not None:
                self.catalog.audit(
                    conn, actor, "tenant.rename", tenant_id, before=before.name, after=name
                )
        return self.get(tenant_id)

    def delete(self, tenant_id: str, actor: str) -> None:
        with self.catalog.writing() as conn:
            conn.execute(db.api_keys.delete().where(db.api_keys.c.tenant_id == tenant_id))
            gone = conn.execute(db.tenants.delete().where(db.tenants.c.id == tenant_id))
            if gone.rowcount == 0:
                raise TenantNotFound(f"tenant '{tenant_id}' does not exist", param="id")
            self.catalog.audit(conn, actor, "tenant.delete", tenant_id)

    # --- keys ------------------------------------------------------------------------
    def create_key(self, tenant_id: str, actor: str) -> dict[str, str]:
        """A new key; the secret is returned here once and stored only as its hash."""
        self.get(tenant_id)
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = "key_" + secrets.token_hex(8)
        now = db.utcnow()
        try:
            with self.catalog.writing() as conn:
                conn.execute(
                    db.api_keys.insert().values(
                        id=key_id,
                        tenant_id=tenant_id,
                        key_hash=hash_key(secret),
                        prefix=secret[:8],
                        created_at=now,
                    )
                )
                self.catalog.audit(conn, actor, "key.create", tenant_id, key_id=key_id)
        except sa.exc.IntegrityError:  # the tenant was deleted on another replica meanwhile
            raise TenantNotFound(f"tenant '{tenant_id}' does not exist", param="id") from None
        return {"id": key_id, "tenant_id": tenant_id, "key": secret, "created_at": now}

    def list_keys(self, tenant_id: str) -> list[dict[str, str | None]]:
        """Admin read, from the database (key metadata is not in the snapshot)."""
        self.get(tenant_id)
        with db.reachable(), self.db.connect() as conn:
            rows = conn.execute(
                sa.select(db.api_keys)
                .where(db.api_keys.c.tenant_id == tenant_id)
                .order_by(db.api_keys.c.created_at)
            ).all()
        return [
            {"id": r.id, "prefix": r.prefix, "created_at": r.created_at, "revoked_at": r.revoked_at}
            for r in rows
        ]

    def revoke_key(self, tenant_id: str, key_id: str, actor: str) -> None:
        with self.catalog.writing() as conn:
            done = conn.execute(
                db.api_keys.update()
                .where(
                    db.api_keys.c.id == key_id,
                    db.api_keys.c.tenant_id == tenant_id,
                    db.api_keys.c.revoked_at.is_(None),
                )
                .values(revoked_at=db.utcnow())
            )
            if done.rowcount == 0:
                raise KeyNotFound(
                    f"no active key '{key_id}' for tenant '{tenant_id}'", param="key_id"
                )
            self.catalog.audit(conn, actor, "key.revoke", tenant_id, key_id=key_id)

    # --- audit -----------------------------------------------------------------------
    def audit_log(self, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        with db.reachable(), self.db.connect() as conn:
            rows = conn.execute(
                sa.select(db.audit_log)
                .order_by(db.audit_log.c.id.desc())
                .limit(limit)
                .offset(offset)
            ).all()
        return [
            {
                "id": r.id,
                "at": r.at,
                "actor": r.actor,
                "action": r.action,
                "target": r.target,
                "detail": json.loads(r.detail),
                "replica": r.replica,
            }
            for r in rows
        ]
