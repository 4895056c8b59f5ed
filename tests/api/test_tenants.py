"""Tenants: API keys, the admin API with its audit log, persistence (policy semantics:
test_tenant_policy.py; start-up credentials and dev mode: test_start_modes.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.config import Settings
from tests.api.conftest import NO_SCORING
from tests.conftest import ADMIN, make_store, register_path
from tests.support.api_client import (
    BASE,
    add_tenant,
    assert_error,
    audit,
    bearer,
    chat,
    ensure_acme,
    new_tenant,
    served_ok,
)
from tests.support.apps import running_app

pytestmark = NO_SCORING


@pytest.fixture
def store(patch_library: Path, tmp_path: Path) -> Path:
    """alpha (r4), beta (r8) and gamma (r4): every stack of them fits max_lora_rank 32."""
    return make_store(patch_library, tmp_path / "adapters", names=("alpha", "beta", "gamma"))


# --- authentication ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "auth",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Bearer sp-unknown-key",
        "Bearer " + "x" * 200,
    ],
)
def test_missing_or_unknown_key_is_401(shared, auth: str | None) -> None:
    client, engine = shared
    new_tenant(client, allow_base=True)
    calls = len(engine.calls)
    headers = {"Authorization": auth} if auth is not None else {}
    for response in (
        chat(client, headers),
        client.get("/v1/models", headers=headers),
        client.post("/v1/completions", headers=headers, json={"model": BASE, "prompt": "hi"}),
    ):
        error = assert_error(response, 401, "invalid_api_key")
        assert error["type"] == "authentication_error"
    assert len(engine.calls) == calls


def test_revoked_key_is_401_and_rotation_keeps_the_tenant_working(shared) -> None:
    client, _ = shared
    acme, old = new_tenant(client, allow_base=True)
    new_key = client.post(f"/admin/tenants/{acme}/keys", headers=ADMIN).json()
    assert new_key["key"].startswith("sp-") and new_key["tenant_id"] == acme
    new = bearer(new_key["key"])
    keys = client.get(f"/admin/tenants/{acme}/keys", headers=ADMIN).json()["data"]
    assert len(keys) == 2
    old_id = next(k["id"] for k in keys if k["id"] != new_key["id"])
    assert chat(client, old).status_code == 200
    assert client.delete(f"/admin/tenants/{acme}/keys/{old_id}", headers=ADMIN).status_code == 204
    assert_error(chat(client, old), 401, "invalid_api_key")
    assert_error(client.get("/v1/models", headers=old), 401)
    assert chat(client, new).status_code == 200
    assert_error(
        client.delete(f"/admin/tenants/{acme}/keys/{old_id}", headers=ADMIN), 404, "key_not_found"
    )
    revoked = {
        k["id"]: k["revoked_at"]
        for k in client.get(f"/admin/tenants/{acme}/keys", headers=ADMIN).json()["data"]
    }
    assert revoked[old_id] is not None and revoked[new_key["id"]] is None


def test_keys_are_shown_once_and_stored_hashed(shared) -> None:
    client, _ = shared
    acme, _ = new_tenant(client, allow_base=True)
    created = client.post(f"/admin/tenants/{acme}/keys", headers=ADMIN).json()
    secret = created["key"]
    shown = [
        client.get(f"/admin/tenants/{acme}", headers=ADMIN).text,
        client.get(f"/admin/tenants/{acme}/keys", headers=ADMIN).text,
        client.get("/admin/tenants", headers=ADMIN).text,
        client.get("/admin/audit", headers=ADMIN).text,
    ]
    assert not [text for text in shown if secret in text]
    database = client.app.state.safepatch.database
    with database.connect() as conn:
        dump = "\n".join(
            str(row)
            for table in ("api_keys", "audit_log", "tenants")
            for row in conn.exec_driver_sql(f"SELECT * FROM {table}")
        )
    assert secret not in dump
    assert secret[:8] in dump  # the prefix alone identifies it


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin/adapters"),
        ("GET", "/admin/adapters/alpha"),
        ("POST", "/admin/adapters"),
        ("DELETE", "/admin/adapters/alpha"),
        ("POST", "/admin/adapters/alpha/pin"),
        ("GET", "/admin/tenants"),
        ("POST", "/admin/tenants"),
        ("GET", "/admin/tenants/acme"),
        ("PUT", "/admin/tenants/acme/policy"),
        ("POST", "/admin/tenants/acme/keys"),
        ("DELETE", "/admin/tenants/acme"),
        ("GET", "/admin/audit"),
        ("GET", "/admin/orthogonality"),
        ("GET", "/admin/adapters/alpha/orthogonality"),
    ],
)
def test_tenant_key_on_admin_routes_is_403(shared, method: str, path: str) -> None:
    client, _ = shared
    ensure_acme(client)
    _, key = new_tenant(client, allow_base=True)
    before = audit(client)
    error = assert_error(client.request(method, path, headers=key, json={}), 403, "admin_only")
    assert error["type"] == "permission_error"
    assert_error(client.request(method, path, json={}), 401)
    assert_error(
        client.request(method, path, headers=bearer("wrong-admin-token-123456"), json={}), 401
    )
    assert audit(client) == before
    assert client.get("/admin/tenants/acme", headers=ADMIN).status_code == 200
    assert client.get("/admin/adapters/alpha", headers=ADMIN).status_code == 200


# --- admin CRUD and audit ---------------------------------------------------------------------
def test_tenant_crud_with_an_audit_entry_for_each_change(shared) -> None:
    client, _ = shared
    start = max((e["id"] for e in audit(client)), default=0)
    created = client.post(
        "/admin/tenants",
        headers=ADMIN,
        json={"id": "edu", "name": "Kids Edu", "policy": {"mandatory": ["alpha"]}},
    )
    assert created.status_code == 201, created.text
    assert created.json() == {
        "id": "edu",
        "name": "Kids Edu",
        "policy": {
            "mandatory": ["alpha"],
            "default": [],
            "optional": [],
            "allow_base": False,
            "modes": {},
        },
    }
    key = client.post("/admin/tenants/edu/keys", headers=ADMIN).json()
    renamed = client.patch("/admin/tenants/edu", headers=ADMIN, json={"name": "Kids"})
    assert renamed.status_code == 200 and renamed.json()["name"] == "Kids"
    policy = {
        "mandatory": ["alpha"],
        "default": ["beta"],
        "optional": ["gamma"],
        "allow_base": False,
        "modes": {"alpha": "gated"},
    }
    put = client.put("/admin/tenants/edu/policy", headers=ADMIN, json=policy)
    assert put.status_code == 200 and put.json()["policy"] == policy
    patched = client.patch(
        "/admin/tenants/edu", headers=ADMIN, json={"policy": {**policy, "optional": []}}
    )
    assert patched.json()["policy"]["optional"] == []
    assert "edu" in [t["id"] for t in client.get("/admin/tenants", headers=ADMIN).json()["data"]]
    detail = client.get("/admin/tenants/edu", headers=ADMIN).json()
    assert detail["name"] == "Kids" and [k["id"] for k in detail["keys"]] == [key["id"]]
    assert client.delete(f"/admin/tenants/edu/keys/{key['id']}", headers=ADMIN).status_code == 204
    assert client.delete("/admin/tenants/edu", headers=ADMIN).status_code == 204
    assert_error(client.get("/admin/tenants/edu", headers=ADMIN), 404, "tenant_not_found")
    assert_error(client.delete("/admin/tenants/edu", headers=ADMIN), 404, "tenant_not_found")

    entries = sorted((e for e in audit(client) if e["id"] > start), key=lambda e: e["id"])
    assert [e["action"] for e in entries] == [
        "tenant.create",
        "key.create",
        "tenant.rename",
        "tenant.policy",
        "tenant.policy",
        "key.revoke",
        "tenant.delete",
    ]
    assert {e["actor"] for e in entries} == {"admin"}
    assert {e["target"] for e in entries} == {"edu"}
    assert all(e["at"] for e in entries)
    assert entries[1]["detail"]["key_id"] == key["id"]
    assert entries[3]["detail"]["after"] == policy
    assert entries[4]["detail"]["before"] == policy
    assert entries[4]["detail"]["after"]["optional"] == []
    assert key["key"] not in json.dumps(entries)


def test_deleting_a_tenant_disables_its_keys(shared) -> None:
    client, _ = shared
    key = add_tenant(client, "gone", allow_base=True)
    assert chat(client, key).status_code == 200
    assert client.delete("/admin/tenants/gone", headers=ADMIN).status_code == 204
    assert_error(chat(client, key), 401, "invalid_api_key")
    # the id can be taken again; the old key does not come back with it
    add_tenant(client, "gone", allow_base=True)
    assert_error(chat(client, key), 401, "invalid_api_key")


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"id": "Bad Id"}, 400, "invalid_tenant_id"),
        ({"id": "../x"}, 400, "invalid_tenant_id"),
        ({"id": "acme"}, 409, "conflict"),
        ({"id": "new", "policy": {"optional": ["nope"]}}, 400, "patch_not_found"),
        (
            {"id": "new", "policy": {"mandatory": ["alpha"], "optional": ["alpha"]}},
            422,
            "invalid_parameter",
        ),
        ({"name": "no id"}, 422, "invalid_parameter"),
    ],
)
def test_invalid_tenant_changes_are_refused_unaudited(
    shared, body: dict, status: int, code: str
) -> None:
    client, _ = shared
    ensure_acme(client)
    before = (audit(client), client.get("/admin/tenants", headers=ADMIN).json())
    assert_error(client.post("/admin/tenants", headers=ADMIN, json=body), status, code)
    if "policy" in body:
        assert_error(
            client.put("/admin/tenants/acme/policy", headers=ADMIN, json=body["policy"]),
            status,
            code,
        )
    assert (audit(client), client.get("/admin/tenants", headers=ADMIN).json()) == before


def test_changes_to_missing_tenants_are_404(shared) -> None:
    client, _ = shared
    for method, path, body in [
        ("PUT", "/admin/tenants/nope/policy", {}),
        ("PATCH", "/admin/tenants/nope", {"name": "x"}),
        ("POST", "/admin/tenants/nope/keys", None),
        ("GET", "/admin/tenants/nope/keys", None),
    ]:
        assert_error(
            client.request(method, path, headers=ADMIN, json=body), 404, "tenant_not_found"
        )
    assert_error(
        client.delete("/admin/tenants/nope/keys/key_x", headers=ADMIN), 404, "key_not_found"
    )


def test_adapter_changes_are_audited(api, patch_library: Path, store: Path) -> None:
    client, _ = api
    client.post("/admin/adapters/alpha/pin", headers=ADMIN)
    client.post("/admin/adapters/alpha/unpin", headers=ADMIN)
    client.delete("/admin/adapters/gamma", headers=ADMIN)
    register_path(client, "gamma2", "gamma")
    entries = audit(client)[:4]
    assert [(e["action"], e["target"], e["actor"]) for e in reversed(entries)] == [
        ("patch.pin", "alpha", "admin"),
        ("patch.unpin", "alpha", "admin"),
        ("patch.delete", "gamma", "admin"),
        ("patch.register", "gamma2", "admin"),
    ]


def test_audit_log_pages(shared) -> None:
    client, _ = shared
    for _ in range(3):
        new_tenant(client, allow_base=True)
    everything = audit(client)
    page = client.get("/admin/audit?limit=3&offset=2", headers=ADMIN).json()["data"]
    assert page == everything[2:5]
    assert_error(client.get("/admin/audit?limit=0", headers=ADMIN), 422)


def test_tenants_keys_and_policies_survive_a_restart(settings: Settings) -> None:
    with running_app(settings) as (client, _):
        kept = add_tenant(client, "edu", mandatory=["alpha"], optional=["gamma"])
        revoked = client.post("/admin/tenants/edu/keys", headers=ADMIN).json()
        client.delete(f"/admin/tenants/edu/keys/{revoked['id']}", headers=ADMIN)
        add_tenant(client, "temp")
        client.delete("/admin/tenants/temp", headers=ADMIN)
        log = audit(client)
    with running_app(settings) as (client, engine):
        assert [t["id"] for t in client.get("/admin/tenants", headers=ADMIN).json()["data"]] == [
            "edu"
        ]
        assert served_ok(client, engine, kept, safety_patches=["gamma"]) == ["alpha", "gamma"]
        assert_error(chat(client, kept, safety_patches=["-alpha"]), 403, "patch_mandatory")
        assert_error(chat(client, bearer(revoked["key"])), 401, "invalid_api_key")
        assert audit(client) == log
