"""PostgreSQL stopped mid-run under two replicas (the real app over fake engines): /v1 keeps
being served from the snapshot, admin writes answer 503 `database_unavailable`, /ready stays
200 and reports the database; once it is back, a change made through one replica reaches the
other within the bound."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ADMIN, make_store
from tests.db.postgres import PostgresServer
from tests.db.replicas import STALENESS_BOUND_S, fake_replicas, within
from tests.support.api_client import add_tenant, assert_error, chat, served_lora
from tests.support.apps import recording_scores

# the poll that notices: one interval plus a refused connection (the server is local)
NOTICE_BOUND_S = 3.0


@pytest.fixture(autouse=True)
def no_scoring() -> Iterator[None]:
    """No orthogonality scoring threads (tested elsewhere): they only slow these tests."""
    with recording_scores([]):
        yield


def database_state(client) -> str:
    response = client.get("/ready")
    assert response.status_code == 200, response.text  # serving never depends on it
    return response.json()["database"]["state"]


def test_postgres_stopped_and_started_mid_run(
    private_postgres: PostgresServer, tiny_model: Path, patch_library: Path, tmp_path: Path
) -> None:
    store = make_store(patch_library, tmp_path / "adapters", names=("alpha", "beta"))
    url = private_postgres.create_database()
    with fake_replicas(tiny_model, tmp_path, store, url) as [(a, _), (b, engine_b)]:
        key = add_tenant(a, "acme", default=["alpha"], optional=["beta"])
        other = add_tenant(a, "globex", allow_base=True)
        within(STALENESS_BOUND_S, lambda: chat(b, key).status_code == 200)
        assert database_state(a) == database_state(b) == "ok"

        private_postgres.stop()
        for client in (a, b):
            within(NOTICE_BOUND_S, lambda c=client: database_state(c) == "unavailable")
            # /v1 from the snapshot: keys, policies and patches as they were
            assert chat(client, key).status_code == 200
            assert chat(client, key, safety_patches=["beta"]).status_code == 200
            assert_error(chat(client, key, safety_patches=["-alpha", "gamma"]), 404)
            assert_error(chat(client, {"Authorization": "Bearer sp-nope"}), 401)
            # admin reads served from the snapshot still answer; writes are a clear 503
            assert client.get("/admin/tenants", headers=ADMIN).status_code == 200
            error = assert_error(
                client.post("/admin/tenants", headers=ADMIN, json={"id": "new"}),
                503,
                "database_unavailable",
            )
            assert "database" in error["message"]
            assert_error(
                client.put("/admin/tenants/acme/policy", headers=ADMIN, json={"default": []}),
                503,
                "database_unavailable",
            )
            assert_error(client.get("/admin/audit", headers=ADMIN), 503, "database_unavailable")
        assert served_lora(engine_b) == "alpha+beta"

        private_postgres.start()
        for client in (a, b):
            within(NOTICE_BOUND_S, lambda c=client: database_state(c) == "ok")
        # catch-up: changes made through A after the outage are in force on B within the bound
        key_id = a.get("/admin/tenants/globex/keys", headers=ADMIN).json()["data"][0]["id"]
        assert a.delete(f"/admin/tenants/globex/keys/{key_id}", headers=ADMIN).status_code == 204
        assert a.put(
            "/admin/tenants/acme/policy", headers=ADMIN, json={"default": ["beta"]}
        ).is_success
        within(STALENESS_BOUND_S, lambda: chat(b, other).status_code == 401)
        within(
            STALENESS_BOUND_S,
            lambda: chat(b, key).status_code == 200 and served_lora(engine_b) == "beta",
        )
        audit = a.get("/admin/audit", headers=ADMIN).json()["data"]
        assert [e["replica"] for e in audit[:2]] == ["replica-0", "replica-0"]
