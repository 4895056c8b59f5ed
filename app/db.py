"""The service database (SQLite file by default; any SQLAlchemy URL, e.g. PostgreSQL).

The schema is migrated by Alembic (app/migrations): `open_database` upgrades to head at
start-up, under a lock so that replicas starting together migrate one at a time (PostgreSQL:
an advisory lock held by the migrating transaction; SQLite: a file lock beside the database).
A database made by the hand-written migration list that came before Alembic (a
`schema_version` table at version 1) is adopted: stamped as revision 0001, then upgraded.

Every write bumps the one row of `changes` in its own transaction; replicas poll that
version and reload their in-memory snapshot (app.snapshot) when it moves.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection, Engine

from app.exceptions import DatabaseUnavailable

metadata = sa.MetaData()

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
    sa.Column("replica", sa.String(128), nullable=True),  # who wrote it; NULL before 0002
)

# One row (id 1): the version of everything above, bumped by every write.
changes = sa.Table(
    "changes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False),
)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
LEGACY_REVISION = "0001"  # the schema the hand-written list called version 1
# pg_advisory_xact_lock key: any constant shared by all replicas ("SafePatch" in ASCII).
MIGRATION_LOCK_KEY = 0x5361666550617463


def default_replica_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat()


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def create_engine(url: str) -> Engine:
    """An engine that survives the database going away: connections are pinged before use
    (a restarted PostgreSQL leaves dead ones in the pool) and connecting gives up quickly."""
    connect_args: dict[str, Any] = {}
    if url.startswith("postgresql"):
        connect_args["connect_timeout"] = 2
    elif url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args)


def alembic_config(conn: Connection) -> Config:
    config = Config()  # no alembic.ini: everything it would say is here
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = conn
    return config


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[Connection]:
    """A transaction that holds the cluster-wide migration lock until it ends."""
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK_KEY)))
            yield conn
        return
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        with engine.begin() as conn:
            yield conn
        return
    with open(f"{database}.migrate-lock", "a+") as lock_file:  # noqa: SIM117
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # released when the file closes
        with engine.begin() as conn:
            yield conn


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Create or migrate the schema to `revision` (one replica at a time)."""
    with _migration_lock(engine) as conn:
        tables = set(sa.inspect(conn).get_table_names())
        if "schema_version" in tables and "alembic_version" not in tables:
            legacy = conn.execute(sa.text("SELECT version FROM schema_version")).scalar()
            if legacy != 1:
                raise RuntimeError(f"unknown pre-Alembic schema version {legacy}")
            command.stamp(alembic_config(conn), LEGACY_REVISION)
        command.upgrade(alembic_config(conn), revision)


def open_database(url: str) -> Engine:
    """Connect, then create or upgrade the schema to head."""
    engine = create_engine(url)
    upgrade(engine)
    return engine


# --- writes ----------------------------------------------------------------------------------
def bump_version(conn: Connection) -> None:
    """Mark a change (inside the writing transaction): replicas reload when this moves."""
    conn.execute(changes.update().where(changes.c.id == 1).values(version=changes.c.version + 1))


def read_version(conn: Connection) -> int:
    return int(conn.execute(sa.select(changes.c.version).where(changes.c.id == 1)).scalar_one())


def audit(
    conn: Connection, actor: str, action: str, target: str, *, replica: str, **detail: Any
) -> None:
    """Record a change (and bump the version: every audited write is a change)."""
    conn.execute(
        audit_log.insert().values(
            at=utcnow(),
            actor=actor,
            action=action,
            target=target,
            detail=dumps(detail),
            replica=replica,
        )
    )
    bump_version(conn)


# Errors that mean "cannot reach the database" (not "the statement was wrong").
CONNECTION_ERRORS = (sa.exc.OperationalError, sa.exc.InterfaceError)


@contextlib.contextmanager
def reachable() -> Iterator[None]:
    """Turn a lost database into the API's 503 `database_unavailable`."""
    try:
        yield
    except CONNECTION_ERRORS as exc:
        raise DatabaseUnavailable(
            "the database is unavailable; changes cannot be made right now, try again later"
        ) from exc
