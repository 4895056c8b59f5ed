from __future__ import annotations

from tests.conftest import ADMIN


def test_dev_free_request_needs_key(fake_app) -> None:
    client, _ = fake_app
    response = client.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_admin_lists_scanned_store(fake_app) -> None:
    client, _ = fake_app
    names = [a["name"] for a in client.get("/admin/adapters", headers=ADMIN).json()["data"]]
    assert names == ["alpha", "beta"]
