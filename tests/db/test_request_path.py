"""No database I/O on the event loop, and none at all on the request path: every SQL statement
the app runs is recorded with where it ran, over /v1 traffic and the admin API (SQLite and
PostgreSQL)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from tests.conftest import ADMIN, make_settings, make_store
from tests.support.api_client import adapter_files, add_tenant, chat, upload
from tests.support.apps import recording_scores, running_app
from tests.support.fake_engine import FakeEngine


@pytest.fixture(autouse=True)
def no_scoring() -> Iterator[None]:
    """No orthogonality scoring threads (tested elsewhere): they only slow these tests."""
    with recording_scores([]):
        yield


class StatementLog:
    """(thread name, on an event loop?, SQL) of every statement run on one engine."""

    def __init__(self, engine: sa.Engine) -> None:
        self.entries: list[tuple[str, bool, str]] = []
        sa.event.listen(engine, "before_cursor_execute", self._record)

    def _record(self, _conn, _cursor, statement: str, *_args) -> None:  # noqa: ANN001
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        self.entries.append((threading.current_thread().name, on_loop, statement))

    def take(self, *, polls: bool = False) -> list[tuple[str, bool, str]]:
        """Entries since the last take; without the snapshot refresher's own polls."""
        entries, self.entries = self.entries, []
        return [e for e in entries if polls or not e[0].startswith("snapshot")]


@pytest.fixture
def app(
    tiny_model: Path, patch_library: Path, tmp_path: Path, database_url: str
) -> Iterator[tuple[TestClient, FakeEngine, StatementLog]]:
    make_store(patch_library, tmp_path / "adapters", names=("alpha", "beta"))
    settings = make_settings(tiny_model, tmp_path, database_url=database_url)
    with running_app(settings) as (client, engine):
        yield client, engine, StatementLog(client.app.state.safepatch.database)


def test_v1_requests_run_no_sql(app) -> None:
    client, _, log = app
    key = add_tenant(client, "acme", mandatory=["alpha"], optional=["beta"], allow_base=True)
    log.take()
    for patches in ([], ["beta"], ["-alpha"], ["gamma"]):
        chat(client, key, safety_patches=patches)  # served, refused (403) or unknown (404)
    chat(client, {"Authorization": "Bearer sp-wrong"})
    client.get("/v1/models", headers=key)
    assert log.take() == []
    # the log is not blind meanwhile: the refresher's polls (its own thread) are in it
    time.sleep(0.6)
    polls = log.take(polls=True)
    assert polls and all(name.startswith("snapshot") and not loop for name, loop, _ in polls)


def test_admin_writes_run_their_sql_off_the_event_loop(app, patch_library: Path) -> None:
    client, _, log = app
    add_tenant(client, "acme", allow_base=True)
    assert upload(client, "gamma", adapter_files(patch_library / "gamma")).status_code == 201
    assert client.put("/admin/tenants/acme/policy", headers=ADMIN, json={"default": ["gamma"]})
    assert client.post("/admin/adapters/beta/pin", headers=ADMIN).status_code == 200
    assert client.get("/admin/tenants/acme", headers=ADMIN).status_code == 200
    assert client.get("/admin/audit", headers=ADMIN).status_code == 200
    assert client.put("/admin/tenants/acme/policy", headers=ADMIN, json={}).is_success
    assert client.delete("/admin/adapters/gamma", headers=ADMIN).status_code == 204
    assert client.delete("/admin/tenants/acme", headers=ADMIN).status_code == 204
    statements = log.take(polls=True)
    writes = [s for _, _, s in statements if s.lstrip().upper().startswith(("INSERT", "UPDATE"))]
    assert len(writes) >= 8  # the log saw the writes
    on_loop = [(name, sql) for name, loop, sql in statements if loop]
    assert on_loop == []
