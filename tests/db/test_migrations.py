"""Alembic migrations on SQLite and PostgreSQL: a database from the pre-Alembic schema upgrades
in place with its data, a fresh one matches the models, and replicas starting together
migrate once."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from app import db
from app.patches.registry import PatchRegistry
from app.snapshot import Catalog
from app.tenants.service import TenantService, hash_key
from tests.db import legacy_schema_v1 as legacy
from tests.support.fake_engine import FakeEngine

HEAD = ScriptDirectory(str(db.MIGRATIONS_DIR)).get_current_head()
SECRET = "sp-legacy-key-0123456789abcdefghijklmnopqrstuvwxyz"


def rows(engine: sa.Engine, table: sa.Table, columns: list[str]) -> list[tuple]:
    with engine.connect() as conn:
        selected = sa.select(*(table.c[c] for c in columns)).order_by(*table.primary_key)
        return [tuple(r) for r in conn.execute(selected)]


def fill_legacy(url: str) -> dict[str, list[tuple]]:
    """A database made by the old code, with a patch, a tenant, a key and audit rows."""
    engine = legacy.open_database(url)
    now = legacy.utcnow()
    with engine.begin() as conn:
        conn.execute(
            legacy.patches.insert().values(
                name="alpha",
                path="/store/alpha",
                sha256="ab" * 32,
                rank=4,
                target_modules=legacy.dumps(["q_proj", "v_proj"]),
                meta=legacy.dumps({"name": "alpha", "serve_folded": False}),
                source="scan",
                status="active",
                pinned=True,
                orthogonality=legacy.dumps({"orthogonality": 0.9}),
                evaluation=None,
                created_at=now,
                updated_at=now,
            )
        )
        conn.execute(
            legacy.tenants.insert().values(
                id="acme",
                name="Acme",
                policy=legacy.dumps({"mandatory": ["alpha"], "allow_base": False}),
                created_at=now,
                updated_at=now,
            )
        )
        conn.execute(
            legacy.api_keys.insert().values(
                id="key_1",
                tenant_id="acme",
                key_hash=hash_key(SECRET),
                prefix=SECRET[:8],
                created_at=now,
            )
        )
        legacy.audit(conn, "admin", "tenant.create", "acme", name="Acme")
        legacy.audit(conn, "admin", "key.create", "acme", key_id="key_1")
    tables = {t.name: [c.name for c in t.columns] for t in legacy.metadata.sorted_tables}
    before = {
        name: rows(engine, legacy.metadata.tables[name], cols)
        for name, cols in tables.items()
        if name != "schema_version"
    }
    engine.dispose()
    return before


def test_a_pre_alembic_database_upgrades_in_place(database_url: str, tmp_path: Path) -> None:
    before = fill_legacy(database_url)
    engine = db.open_database(database_url)
    try:
        for name, old_rows in before.items():
            columns = [c.name for c in legacy.metadata.tables[name].columns]
            assert rows(engine, db.metadata.tables[name], columns) == old_rows, name
        with engine.connect() as conn:
            tables = set(sa.inspect(conn).get_table_names())
            assert "schema_version" not in tables
            assert MigrationContext.configure(conn).get_current_revision() == HEAD
            assert db.read_version(conn) == 1
            replicas = conn.execute(sa.select(db.audit_log.c.replica)).scalars().all()
        assert replicas == [None, None]  # written before replicas were recorded
        # the data serves: the old key authenticates, the patch resolves
        tenants = TenantService(engine, Catalog(engine))
        tenant = tenants.authenticate(SECRET)
        assert (tenant.id, tenant.policy.mandatory) == ("acme", ["alpha"])
        registry = PatchRegistry(
            engine,
            engine=FakeEngine(),
            store_dir=tmp_path / "store",
            cache_dir=tmp_path / "cache",
            model_dir=tmp_path / "model",
            max_rank=32,
            max_bytes=1 << 20,
            catalog=tenants.catalog,
        )
        alpha = registry.get("alpha")
        assert (alpha.pinned, alpha.target_modules) == (True, ["q_proj", "v_proj"])
        # a new write after the upgrade is audited with its replica and bumps the version
        tenants.create_key("acme", "admin")
        with engine.connect() as conn:
            assert db.read_version(conn) == 2
            last = conn.execute(
                sa.select(db.audit_log.c.replica).order_by(db.audit_log.c.id.desc())
            ).scalar()
        assert last == tenants.catalog.replica_id
    finally:
        engine.dispose()
    # opening it again changes nothing
    again = db.open_database(database_url)
    try:
        assert rows(again, db.tenants, ["id", "name"]) == [("acme", "Acme")]
    finally:
        again.dispose()


def test_a_fresh_database_matches_the_models(database_url: str) -> None:
    """The migrations build exactly the tables app.db declares (autogenerate finds nothing)."""
    engine = db.open_database(database_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), db.metadata)
            assert MigrationContext.configure(conn).get_current_revision() == HEAD
            assert db.read_version(conn) == 1
    finally:
        engine.dispose()
    assert diff == []


def test_replicas_starting_together_migrate_once(database_url: str) -> None:
    """Four replicas open one empty database at the same instant; the lock makes exactly one
    of them create the schema (without it, PostgreSQL fails the others' CREATE TABLE)."""
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []
    engines: list[sa.Engine] = []

    def start() -> None:
        engine = db.create_engine(database_url)
        engines.append(engine)
        barrier.wait()
        try:
            db.upgrade(engine)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert not any(t.is_alive() for t in threads), "a replica hung migrating"
        assert errors == []
        with engines[0].connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(db.changes)).scalar() == 1
            assert MigrationContext.configure(conn).get_current_revision() == HEAD
    finally:
        for engine in engines:
            engine.dispose()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_unknown_pre_alembic_version_is_refused(database_url: str) -> None:
    engine = legacy.open_database(database_url)
    with engine.begin() as conn:
        conn.execute(legacy.schema_version.update().values(version=7))
    try:
        with pytest.raises(RuntimeError, match="pre-Alembic schema version 7"):
            db.upgrade(engine)
    finally:
        engine.dispose()
