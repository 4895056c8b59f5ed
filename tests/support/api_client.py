"""What the HTTP-layer tests do with a client: a tenant with a key, a chat request, the
OpenAI error shape, what was applied and served, the registry as the API and database see it."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from fastapi.testclient import TestClient

from app.constants import CONFIG_FILE, WEIGHTS_FILE
from tests.conftest import ADMIN
from tests.support.fake_engine import FakeEngine

BASE = "tiny"  # the served name of the tiny model (its directory name)
ERROR_FIELDS = {"message", "type", "param", "code"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def add_tenant(client: TestClient, tenant_id: str, **policy: Any) -> dict[str, str]:
    """Create a tenant with `policy` and one key; returns its auth headers."""
    created = client.post("/admin/tenants", headers=ADMIN, json={"id": tenant_id, "policy": policy})
    assert created.status_code == 201, created.text
    key = client.post(f"/admin/tenants/{tenant_id}/keys", headers=ADMIN)
    assert key.status_code == 201, key.text
    return bearer(key.json()["key"])


def chat(
    client: TestClient,
    headers: dict[str, str] | None = None,
    model: str = BASE,
    max_tokens: int = 2,
    **extra: Any,
) -> httpx.Response:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": max_tokens,
        **extra,
    }
    return client.post("/v1/chat/completions", json=body, headers=headers or {})


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    """The OpenAI error shape with the expected status (and code); returns the error object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == ERROR_FIELDS, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if code is not None:
        assert error["code"] == code, error
    return error


def served_lora(engine: FakeEngine) -> str | None:
    """Name of the LoRA that served the engine's last request (None: the bare base)."""
    lora = engine.calls[-1][1]
    return lora.name if lora else None


def applied(response: httpx.Response) -> list[str]:
    """The applied set as the response reports it; the header and the body must agree."""
    header = response.headers["X-SafePatch-Applied"]
    from_header = header.split(",") if header else []
    assert response.json()["safepatch"]["applied_patches"] == from_header
    return from_header


def store_listing(store: Path) -> list[tuple[str, int]]:
    """Every path under the store (directories too) with its size."""
    return sorted(
        (p.relative_to(store).as_posix(), p.stat().st_size if p.is_file() else -1)
        for p in store.rglob("*")
    )


def patch_rows(client: TestClient) -> list[tuple]:
    """The registry's rows, straight from the database."""
    from app import db

    database = client.app.state.safepatch.database
    with database.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.select(db.patches).order_by(db.patches.c.name))]


def adapter_names(client: TestClient) -> list[str]:
    response = client.get("/admin/adapters", headers=ADMIN)
    assert response.status_code == 200, response.text
    return [a["name"] for a in response.json()["data"]]


def model_ids(client: TestClient, headers: dict[str, str] | None = None) -> list[str]:
    response = client.get("/v1/models", headers=headers or {})
    assert response.status_code == 200, response.text
    return [m["id"] for m in response.json()["data"]]


_ids = itertools.count()


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


def adapter_files(adapter: Path) -> dict[str, bytes]:
    """An adapter directory's two files, as an upload sends them."""
    return {name: (adapter / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}


def upload(http: Any, name: str | None, files: dict[str, bytes]) -> httpx.Response:
    """Register `files` (file name -> bytes) as patch `name` by a multipart upload (`http`: a
    TestClient or an httpx client; no `name` field when None)."""
    data = {"name": name} if name is not None else {}
    parts = {f"file{i}": (filename, content) for i, (filename, content) in enumerate(files.items())}
    return http.post("/admin/adapters", headers=ADMIN, data=data, files=parts)
