"""After hostile or heavy traffic on a live server: the store, the database and the engine
agree, and nothing is left held (leases, engine requests) or half-written (staging, trash)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import sqlalchemy as sa

from app.observability.metrics import series_total
from tests.conftest import ADMIN
from tests.support.live_server import LiveServer

SETTLE_S = 20.0


def held(http: httpx.Client) -> dict[str, float | None]:
    """Leases and engine requests still there, waiting up to SETTLE_S for them to end."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        text = http.get("/metrics").text
        left = {
            name: series_total(text, name)
            for name in (
                "safepatch_lora_leases",
                "safepatch_engine_requests",
                "vllm:num_requests_running",
                "vllm:num_requests_waiting",
            )
        }
        if not any(left.values()) or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def assert_live_consistent(server: LiveServer) -> None:
    root = server.log_path.parent  # start_server's root: adapters/ and safepatch.db in it
    with server.client(timeout=60) as http:
        left = held(http)
        assert not any(left.values()), f"left behind after the load: {left}"
        time.sleep(1.0)  # one snapshot refresh: the API reads what the database holds
        served = {a["name"]: a for a in http.get("/admin/adapters", headers=ADMIN).json()["data"]}
        tenants = {t["id"] for t in http.get("/admin/tenants", headers=ADMIN).json()["data"]}
    engine = sa.create_engine(f"sqlite:///{root / 'safepatch.db'}")
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT name, path, pinned FROM patches WHERE status = 'active'")
        ).all()
        # a deleted patch registered by path leaves its directory to the operator (only an
        # upload's files are SafePatch's to remove): such directories are owned too
        operators = conn.execute(
            sa.text("SELECT path FROM patches WHERE status = 'deleted' AND source != 'upload'")
        ).all()
        stored_tenants = {r[0] for r in conn.execute(sa.text("SELECT id FROM tenants"))}
    engine.dispose()
    assert {r.name for r in rows} == set(served), "database and API list different patches"
    assert stored_tenants == tenants, "database and API list different tenants"
    for row in rows:
        assert bool(row.pinned) == bool(served[row.name].get("pinned")), row.name
        path = Path(row.path)
        assert (path / "adapter_config.json").is_file(), f"{row.name}: {path} has no config"
        assert (path / "adapter_model.safetensors").is_file(), f"{row.name}: no weights"
        json.loads((path / "adapter_config.json").read_text())  # whole, not half-written
    store = root / "adapters"
    leftovers = [p.name for p in store.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"staging or trash left in the store: {leftovers}"
    owned = {Path(r.path).resolve() for r in [*rows, *operators]}
    orphans = [
        p.name
        for p in store.iterdir()
        if not p.name.startswith(".") and p.resolve() not in owned and p.name not in PRESEEDED
    ]
    assert not orphans, f"adapter directories no patch owns: {orphans}"


PRESEEDED = {"alpha", "beta", "gamma"}  # the session store's originals (live_fixtures.py)
