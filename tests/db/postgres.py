"""The test PostgreSQL server (scripts/postgres.sh) and a fresh database per test."""

from __future__ import annotations

import os
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import make_url

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "postgres.sh"


def run_script(action: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(SCRIPT), action],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, **(env or {})},
    )
    if done.returncode != 0:
        raise RuntimeError(f"scripts/postgres.sh {action} failed: {done.stderr.strip()}")
    return done.stdout.strip()


@dataclass
class PostgresServer:
    """A running server: `url` reaches its maintenance database `postgres`."""

    url: str
    managed: bool  # run by scripts/postgres.sh (so tests may stop and start it)
    started_here: bool = False  # this test session started it, so it stops it at the end
    created: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # where the script keeps this server

    @classmethod
    def connect(cls) -> PostgresServer:
        """`SAFEPATCH_TEST_POSTGRES_URL` when set (a server of your own), else the script's."""
        external = os.environ.get("SAFEPATCH_TEST_POSTGRES_URL")
        if external:
            server = cls(external, managed=False)
        else:
            was_running = subprocess.run([str(SCRIPT), "status"], check=False).returncode == 0
            server = cls(run_script("start"), managed=True, started_here=not was_running)
        server._admin().close()
        return server

    @classmethod
    def private(cls, data_dir: Path, port: int) -> PostgresServer:
        """A server of one's own (e.g. for a test that stops it), removed by `close`."""
        env = {"SAFEPATCH_PG_DIR": str(data_dir), "SAFEPATCH_PG_PORT": str(port)}
        server = cls(run_script("start", env), managed=True, started_here=True, env=env)
        return server

    def _admin(self) -> sa.Connection:
        engine = sa.create_engine(self.url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
        return engine.connect()

    def create_database(self) -> str:
        name = f"safepatch_test_{uuid.uuid4().hex[:12]}"
        with self._admin() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        self.created.append(name)
        return make_url(self.url).set(database=name).render_as_string(hide_password=False)

    def drop_database(self, url: str) -> None:
        name = make_url(url).database
        with self._admin() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        if name in self.created:
            self.created.remove(name)

    def stop(self) -> None:
        assert self.managed, "only the script's own server can be stopped by a test"
        run_script("stop", self.env)

    def start(self) -> None:
        assert self.managed
        run_script("start", self.env)

    def close(self) -> None:
        for name in list(self.created):
            self.drop_database(make_url(self.url).set(database=name).render_as_string(False))
        if self.started_here:
            run_script("stop", self.env)
