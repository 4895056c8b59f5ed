"""Tenants: API keys, the admin API with its audit log, per-tenant patch policies and what
actually reaches the engine."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from tests.api.conftest import (
    BASE,
    NO_SCORING,
    add_tenant,
    applied,
    assert_error,
    bearer,
    chat,
    model_ids,
    running_app,
    served_lora,
)
from tests.conftest import ADMIN, make_settings, make_store
from tests.support.fake_engine import FakeEngine

pytestmark = NO_SCORING


@pytest.fixture
def store(patch_library: Path, tmp_path: Path) -> Path:
    """alpha (r4), beta (r8) and gamma (r4): every stack of them fits max_lora_rank 32."""
    return make_store(patch_library, tmp_path / "adapters", names=("alpha", "beta", "gamma"))


ALL = ("alpha", "beta", "gamma")
_ids = itertools.count()


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
    make_store(patch_library, root / "adapters", names=ALL)
    with running_app(make_settings(tiny_model, root)) as pair:
        yield pair


def new_tenant(client: TestClient, **policy) -> tuple[str, dict[str, str]]:
    """A tenant under a fresh id with `policy` and one key: (id, auth headers)."""
    tenant_id = f"t{next(_ids)}"
    return tenant_id, add_tenant(client, tenant_id, **policy)


def ensure_acme(client: TestClient) -> None:
    """A tenant with a fixed id, for paths in parametrize lists."""
    if client.get("/admin/tenants/acme", headers=ADMIN).status_code == 404:
        add_tenant(client, "acme", allow_base=True)


def audit(client: TestClient) -> list[dict]:
    response = client.get("/admin/audit", headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json()["data"]


def served_ok(
    client: TestClient, engine: FakeEngine, headers: dict[str, str], **request
) -> list[str]:
    """Send a chat request; check that the applied set reported (header and body) is what the
    engine served, and return it."""
    response = chat(client, headers, **request)
    assert response.status_code == 200, response.text
    patches = applied(response)
    assert patches == sorted(patches)
    expected_lora = "+".join(patches) or None
    if not response.json()["safepatch"]["gates"]:  # else the probe may have been last
        assert served_lora(engine) == expected_lora
    tag = expected_lora or "base"  # the fake engine's answers name the LoRA
    assert response.json()["choices"][0]["message"]["content"] == f"{tag}:0 {tag}:1 "
    return patches


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
    client.post("/admin/adapters", headers=ADMIN, json={"name": "gamma2", "path": "gamma"})
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


# --- policy semantics -------------------------------------------------------------------------
POLICY = {"mandatory": ["alpha"], "default": ["beta"], "optional": ["gamma"]}


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        ({}, ["alpha", "beta"]),
        ({"safety_patches": ["gamma"]}, ["alpha", "beta", "gamma"]),
        ({"safety_patches": ["-beta"]}, ["alpha"]),
        ({"safety_patches": ["-beta", "gamma"]}, ["alpha", "gamma"]),
        ({"safety_patches": ["+gamma", "alpha"]}, ["alpha", "beta", "gamma"]),
        ({"safety_patches": []}, ["alpha", "beta"]),
        ({"safety_patches": ["-gamma"]}, ["alpha", "beta"]),
        ({"headers": {"X-SafePatch-Patches": "-beta"}}, ["alpha"]),
        ({"headers": {"X-SafePatch-Patches": " gamma , -beta "}}, ["alpha", "gamma"]),
        (
            {"headers": {"X-SafePatch-Patches": "-beta"}, "safety_patches": ["gamma"]},
            ["alpha", "gamma"],
        ),
        ({"model": "gamma"}, ["alpha", "beta", "gamma"]),
        ({"model": "alpha"}, ["alpha", "beta"]),
        ({"model": "gamma+alpha"}, ["alpha", "beta", "gamma"]),
        ({"model": "gamma", "safety_patches": ["-beta"]}, ["alpha", "gamma"]),
    ],
)
def test_effective_set_is_what_reaches_the_engine(
    shared, request_: dict, expected: list[str]
) -> None:
    client, engine = shared
    _, key = new_tenant(client, **POLICY)
    request_ = dict(request_)
    headers = {**key, **request_.pop("headers", {})}
    assert served_ok(client, engine, headers, **request_) == expected


@pytest.mark.parametrize(
    "request_",
    [
        {"safety_patches": ["-alpha"]},
        {"safety_patches": ["gamma", "-alpha"]},
        {"headers": {"X-SafePatch-Patches": "-alpha"}},
        {"headers": {"X-SafePatch-Patches": "beta,-alpha"}},
        {"model": "beta", "safety_patches": ["-alpha"]},
    ],
)
def test_mandatory_patch_cannot_be_dropped(shared, request_: dict) -> None:
    client, engine = shared
    _, key = new_tenant(client, **POLICY)
    calls = len(engine.calls)
    request_ = dict(request_)
    headers = {**key, **request_.pop("headers", {})}
    error = assert_error(chat(client, headers, **request_), 403, "patch_mandatory")
    assert "alpha" in error["message"]
    assert error["type"] == "permission_error"
    assert len(engine.calls) == calls


@pytest.mark.parametrize(
    "request_",
    [
        {"safety_patches": ["gamma"]},
        {"headers": {"X-SafePatch-Patches": "gamma"}},
        {"model": "gamma"},
        {"model": "alpha+gamma"},
        {"model": "gamma+alpha"},
        {"model": "beta", "safety_patches": ["gamma"]},
    ],
)
def test_patch_only_another_tenant_may_use_is_403(shared, request_: dict) -> None:
    client, engine = shared
    _, tenant_a = new_tenant(client, mandatory=["alpha"], optional=["beta"])
    _, tenant_b = new_tenant(client, optional=["alpha", "beta", "gamma"], allow_base=True)
    calls = len(engine.calls)
    request_ = dict(request_)
    extra = request_.pop("headers", {})
    error = assert_error(chat(client, {**tenant_a, **extra}, **request_), 403, "patch_forbidden")
    assert "gamma" in error["message"]
    assert len(engine.calls) == calls
    assert "gamma" in served_ok(client, engine, {**tenant_b, **extra}, **request_)


def test_base_model_forbidden_unless_allowed(shared) -> None:
    client, engine = shared
    strict_id, strict = new_tenant(client, default=["beta"], optional=["gamma"])
    _, empty = new_tenant(client)
    calls = len(engine.calls)
    for headers, request_ in [
        (strict, {"safety_patches": ["-beta"]}),
        ({**strict, "X-SafePatch-Patches": "-beta"}, {}),
        (empty, {}),
        (empty, {"model": BASE}),
    ]:
        error = assert_error(chat(client, headers, **request_), 403, "base_model_forbidden")
        assert error["param"] == "model"
    completion = client.post("/v1/completions", headers=empty, json={"model": BASE, "prompt": "hi"})
    assert_error(completion, 403, "base_model_forbidden")
    assert len(engine.calls) == calls
    # with allow_base the same opt-out reaches the bare base model
    assert (
        client.put(
            f"/admin/tenants/{strict_id}/policy",
            headers=ADMIN,
            json={"default": ["beta"], "optional": ["gamma"], "allow_base": True},
        ).status_code
        == 200
    )
    assert served_ok(client, engine, strict, safety_patches=["-beta"]) == []


def test_conflicting_and_unknown_toggles(shared) -> None:
    client, engine = shared
    _, key = new_tenant(client, **POLICY)
    calls = len(engine.calls)
    assert_error(chat(client, key, safety_patches=["gamma", "-gamma"]), 400, "conflicting_toggles")
    assert_error(chat(client, key, safety_patches=["-"]), 400, "invalid_patch")
    assert_error(chat(client, key, safety_patches=["nope"]), 404, "patch_not_found")
    assert_error(chat(client, {**key, "X-SafePatch-Patches": "nope"}), 404, "patch_not_found")
    assert len(engine.calls) == calls


def test_applied_set_on_streams_and_completions(shared) -> None:
    client, engine = shared
    _, key = new_tenant(client, **POLICY)
    stream = chat(client, key, stream=True, safety_patches=["gamma"])
    assert stream.status_code == 200
    assert stream.headers["X-SafePatch-Applied"] == "alpha,beta,gamma"
    events = [
        line[len("data: ") :] for line in stream.text.splitlines() if line.startswith("data:")
    ]
    assert events[-1] == "[DONE]"
    first = json.loads(events[0])
    assert first["safepatch"]["applied_patches"] == ["alpha", "beta", "gamma"]
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert text == "alpha+beta+gamma:0 alpha+beta+gamma:1 "
    assert served_lora(engine) == "alpha+beta+gamma"

    completion = client.post(
        "/v1/completions",
        headers={**key, "X-SafePatch-Patches": "-beta"},
        json={"model": BASE, "prompt": "hi", "max_tokens": 2},
    )
    assert completion.status_code == 200, completion.text
    assert applied(completion) == ["alpha"]
    assert completion.json()["choices"][0]["text"] == "alpha:0 alpha:1 "
    assert served_lora(engine) == "alpha"

    streamed = client.post(
        "/v1/completions",
        headers=key,
        json={"model": BASE, "prompt": "hi", "max_tokens": 2, "stream": True},
    )
    assert streamed.headers["X-SafePatch-Applied"] == "alpha,beta"
    events = [
        line[len("data: ") :] for line in streamed.text.splitlines() if line.startswith("data:")
    ]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["safepatch"]["applied_patches"] == ["alpha", "beta"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "alpha+beta:0 alpha+beta:1 "
    assert served_lora(engine) == "alpha+beta"


def test_policy_change_takes_effect_on_the_next_request(shared) -> None:
    client, engine = shared
    general, key = new_tenant(client, default=["alpha"], optional=["beta"])
    assert served_ok(client, engine, key) == ["alpha"]
    client.put(
        f"/admin/tenants/{general}/policy",
        headers=ADMIN,
        json={"mandatory": ["beta"], "optional": ["alpha"]},
    )
    assert served_ok(client, engine, key) == ["beta"]
    assert_error(chat(client, key, safety_patches=["-beta"]), 403, "patch_mandatory")
    assert served_ok(client, engine, key, safety_patches=["alpha"]) == ["alpha", "beta"]
    client.patch(
        f"/admin/tenants/{general}", headers=ADMIN, json={"policy": {"default": ["gamma"]}}
    )
    assert served_ok(client, engine, key) == ["gamma"]
    assert_error(chat(client, key, model="alpha"), 403, "patch_forbidden")


def test_models_show_a_tenant_only_what_it_may_use(shared) -> None:
    client, _ = shared
    strict_id, strict = new_tenant(client, mandatory=["alpha"], optional=["gamma"])
    _, open_ = new_tenant(client, default=["beta"], allow_base=True)
    assert model_ids(client, strict) == ["alpha", "gamma"]
    assert model_ids(client, open_) == [BASE, "beta"]
    cards = client.get("/v1/models", headers=strict).json()
    assert cards["object"] == "list"
    assert all(c["parent"] == BASE and c["object"] == "model" for c in cards["data"])
    client.put(f"/admin/tenants/{strict_id}/policy", headers=ADMIN, json={"allow_base": True})
    assert model_ids(client, strict) == [BASE]


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


# --- start-up credentials and dev mode --------------------------------------------------------
@pytest.mark.parametrize("token", [None, "", "changeme", "short-token"])
def test_refuses_to_start_without_a_strong_admin_token(
    tiny_model: Path, store: Path, tmp_path: Path, token: str | None
) -> None:
    from app.main import create_app

    settings = make_settings(tiny_model, tmp_path, admin_token=token)
    app = create_app(settings, engine_factory=lambda _s, _m: FakeEngine())
    with pytest.raises(RuntimeError, match="SAFEPATCH_ADMIN_TOKEN"), TestClient(app):
        pass


def test_dev_mode_serves_anonymous_requests(tiny_model: Path, store: Path, tmp_path: Path) -> None:
    settings = make_settings(
        tiny_model, tmp_path, admin_token=None, dev_mode=True, default_patches=["beta"]
    )
    with running_app(settings) as (client, engine):
        # the default patch is gated: the base's answer unless the probe refuses
        assert served_ok(client, engine, {}) == []
        harmful = [{"role": "user", "content": "[refuse] harm"}]
        assert applied(chat(client, {}, messages=harmful)) == ["beta"]
        assert served_ok(client, engine, {}, safety_patches=["-beta"]) == []
        assert served_ok(client, engine, {}, model="alpha+gamma") == ["alpha", "gamma"]
        assert model_ids(client) == [BASE, "alpha", "beta", "gamma"]
        # the admin API still wants the admin token, which dev mode keeps in the cache dir
        assert_error(client.get("/admin/tenants"), 401)
        token_file = Path(settings.cache_dir) / "admin-token"
        assert token_file.stat().st_mode & 0o077 == 0
        admin = bearer(token_file.read_text().strip())
        assert client.get("/admin/tenants", headers=admin).status_code == 200
        # a tenant key still gets its own policy, not the anonymous one
        response = client.post(
            "/admin/tenants", headers=admin, json={"id": "kids", "policy": {"mandatory": ["alpha"]}}
        )
        assert response.status_code == 201
        key = bearer(client.post("/admin/tenants/kids/keys", headers=admin).json()["key"])
        assert served_ok(client, engine, key) == ["alpha"]
        assert_error(chat(client, key, safety_patches=["-alpha"]), 403, "patch_mandatory")
