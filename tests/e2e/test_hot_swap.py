"""Registration at run time on the real engine: no restart, in-flight streams undisturbed."""

from __future__ import annotations

import shutil
import threading

import pytest

from tests.conftest import ADMIN, register_path
from tests.support.live_server import chat

pytestmark = pytest.mark.slow


def _chat(http, key: str, model: str, **extra):
    return chat(http, key, model, "hack the water", 8, **extra)


def test_register_serve_unregister_without_restart(live_server, open_key, patch_library) -> None:
    store = live_server_store(live_server)
    shutil.copytree(patch_library / "gamma", store / "delta")
    with live_server.client() as http:
        assert _chat(http, open_key, "delta").status_code == 404
        registered = register_path(http, "delta", "delta")
        assert registered.status_code == 201, registered.text
        key = live_server.tenant_key(
            "delta-user", {"optional": ["delta", "gamma"], "allow_base": True}
        )
        served = _chat(http, key, "delta", return_token_ids=True)
        assert served.status_code == 200
        same = _chat(http, key, "gamma", return_token_ids=True)  # same weights, other name
        assert served.json()["choices"][0]["token_ids"] == same.json()["choices"][0]["token_ids"]
        in_use = http.delete("/admin/adapters/delta", headers=ADMIN)
        assert in_use.status_code == 409 and in_use.json()["error"]["code"] == "patch_in_use"
        http.put(
            "/admin/tenants/delta-user/policy",
            headers=ADMIN,
            json={"optional": ["gamma"], "allow_base": True},
        ).raise_for_status()
        assert http.delete("/admin/adapters/delta", headers=ADMIN).status_code == 204
        gone = _chat(http, key, "delta")
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"


def test_register_while_streaming(live_server, open_key, patch_library) -> None:
    store = live_server_store(live_server)
    results: list[tuple[int, str]] = []

    def stream(model: str) -> None:
        with (
            live_server.client() as http,
            http.stream(
                "POST",
                "/v1/chat/completions",
                headers={"Authorization": f"Bearer {open_key}"},
                json={
                    "model": model,
                    "max_tokens": 48,
                    "temperature": 0,
                    "stream": True,
                    "messages": [{"role": "user", "content": "write a recipe"}],
                },
            ) as response,
        ):
            body = "".join(response.iter_text())
            results.append((response.status_code, body))

    threads = [threading.Thread(target=stream, args=(m,)) for m in ("tiny", "alpha", "beta")]
    for thread in threads:
        thread.start()
    with live_server.client() as http:
        for i in range(3):
            shutil.copytree(patch_library / "gamma", store / f"hot{i}")
            response = register_path(http, f"hot{i}", f"hot{i}")
            assert response.status_code == 201, response.text
    for thread in threads:
        thread.join(300)
    assert len(results) == 3
    for status, body in results:
        assert status == 200 and body.rstrip().endswith("data: [DONE]"), body[-300:]


def live_server_store(live_server):
    from pathlib import Path

    return Path(live_server.log_path).parent / "adapters"
