"""Fixtures for the HTTP-layer tests: the real app (registry, tenants, SQLite) over FakeEngine.
The helpers these tests share live in tests.support.api_client (imported here for older
imports from this module).

Modules that use `NO_SCORING` build apps whose background orthogonality scoring is a recorder
(tests.support.apps.RecordingScorer).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from tests.conftest import DATABASE_KINDS, make_settings, make_store, settings_on_postgres
from tests.support.api_client import (  # noqa: F401 - re-exported
    BASE,
    ERROR_FIELDS,
    adapter_names,
    add_tenant,
    applied,
    assert_error,
    bearer,
    chat,
    model_ids,
    patch_rows,
    served_lora,
    store_listing,
)
from tests.support.apps import recording_scores, running_app
from tests.support.fake_engine import FakeEngine


@pytest.fixture(scope="module")
def scoring_calls(api_database: str) -> Iterator[list[str]]:
    """Names the app asked to score; no scoring thread runs. (It depends on `api_database` so
    that the module-scoped apps built on it are built again for each database.)"""
    with recording_scores([]) as calls:
        yield calls


NO_SCORING = pytest.mark.usefixtures("scoring_calls")

# The database-facing API modules: each runs once on SQLite and once on PostgreSQL.
DATABASE_MODULES = (
    "test_tenants",
    "test_tenant_policy",
    "test_admin_adapters",
    "test_adapter_refusals",
)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.module.__name__.rsplit(".", 1)[-1] in DATABASE_MODULES:
        metafunc.parametrize("api_database", DATABASE_KINDS, indirect=True, scope="module")


@pytest.fixture(scope="module", autouse=True)
def api_database(request: pytest.FixtureRequest) -> Iterator[str]:
    """Which database `make_settings` gives this module's apps (SQLite unless parametrised)."""
    kind = getattr(request, "param", "sqlite")
    if kind == "sqlite":
        yield kind
        return
    with settings_on_postgres(request.getfixturevalue("postgres_server")):
        yield kind


@pytest.fixture
def api(scoring_calls: list[str], settings: Settings) -> Iterator[tuple[TestClient, FakeEngine]]:
    with running_app(settings) as pair:
        yield pair


TENANT_PATCHES = ("alpha", "beta", "gamma")


@pytest.fixture(scope="module")
def shared(
    scoring_calls: list[str],
    tiny_model: Path,
    patch_library: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[TestClient, FakeEngine]]:
    """One app for the tests that only add tenants (each its own, under a fresh id) and never
    change the registry."""
    root = tmp_path_factory.mktemp("tenants")
    make_store(patch_library, root / "adapters", names=TENANT_PATCHES)
    with running_app(make_settings(tiny_model, root)) as pair:
        yield pair
