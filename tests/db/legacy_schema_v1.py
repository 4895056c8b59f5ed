"""FROZEN COPY of app/db.py as it was before Alembic (main at 1b39a24): the hand-written
migration list that built every existing database. The migration tests build a database with
it and check that today's app.db upgrades it in place. Never edit: it is a fixture."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

metadata = sa.MetaData()

schema_version = sa.Table(
    "schema_version", metadata, sa.Column("version", sa.Integer, nullable=False)
)

patches = sa.Table(
    "patches",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("rank", sa.Integer, nullable=False),
    sa.Column("target_modules", sa.Text, nullable=False),  # JSON list
    sa.Column("meta", sa.Text, nullable=False),  # JSON: PatchMetadata
    sa.Column("source", sa.String(16), nullable=False),  # scan | path | upload
    sa.Column("status", sa.String(16), nullable=False),  # active | deleted
    sa.Column("pinned", sa.Boolean, nullable=False, default=False),
    sa.Column("orthogonality", sa.Text, nullable=True),  # JSON summary + detail
    sa.Column("evaluation", sa.Text, nullable=True),  # JSON: latest eval report
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.Column("updated_at", sa.String(40), nullable=False),
)

tenants = sa.Table(
    "tenants",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("policy", sa.Text, nullable=False),  # JSON: TenantPolicy
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.Column("updated_at", sa.String(40), nullable=False),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("tenant_id", sa.String(64), sa.ForeignKey("tenants.id"), nullable=False),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("prefix", sa.String(16), nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.Column("revoked_at", sa.String(40), nullable=True),
)

audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.String(40), nullable=False),
    sa.Column("actor", sa.String(64), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("target", sa.String(128), nullable=False),
    sa.Column("detail", sa.Text, nullable=False),  # JSON
)


def _v0_to_v1(conn: Connection) -> None:
    metadata.create_all(conn, tables=[patches, tenants, api_keys, audit_log])


MIGRATIONS: list[Callable[[Connection], None]] = [_v0_to_v1]
SCHEMA_VERSION = len(MIGRATIONS)


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat()


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def open_database(url: str) -> Engine:
    """Connect, then create or upgrade the schema to `SCHEMA_VERSION`."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, future=True)
    with engine.begin() as conn:
        schema_version.create(conn, checkfirst=True)
        row = conn.execute(sa.select(schema_version.c.version)).first()
        current = row[0] if row else 0
        if current > SCHEMA_VERSION:
            raise RuntimeError(
                f"database schema v{current} is newer than this code (v{SCHEMA_VERSION})"
            )
        for step in MIGRATIONS[current:]:
            step(conn)
        if row is None:
            conn.execute(schema_version.insert().values(version=SCHEMA_VERSION))
        elif current != SCHEMA_VERSION:
            conn.execute(schema_version.update().values(version=SCHEMA_VERSION))
    return engine


def audit(conn: Connection, actor: str, action: str, target: str, **detail: Any) -> None:
    conn.execute(
        audit_log.insert().values(
            at=utcnow(), actor=actor, action=action, target=target, detail=dumps(detail)
        )
    )
