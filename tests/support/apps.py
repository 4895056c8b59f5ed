"""The one fake-app builder: the real app (registry, tenants, database, scoring) over a
FakeEngine, lifespan included, so a second one on the same settings is a restart.

Background orthogonality scoring is injected (`create_app(scorer_factory=...)`): the real
`Scorer` by default, or, inside `recording_scores(calls)` (the `scoring_calls` fixture), a
`RecordingScorer` that notes which patches the app asked to score and scores none. Scoring is
tested in tests/orthogonality and test_orthogonality_routes.py; its worker thread would add most
of a second to every app teardown elsewhere.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.composition import ScorerFactory
from app.config import Settings
from app.main import create_app
from app.patches.scores import Scorer
from tests.support.fake_engine import FakeEngine


class RecordingScorer(Scorer):
    """Notes each patch the app schedules for scoring in `calls`; scores none in the background
    (an explicit request still computes its score)."""

    def __init__(self, calls: list[str], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls = calls

    def schedule(self, name: str) -> None:
        self.calls.append(name)


_recording: list[list[str]] = []  # innermost `recording_scores` list, if any


@contextmanager
def recording_scores(calls: list[str]) -> Iterator[list[str]]:
    """Apps built meanwhile get a RecordingScorer writing to `calls`."""
    _recording.append(calls)
    try:
        yield calls
    finally:
        _recording.remove(calls)


def scorer_factory() -> ScorerFactory:
    if not _recording:
        return Scorer
    calls = _recording[-1]
    return lambda *args, **kwargs: RecordingScorer(calls, *args, **kwargs)


def build_app(settings: Settings, engine: FakeEngine | None = None) -> tuple[FastAPI, FakeEngine]:
    """The app over `engine` (a fresh FakeEngine by default), not started."""
    engine = engine or FakeEngine()
    app = create_app(
        settings, engine_factory=lambda _s, _m: engine, scorer_factory=scorer_factory()
    )
    return app, engine


def wait_ready(client: TestClient, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < deadline, "engine never became ready"
        time.sleep(0.01)


@contextmanager
def running_app(
    settings: Settings,
    engine: FakeEngine | None = None,
    *,
    ready: bool = True,
    raise_server_exceptions: bool = True,
) -> Iterator[tuple[TestClient, FakeEngine]]:
    """(TestClient, FakeEngine) over the started app; `ready`: wait until /ready says so."""
    app, engine = build_app(settings, engine)
    with TestClient(app, raise_server_exceptions=raise_server_exceptions) as client:
        if ready:
            wait_ready(client)
        yield client, engine
