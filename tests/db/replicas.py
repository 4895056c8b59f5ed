"""Helpers for tests of several replicas on one database and one patch store."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from fastapi.testclient import TestClient

from tests.conftest import make_settings
from tests.support.apps import running_app
from tests.support.fake_engine import FakeEngine

# The stated staleness bound: a change made through one replica is in force on every other
# within this many seconds (snapshot_refresh_s = 0.25 s plus a reload; docs/deployment.md).
STALENESS_BOUND_S = 1.0


def within(bound_s: float, check: Callable[[], bool], poll_s: float = 0.02) -> float:
    """How long after now a `check()` (e.g. a request) first saw the change, measured at the
    start of that check; fails if a check that started later than `bound_s` still did not.
    (A slow request that started before the bound may miss the change: the bound is about
    when it is in force, not about how long requests take.)"""
    start = time.monotonic()
    while True:
        began = time.monotonic() - start
        if check():
            return began
        assert began < bound_s, f"not in force {began:.2f} s after (bound {bound_s} s)"
        time.sleep(poll_s)


@contextmanager
def fake_replicas(
    tiny_model: Path, root: Path, store: Path, database_url: str, count: int = 2, **overrides
) -> Iterator[list[tuple[TestClient, FakeEngine]]]:
    """`count` apps (fake engines) sharing one database and one store, each with its own
    cache dir, as replicas behind a load balancer would."""
    with ExitStack() as stack:
        replicas = []
        for i in range(count):
            settings = make_settings(
                tiny_model,
                root / f"replica-{i}",
                adapters_dir=store,
                database_url=database_url,
                replica_id=f"replica-{i}",
                **overrides,
            )
            replicas.append(stack.enter_context(running_app(settings)))
        yield replicas
