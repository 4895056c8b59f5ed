"""Start-up credentials and dev mode: no server without a strong admin token; in dev mode any
key but a tenant's is the dev tenant, whose default patches are gated."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import NO_SCORING
from tests.conftest import make_settings, make_store
from tests.support.api_client import BASE, applied, assert_error, bearer, chat, model_ids, served_ok
from tests.support.apps import build_app, running_app

pytestmark = NO_SCORING


@pytest.fixture
def store(patch_library: Path, tmp_path: Path) -> Path:
    """alpha (r4), beta (r8) and gamma (r4)."""
    return make_store(patch_library, tmp_path / "adapters", names=("alpha", "beta", "gamma"))


@pytest.mark.parametrize("token", [None, "", "changeme", "short-token"])
def test_refuses_to_start_without_a_strong_admin_token(
    tiny_model: Path, store: Path, tmp_path: Path, token: str | None
) -> None:
    settings = make_settings(tiny_model, tmp_path, admin_token=token)
    app, _ = build_app(settings)
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
