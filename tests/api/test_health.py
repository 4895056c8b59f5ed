"""Liveness and readiness: /health answers at once, /ready is 503 until the engine serves and
again while draining."""

from __future__ import annotations

import signal

import uvicorn
from fastapi.testclient import TestClient

from app.config import Settings
from app.server import DrainingServer
from tests.api.conftest import NO_SCORING
from tests.support.apps import build_app, running_app
from tests.support.fake_engine import FakeEngine

pytestmark = NO_SCORING


def test_health_is_ok_without_credentials(api) -> None:
    client, _ = api
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_ready_is_503_while_loading_then_200(settings: Settings) -> None:
    engine = FakeEngine(start_delay=1.0)
    with running_app(settings, engine, ready=False) as (client, _):
        loading = client.get("/ready")
        assert loading.status_code == 503
        assert loading.json() == {"status": "loading"}
        assert client.get("/health").status_code == 200  # alive while loading
        seen = []
        while (response := client.get("/ready")).status_code == 503:
            seen.append(response.json()["status"])
        assert set(seen) <= {"loading"}
        assert engine.is_ready
        body = response.json()
        assert {k: body[k] for k in ("status", "model")} == {"status": "ready", "model": "tiny"}
        assert body["database"]["state"] == "ok"


def test_ready_is_503_once_draining_starts(settings: Settings) -> None:
    """DrainingServer's signal handler flips /ready before uvicorn stops accepting."""
    with running_app(settings) as (client, _):
        assert client.get("/ready").status_code == 200
        server = DrainingServer(uvicorn.Config(client.app), client.app)
        server.handle_exit(signal.SIGTERM, None)
        assert server.should_exit
        response = client.get("/ready")
        assert response.status_code == 503
        assert response.json() == {"status": "draining"}
        assert client.get("/health").status_code == 200


def test_engine_that_fails_to_start_is_logged_and_reported(settings, caplog) -> None:
    class BrokenEngine(FakeEngine):
        async def start(self) -> None:
            raise RuntimeError("no memory for the KV cache")

    fatal: list[bool] = []
    app, _ = build_app(settings, BrokenEngine())
    app.state.on_fatal = lambda: fatal.append(True)
    with TestClient(app) as client:
        for _ in range(50):
            if fatal:
                break
            client.get("/health")
        response = client.get("/ready")
        assert response.status_code == 503 and response.json()["status"] == "failed"
    assert fatal == [True]
    assert "no memory for the KV cache" in caplog.text
