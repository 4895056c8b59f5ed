"""Two replicas (the real app over fake engines) on one database and one store, on SQLite
and PostgreSQL: a change made through one is in force on the other within the stated bound,
and racing registrations of one name end with exactly one winner."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.conftest import ADMIN, make_store
from tests.db.replicas import STALENESS_BOUND_S, fake_replicas, within
from tests.support.api_client import (
    adapter_files,
    add_tenant,
    assert_error,
    chat,
    served_lora,
    upload,
)
from tests.support.apps import recording_scores
from tests.support.fake_engine import FakeEngine

Replica = tuple[TestClient, FakeEngine]


@pytest.fixture(autouse=True)
def no_scoring() -> Iterator[None]:
    """No orthogonality scoring threads (tested elsewhere): they only slow these tests."""
    with recording_scores([]):
        yield


@pytest.fixture
def replicas(
    tiny_model: Path, patch_library: Path, tmp_path: Path, database_url: str
) -> Iterator[list[Replica]]:
    store = make_store(patch_library, tmp_path / "adapters", names=("alpha", "beta"))
    with fake_replicas(tiny_model, tmp_path, store, database_url) as pair:
        yield pair


def test_a_patch_registered_on_a_is_served_on_b(replicas, patch_library: Path) -> None:
    (a, _), (b, engine_b) = replicas
    key = add_tenant(a, "acme", default=["alpha"], allow_base=True)
    # the tenant and its key reached B too
    within(STALENESS_BOUND_S, lambda: chat(b, key).status_code == 200)
    assert upload(a, "gamma", adapter_files(patch_library / "gamma")).status_code == 201
    assert a.put(
        "/admin/tenants/acme/policy",
        headers=ADMIN,
        json={"default": ["alpha"], "optional": ["gamma"]},
    ).is_success
    within(STALENESS_BOUND_S, lambda: chat(b, key, safety_patches=["gamma"]).status_code == 200)
    assert served_lora(engine_b) == "alpha+gamma"


def test_a_key_revoked_on_a_is_refused_on_b(replicas) -> None:
    (a, _), (b, _) = replicas
    key = add_tenant(a, "acme", allow_base=True)
    within(STALENESS_BOUND_S, lambda: chat(b, key).status_code == 200)
    key_id = a.get("/admin/tenants/acme/keys", headers=ADMIN).json()["data"][0]["id"]
    assert a.delete(f"/admin/tenants/acme/keys/{key_id}", headers=ADMIN).status_code == 204
    assert_error(chat(a, key), 401, "invalid_api_key")  # at once on the replica that did it
    within(STALENESS_BOUND_S, lambda: chat(b, key).status_code == 401)
    assert_error(chat(b, key), 401, "invalid_api_key")


def test_a_policy_change_on_a_holds_on_b(replicas) -> None:
    (a, _), (b, engine_b) = replicas
    key = add_tenant(a, "acme", default=["alpha"])
    within(STALENESS_BOUND_S, lambda: chat(b, key).status_code == 200)
    assert served_lora(engine_b) == "alpha"
    assert a.put(
        "/admin/tenants/acme/policy", headers=ADMIN, json={"mandatory": ["beta"]}
    ).is_success
    within(
        STALENESS_BOUND_S,
        lambda: chat(b, key).status_code == 200 and served_lora(engine_b) == "beta",
    )
    assert_error(chat(b, key, safety_patches=["-beta"]), 403, "patch_mandatory")


def test_a_patch_deleted_on_a_is_404_on_b_and_unloaded(replicas, patch_library: Path) -> None:
    (a, _), (b, engine_b) = replicas
    assert upload(a, "gamma", adapter_files(patch_library / "gamma")).status_code == 201
    key = add_tenant(a, "acme", optional=["gamma"], allow_base=True)
    within(STALENESS_BOUND_S, lambda: chat(b, key, safety_patches=["gamma"]).status_code == 200)
    assert served_lora(engine_b) == "gamma"
    removed: list[str] = []
    remove_lora = engine_b.remove_lora

    async def record_removal(lora) -> None:
        removed.append(lora.name)
        await remove_lora(lora)

    engine_b.remove_lora = record_removal
    assert a.put("/admin/tenants/acme/policy", headers=ADMIN, json={"allow_base": True}).is_success
    assert a.delete("/admin/adapters/gamma", headers=ADMIN).status_code == 204
    within(STALENESS_BOUND_S, lambda: chat(b, key, safety_patches=["gamma"]).status_code == 404)
    assert_error(chat(b, key, safety_patches=["gamma"]), 404, "patch_not_found")
    assert_error(b.get("/admin/adapters/gamma", headers=ADMIN), 404, "patch_not_found")
    within(STALENESS_BOUND_S, lambda: removed == ["gamma"])  # B unloaded it from its engine


def test_racing_registrations_of_one_name_have_one_winner(
    replicas, patch_library: Path, tmp_path: Path
) -> None:
    """Both replicas upload `gamma` at the same instant: one 201, one 409, one directory."""
    (a, _), (b, _) = replicas
    files = adapter_files(patch_library / "gamma")
    barrier = threading.Barrier(2)
    results: list[httpx.Response] = []

    def register(client: TestClient) -> None:
        barrier.wait()
        results.append(upload(client, "gamma", files))

    threads = [threading.Thread(target=register, args=(c,)) for c in (a, b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(r.status_code for r in results) == [201, 409], [r.text for r in results]
    store = tmp_path / "adapters"
    assert sorted(p.name for p in store.iterdir()) == ["alpha", "beta", "gamma"]  # no leftovers
    for client in (a, b):
        within(
            STALENESS_BOUND_S,
            lambda c=client: c.get("/admin/adapters/gamma", headers=ADMIN).is_success,
        )


def test_deleting_one_patch_on_both_at_once_has_one_winner(replicas, patch_library: Path) -> None:
    (a, _), (b, _) = replicas
    assert upload(a, "gamma", adapter_files(patch_library / "gamma")).status_code == 201
    within(STALENESS_BOUND_S, lambda: b.get("/admin/adapters/gamma", headers=ADMIN).is_success)
    barrier = threading.Barrier(2)
    codes: list[int] = []

    def delete(client: TestClient) -> None:
        barrier.wait()
        codes.append(client.delete("/admin/adapters/gamma", headers=ADMIN).status_code)

    threads = [threading.Thread(target=delete, args=(c,)) for c in (a, b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(codes) == [204, 404]
    audit = a.get("/admin/audit", headers=ADMIN).json()["data"]
    assert [e["action"] for e in audit].count("patch.delete") == 1
