"""Fixtures for the database tests: a PostgreSQL server of a test's own (to stop mid-run)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.db.postgres import PostgresServer
from tests.support.live_server import free_port


@pytest.fixture
def private_postgres(postgres_server: PostgresServer) -> Iterator[PostgresServer]:
    """A second cluster, started for this test and removed after it: stopping the shared one
    would break every other test's database. (Requesting `postgres_server` first gives it
    the same skip-or-fail rule and the installation.)"""
    with private_cluster() as server:
        yield server


@contextmanager
def private_cluster() -> Iterator[PostgresServer]:
    # not under pytest's tmp_path: as root the server runs as `postgres`, which cannot
    # traverse pytest's private directories
    data = Path(tempfile.mkdtemp(prefix="safepatch-pg-test-")) / "data"
    data.parent.chmod(0o711)  # mkdtemp makes it 0700; the server user must pass through
    try:
        server = PostgresServer.private(data, free_port())
    except Exception as exc:
        shutil.rmtree(data.parent, ignore_errors=True)
        pytest.fail(f"could not start a private PostgreSQL cluster: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.close()
        shutil.rmtree(data.parent, ignore_errors=True)
